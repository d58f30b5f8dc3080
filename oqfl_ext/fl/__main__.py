"""``python -m oqfl_ext.fl``: the ``oqfl-fl`` command line (:mod:`oqfl_ext.fl.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
