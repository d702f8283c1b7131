"""``python -m svdgrow ...``: the ``svdgrow`` command."""

import sys

from svdgrow.app.cli import main

sys.exit(main())
