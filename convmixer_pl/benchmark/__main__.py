import sys

from . import main

sys.exit(0 if main() else 1)
