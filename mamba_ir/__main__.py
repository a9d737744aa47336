"""``python -m mamba_ir``: see :mod:`mamba_ir.cli`."""

import sys

from .cli import main

sys.exit(main())
