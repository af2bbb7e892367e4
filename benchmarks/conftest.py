"""Lets `pytest benchmarks/` import pushpull_ext from this checkout when it is not installed."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
