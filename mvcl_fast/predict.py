"""``python -m mvcl_fast.predict``: label clips with a trained model (mvcl_fast.intent.predict)."""
import sys

from mvcl_fast.intent.predict import main

if __name__ == "__main__":
    sys.exit(main())
