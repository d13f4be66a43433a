"""`python train_moe.py --config x.yaml [section.key=value ...]`: the same as `moetune train` (default config: ./config.yaml)."""

import sys

from moetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
