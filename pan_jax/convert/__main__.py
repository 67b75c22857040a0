"""`python -m pan_jax.convert --from=torchvision|timm|smp --input=FILE --output=DIR`; see cli.py."""

import sys

from pan_jax.convert.cli import main

sys.exit(main())
