"""The layout of a run folder (``training.output_dir``), shared by train, eval and sweep.

A run writes into its folder::

    .moetune.lock            the lock one run holds for its lifetime
    .moetune-run.json        who holds the lock (pid, host), written when a run claims the folder
    config.yaml              the resolved config
    metrics.jsonl            one JSON object per logged step
    runs/                    TensorBoard (unless logging.logging_dir says elsewhere)
    tokenizer/               the run's tokenizer (trained on the data for random_init runs)
    reference_logps.pt       DPO/KTO's reference log-probabilities (training.precompute_ref_logps), read on resume
    checkpoint-<step>/       a complete checkpoint, with trainer_state.json (checkpoint-step-<n> /
                             checkpoint-epoch-<n> under training.checkpoint_naming: kind)
    .partial-checkpoint-*/   a checkpoint being written, renamed when complete
    adapter_config.json ...  the final adapter (or model.safetensors: the full model; esft_experts.*),
                             with its tokenizer files and PEFT's README.md
    merged/                  the merged model (post_training.merge_and_save)
    eval/                    `moetune eval`'s report (its default output folder)

Every name a run folder holds is here, and only names and their order: which stage writes or
reads what stays with that stage (:mod:`moetune.train.output_dir` derives from them what moetune
may overwrite). Nothing here imports torch or another stage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

LOCK_FILE = ".moetune.lock"
RUN_FILE = ".moetune-run.json"  # written when a run claims the folder; names the run holding the lock
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TMP_SUFFIX = ".tmp"  # config.yaml and metrics.jsonl are rewritten whole: into <name>.tmp, then renamed
TENSORBOARD_DIR = "runs"
TOKENIZER_DIR = "tokenizer"  # where a run keeps its tokenizer, beside its checkpoints
REFERENCE_LOGPS_FILE = "reference_logps.pt"  # computed before the first step; the reference is gone once training starts
MERGED_DIR = "merged"  # the merged model, unless post_training.merged_output_dir says elsewhere
EVAL_DIR = "eval"  # `moetune eval` writes its report here, inside the folder it evaluates, unless told elsewhere
STATE_FILE = "trainer_state.json"  # in every checkpoint: where the run stood
PARTIAL_PREFIX = ".partial-"  # a checkpoint being written, renamed to its name when complete

# checkpoint-<step> (training.checkpoint_naming: step), checkpoint-step-<step> / checkpoint-epoch-<epoch> (kind).
CHECKPOINT_NAME = r"checkpoint-(?:(step|epoch)-)?(\d+)"
CHECKPOINT_DIR = re.compile(f"^{CHECKPOINT_NAME}$")

# What a finished run leaves in output_dir besides its checkpoints: a PEFT adapter, a whole model
# (when no adapter trains), or the selected experts of an ESFT run (moetune.models.trainable.esft).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT writes one of them
MODEL_CARD = "README.md"  # PEFT's save_pretrained writes a model card beside the adapter
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
FULL_MODEL_WEIGHTS = "model*.safetensors"  # model.safetensors, or shards model-00001-of-00002.safetensors ...
FULL_MODEL_SHARD = r"model(?:-\d+-of-\d+)?\.safetensors"  # the same names, exactly
FULL_MODEL_INDEX = "model.safetensors.index.json"  # beside the shards
ESFT_FILES = ("esft_experts.json", "esft_experts.safetensors")

# What a tokenizer's save_pretrained writes (transformers 5; the first four for a fast tokenizer:
# the config, the whole tokenizer, the chat template and, when it has several, the folder of the
# others). The rest come from tokenizers saved in the older per-vocabulary formats (slow BPE, SentencePiece)
# and from transformers 4, whose folders moetune still reads and recognises.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "additional_chat_templates",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def checkpoint_dir_name(naming: str, step: int, epoch: int | None = None) -> str:
    """The folder name of a checkpoint saved at ``step``; ``epoch`` (counted from 1) for an end-of-epoch save.

    ``naming`` is ``training.checkpoint_naming``: ``step`` gives checkpoint-<step> for every save,
    ``kind`` gives checkpoint-epoch-<epoch> for end-of-epoch saves and checkpoint-step-<step> for the others.
    """
    if naming == "step":
        return f"checkpoint-{step}"
    return f"checkpoint-epoch-{epoch}" if epoch is not None else f"checkpoint-step-{step}"


def step_in_checkpoint_name(name: str) -> int | None:
    """The step a checkpoint folder's name states (None for checkpoint-epoch-<n> and for other names)."""
    match = CHECKPOINT_DIR.match(name)
    return int(match.group(2)) if match and match.group(1) != "epoch" else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (by step; at one step an epoch's save last)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)]
    return sorted(found, key=checkpoint_order)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (None when it has none)."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def checkpoint_order(path: Path) -> tuple[int, int, str]:
    """Sort key of a checkpoint folder: (step, 1 for an epoch's save else 0, name)."""
    step = step_in_checkpoint_name(path.name)
    if step is not None:
        return step, 0, path.name
    # checkpoint-epoch-<n> names its epoch; its step is in its state (-1 when unreadable: the oldest).
    try:
        step = int(json.loads((path / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = -1
    return step, 1, path.name


def holds_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved tokenizer (any of :data:`TOKENIZER_FILES`)."""
    return any((Path(folder) / name).exists() for name in TOKENIZER_FILES)


def has_final_weights(output_dir: str | Path) -> bool:
    """Whether the run in ``output_dir`` finished: its final adapter, full model or ESFT experts are saved there."""
    root = Path(output_dir)
    return ((root / ADAPTER_CONFIG).is_file() or any(root.glob(FULL_MODEL_WEIGHTS))
            or all((root / name).is_file() for name in ESFT_FILES))
