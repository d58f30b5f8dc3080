"""A user's Flower app with OQFL's mod and strategy (see ../README.md)."""
