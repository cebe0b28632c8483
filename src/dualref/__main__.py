"""`python -m dualref` entry point."""

import sys

from dualref.cli import main

sys.exit(main())
