"""Federated learning: the client-update wire format (more parts to come; DESIGN.md section 4)."""

from .codec import UpdateRejected, decode_update, encode_update

__all__ = ["encode_update", "decode_update", "UpdateRejected"]
