"""`python evaluate_moe.py --adapter-path DIR --max-samples N`: the same as `moetune eval` (default config: ./config.yaml)."""

import sys

from moetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
