"""`python prepare_dataset.py [--config x.yaml]`: the same as `moetune data` (default config: ./config.yaml)."""

import sys

from moetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
