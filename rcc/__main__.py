"""`python -m rcc` is the `rcc` command."""
import sys

from .cli import main

sys.exit(main())
