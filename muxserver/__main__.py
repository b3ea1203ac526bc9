"""``python -m muxserver`` runs the server, exactly like the ``muxserver`` command."""

import sys

from .cli import main

sys.exit(main())
