"""What the training loop starts from: the tokenizer, the model and the dataloaders."""

from __future__ import annotations

import sys
from pathlib import Path

from moetune.config import Config
from moetune.run_dir import TOKENIZER_DIR


def build_training_inputs(config: Config, accelerator):
    """(tokenizer, model, train_loader, val_loader): tokenizer trained or loaded, model built, data packed.

    The main process goes first so a tokenizer trained on the data and the tokenized-data cache are
    built once and the other processes read them.
    """
    from transformers import AutoTokenizer

    from moetune.data.dataloaders import build_dataloaders, data_lines
    from moetune.data.record_table import iter_records, load_split_tables
    from moetune.data.tokenizer import load_run_tokenizer, tokenizer_training_texts
    from moetune.models.families import packs_by_position_ids
    from moetune.models.load.factory import build_model
    from moetune.models.load.kernels import flattens_packed_rows

    tokenizer_dir = Path(config.training.output_dir) / TOKENIZER_DIR
    with accelerator.main_process_first():
        if accelerator.is_main_process:  # saved into the run folder, where checkpoints and evaluation find it
            tokenizer = load_run_tokenizer(config, training_texts=lambda: tokenizer_training_texts(
                                               iter_records(load_split_tables(config).train)),
                                           save_dir=tokenizer_dir)
        else:  # what the main process just saved (output_dir is on a filesystem every node sees)
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_model(config, tokenizer, seed=config.training.seed,
                        gradient_checkpointing=config.training.gradient_checkpointing)
    _register_zero3_leaf_modules(accelerator, model)
    if config.advanced.torch_compile:
        from moetune.models.load.kernels import compile_decoder_layers

        compile_decoder_layers(model)
    with accelerator.main_process_first():
        train_loader, val_loader, data = build_dataloaders(
            config, tokenizer, packs_by_position_ids=packs_by_position_ids(model),
            flatten_packed_rows=flattens_packed_rows(model))
    if accelerator.is_main_process:
        s = data.stats
        efficiency = f", packing efficiency {s['train_packing_efficiency']:.1%}" if data.packed else ""
        unit = "pairs" if "train_pairs" in s else "samples"  # a paired preference objective counts pairs
        print(f"data: {s[f'train_{unit}']:,} training {unit} ({s['train_tokens']:,} tokens) in {s['train_rows']:,} rows"
              f"{efficiency}; {s.get(f'eval_{unit}', 0):,} validation {unit}", file=sys.stderr)
        for line in data_lines(s):
            print(f"data: {line}", file=sys.stderr)
    return tokenizer, model, train_loader, val_loader


def _register_zero3_leaf_modules(accelerator, model) -> None:
    """ZeRO-3 must gather an MoE block's experts as one unit, or ranks routing differently hang."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return
    from deepspeed.utils import set_z3_leaf_modules

    from moetune.models.families import family_of
    from moetune.models.layout import find_moe_blocks

    blocks = find_moe_blocks(model, family_of(model).router_name)
    classes = sorted({type(block.module) for block in blocks}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
        if accelerator.is_main_process:
            print(f"ZeRO-3: MoE blocks gathered whole as leaf modules: {', '.join(c.__name__ for c in classes)}",
                  file=sys.stderr)
