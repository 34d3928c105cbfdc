"""``python -m dcanets.cli``: the same as the ``dcanets`` command."""
import sys

from dcanets.cli import main

sys.exit(main())
