"""What a run leaves in output_dir when its loop ends: the final adapter (or model), and the merged model."""

from __future__ import annotations

import sys
from pathlib import Path

from moetune.config import Config
from moetune.run_dir import MERGED_DIR
from moetune.train.checkpoint import save_trainable_files
from moetune.train.output_dir import final_files_or_no_space


def save_final(accelerator, model, tokenizer, config: Config) -> None:
    """The final adapter (or model) and tokenizer into output_dir; the merged model when asked for.
    Always in the native layout (``moe.expert_parallel.backend: deepspeed`` blocks are converted back)."""
    from moetune.models.trainable.esft import merge_esft

    t = config.training

    def merge(unwrapped) -> None:
        merged_dir = Path(config.post_training.merged_output_dir or Path(t.output_dir) / MERGED_DIR)
        merged = unwrapped.merge_and_unload() if hasattr(unwrapped, "merge_and_unload") else merge_esft(unwrapped)
        model_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
        with final_files_or_no_space(merged_dir, model_bytes):
            merged.save_pretrained(merged_dir, safe_serialization=True)
            tokenizer.save_pretrained(merged_dir)
        print(f"merged model saved to {merged_dir}", file=sys.stderr)

    # Every rank calls it: with expert parallelism the experts are gathered from all of them.
    save_trainable_files(accelerator, model, t.output_dir, tokenizer, room=final_files_or_no_space,
                         then=merge if config.post_training.merge_and_save else None)
