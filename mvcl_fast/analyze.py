"""``python -m mvcl_fast.analyze``: the paper's analyses of trained runs (mvcl_fast.intent.analyze)."""
import sys

from mvcl_fast.intent.analyze import main

if __name__ == "__main__":
    sys.exit(main())
