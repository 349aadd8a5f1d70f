import os
import sys

# the repo root is importable as-is (headforcing_core is a plain package)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
