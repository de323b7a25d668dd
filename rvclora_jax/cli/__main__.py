"""``python -m rvclora_jax.cli``: the same as the ``rvclora`` console script."""

import sys

from . import main

sys.exit(main())
