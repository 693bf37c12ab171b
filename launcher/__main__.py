"""`python -m launcher`: the same as the `tgi-trtllm` console script."""

import sys

from launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
