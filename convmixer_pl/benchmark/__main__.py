"""`python -m convmixer_pl.benchmark`: the same as `convmixer benchmark`."""

import sys

from . import main

sys.exit(0 if main() else 1)
