"""`python -m pyllm`: the same as the `pyllm` command."""
import sys

from pyllm.cli import main

sys.exit(main())
