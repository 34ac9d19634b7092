"""``python -m dinofeat`` (also what ``torchrun -m dinofeat`` runs)."""

import sys

from .cli import main

sys.exit(main())
