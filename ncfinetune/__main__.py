"""``python -m ncfinetune <command>`` (and ``accelerate launch -m ncfinetune <command>``)."""

import sys

from ncfinetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
