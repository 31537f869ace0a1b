"""``python -m hooktrain``: the same command line as ``hooktrain``."""

import sys

from hooktrain.cli import main

sys.exit(main())
