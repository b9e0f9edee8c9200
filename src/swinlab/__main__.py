"""``python -m swinlab`` (and ``torchrun -m swinlab train ...``) run the command line."""

import sys

from swinlab.cli import main

sys.exit(main())
