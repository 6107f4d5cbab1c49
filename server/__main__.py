"""python -m server [serve] --policies DIR --store PATH --port N [...] (see server/app.py)."""
import sys

from .app import main

sys.exit(main())
