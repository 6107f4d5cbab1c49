"""`python -m engine.cli ...`: the `medsettle` command without the console script."""
import sys

from engine.cli import main

sys.exit(main())
