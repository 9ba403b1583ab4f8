"""``python -m memcore ...`` (also what torchrun runs: ``torchrun ... -m memcore extract ...``)."""

import sys

from memcore.cli import main

sys.exit(main())
