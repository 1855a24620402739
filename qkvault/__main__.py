"""``python -m qkvault`` is the ``qkvault`` command."""

import sys

from qkvault.cli import main

sys.exit(main())
