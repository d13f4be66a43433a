"""`python generate.py --adapter-path DIR --prompts test_prompts.txt [--output out.jsonl]`: the same as `moetune generate` (default config: ./config.yaml)."""

import sys

from moetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
