"""`python -m trl_safeppo ...` is the same as the `trl-safeppo` console script (and works under `accelerate launch -m`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
