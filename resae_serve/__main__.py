"""``python -m resae_serve`` runs the ``resae`` command line."""

import sys

from resae_serve.cli import main

sys.exit(main())
