"""Allow `python -m musicgpt ...` (and `torchrun -m musicgpt train ...`)."""

import sys

from musicgpt.cli import main

sys.exit(main())
