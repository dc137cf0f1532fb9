"""``python -m flowcore ...``: the ``flowcore`` command, for an environment whose scripts are not on the PATH."""

import sys

from flowcore.cli import main

sys.exit(main())
