"""``python -m hub_backdoor.cli``: the ``hub-backdoor`` command."""

import sys

from .app import main

sys.exit(main())
