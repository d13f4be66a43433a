"""`python train_mpt7b_moe_accelerate.py --model_id ... --data_file ... [--convert_to_moe] ...`: the Accelerate
MPT-7B-MoE trainer's command line; each flag is a config override on configs/mpt7b_moe.yaml (see --help).
Several GPUs: accelerate launch --config_file accelerate_config.yaml train_mpt7b_moe_accelerate.py [flags]."""

import sys
from pathlib import Path

from moetune.mpt_accelerate_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], checkout=Path(__file__).resolve().parent))
