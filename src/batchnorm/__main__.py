"""``python -m batchnorm``: the ``batchnorm`` command."""
import sys

from .cli import main

sys.exit(main())
