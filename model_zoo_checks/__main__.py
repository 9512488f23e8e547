"""``python -m model_zoo_checks``: the timm zoo sweep (see docs/zoo.md)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
