#!/usr/bin/env bash
# Launch `moetune train` through Accelerate (DeepSpeed ZeRO-2 from accelerate_config.yaml by default).
#
#   bash train.sh                                        # config.yaml on every GPU of this machine
#   CONFIG=configs/my.yaml bash train.sh training.learning_rate=1e-4   # extra arguments are overrides
#   ACCELERATE_CONFIG=configs/accelerate/zero3.yaml bash train.sh       # ZeRO-3 (or configs/accelerate/fsdp.yaml)
#
# Multi-node: run the same command on every node, each with its own MACHINE_RANK:
#   NUM_GPUS=8 NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 bash train.sh
#
# NUM_GPUS is per machine (default: all GPUs nvidia-smi lists). DRY_RUN=1 prints the launch command
# instead of running it.
set -euo pipefail

CONFIG=${CONFIG:-config.yaml}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_config.yaml}
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
PYTHON=${PYTHON:-python}

die() { echo "train.sh: $*" >&2; exit 2; }

[[ -f "$CONFIG" ]] || die "config file '$CONFIG' not found (set CONFIG=path/to/config.yaml)."
[[ -f "$ACCELERATE_CONFIG" ]] || die "accelerate config '$ACCELERATE_CONFIG' not found (set ACCELERATE_CONFIG=...)."

if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS_HERE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
else
  GPUS_HERE=0
fi
NUM_GPUS=${NUM_GPUS:-$GPUS_HERE}
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "no GPU found (nvidia-smi lists $GPUS_HERE); set NUM_GPUS, or train on CPU with: moetune train --config $CONFIG"
if [[ -z "${DRY_RUN:-}" && "$NUM_GPUS" -gt "$GPUS_HERE" ]]; then
  die "NUM_GPUS=$NUM_GPUS but this machine has $GPUS_HERE GPU(s) (nvidia-smi -L). Lower NUM_GPUS or check CUDA_VISIBLE_DEVICES."
fi
TOTAL_PROCESSES=$((NUM_GPUS * NUM_MACHINES))

# Validate the config (with the overrides) before spending minutes on the launch, and read what to print.
# The DeepSpeed JSON the launch will hand to every process is read too: its "moe" block, if any, trains.
read -r BATCH ACCUM OUTPUT_DIR LOG_DIR < <("$PYTHON" - "$ACCELERATE_CONFIG" "$CONFIG" "$@" <<'PY'
import sys
import yaml
from moetune.config import load_config
from moetune.errors import UserError
try:
    with open(sys.argv[1], encoding="utf-8") as f:
        launch = yaml.safe_load(f) or {}
except (OSError, yaml.YAMLError) as err:
    print(f"train.sh: cannot read the accelerate config {sys.argv[1]}: {err}", file=sys.stderr)
    sys.exit(2)
deepspeed = launch.get("deepspeed_config") if isinstance(launch, dict) else None
deepspeed_json = deepspeed.get("deepspeed_config_file") if isinstance(deepspeed, dict) else None
try:
    c = load_config(sys.argv[2], sys.argv[3:], deepspeed_config=deepspeed_json)
except UserError as err:
    print(f"train.sh: {err}", file=sys.stderr)
    sys.exit(2)
t = c.training
print(t.per_device_train_batch_size, t.gradient_accumulation_steps, t.output_dir, c.logging.logging_dir or f"{t.output_dir}/runs")
PY
) || die "the config is not valid (see above)."

echo "moetune: $TOTAL_PROCESSES process(es) on $NUM_MACHINES machine(s) x $NUM_GPUS GPU(s)"
echo "moetune: effective batch size = $BATCH per device x $ACCUM accumulation x $TOTAL_PROCESSES processes = $((BATCH * ACCUM * TOTAL_PROCESSES)) sequences per step"
echo "moetune: TensorBoard logs in $LOG_DIR  (tensorboard --logdir $LOG_DIR)"

LAUNCH=("$PYTHON" -m accelerate.commands.launch
  --config_file "$ACCELERATE_CONFIG"
  --num_processes "$TOTAL_PROCESSES"
  --num_machines "$NUM_MACHINES"
  --machine_rank "$MACHINE_RANK"
  --main_process_ip "$MAIN_PROCESS_IP"
  --main_process_port "$MAIN_PROCESS_PORT"
  -m moetune train --config "$CONFIG" "$@")

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${LAUNCH[@]}"; echo
  exit 0
fi
exec "${LAUNCH[@]}"
