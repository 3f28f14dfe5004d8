"""``python -m mvcl_fast.train``: train and evaluate MVCL-DAF++ (mvcl_fast.intent.train)."""
import sys

from mvcl_fast.intent.train import main

if __name__ == "__main__":
    sys.exit(main())
