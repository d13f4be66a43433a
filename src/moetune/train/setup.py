"""What the training loop needs built before it starts, and what it does after it ends."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from moetune.config import Config, TrainingConfig
from moetune.errors import ConfigError, UserError
from moetune.train.checkpoint import save_trainable_weights, weights_are_sharded
from moetune.train.output_dir import final_files_or_no_space
from moetune.train.run_log import logging_dir, tracker_names

TOKENIZER_DIR = "tokenizer"


def build_accelerator(config: Config):
    """An Accelerator for this config: precision, accumulation, trackers, seeded sampler, timeouts."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed

    t = config.training
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "no"
    handlers = [
        InitProcessGroupKwargs(timeout=timedelta(seconds=t.ddp_timeout), backend=t.ddp_backend),
        # Where a family's experts can get no tokens in a step, DDP must not wait for their gradients.
        DistributedDataParallelKwargs(find_unused_parameters=_experts_may_get_no_tokens(config)),
    ]
    # Without a GPU, plain and DDP runs need cpu=True (gloo); DeepSpeed brings its own CPU accelerator.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available() and not deepspeed,
        mixed_precision=precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=tracker_names(config) or None,
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=str(logging_dir(config))),
        # Seeded by training.seed and the epoch: the same order after a resume, on every rank.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    set_seed(t.seed)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = t.max_grad_norm  # accelerate would fill 1.0
    if config.moe.backend == "deepspeed":
        check_deepspeed_moe_launch(config, accelerator)
    if config.advanced.use_cpu_offload:
        apply_cpu_offload(accelerator)
    if config.advanced.torch_compile:
        check_compile_launch(config, accelerator)
    return accelerator


def _experts_may_get_no_tokens(config: Config) -> bool:
    from moetune.models.factory import resolve_family

    return resolve_family(config.model).experts_may_get_no_tokens


def apply_cpu_offload(accelerator) -> None:
    """``advanced.use_cpu_offload`` in the distributed engine's own settings, before it is built.

    DeepSpeed: optimizer state (ZeRO-1/2/3) and parameters (ZeRO-3) go to CPU memory. FSDP: its
    parameter offload. A plain or DDP run has nothing that offloads, so it is refused rather than ignored.
    """
    plugin = accelerator.state.deepspeed_plugin
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        if stage == 0:
            raise UserError("advanced.use_cpu_offload needs ZeRO stage 1, 2 or 3 (it offloads the state ZeRO "
                            "partitions); the DeepSpeed config sets stage 0. Use deepspeed_moe_config.json (ZeRO-2) "
                            "or configs/zero3.json.")
        where = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        zero["offload_optimizer"] = dict(where)
        if stage == 3:
            zero["offload_param"] = dict(where)
        # moetune builds its own optimizer; DeepSpeed otherwise insists on its CPU Adam for offloading.
        plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
    elif fsdp is not None:
        fsdp.cpu_offload = True
        fsdp.set_cpu_offload()
        fsdp.validate_cpu_offload()
    else:
        raise UserError("advanced.use_cpu_offload needs a DeepSpeed or FSDP launch: those engines keep optimizer "
                        "state (and with ZeRO-3 or FSDP the parameters) in CPU memory, a plain or DDP run cannot. "
                        "Launch with `bash train.sh` (accelerate_config.yaml: DeepSpeed ZeRO-2), "
                        "configs/accelerate/zero3.yaml or configs/accelerate/fsdp.yaml, or set "
                        "advanced.use_cpu_offload: false.")


def log_cpu_offload(accelerator) -> None:
    """After ``prepare``: what the engine itself reports it offloads (so a config that did not take shows)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None or not accelerator.is_main_process:
        return
    engine = wrapped.engine
    offloaded = [name for name, on in (("optimizer state", engine.zero_cpu_offload()),
                                       ("parameters", engine.zero_offload_param() is not None)) if on]
    print(f"DeepSpeed ZeRO-{engine.zero_optimization_stage()}: {' and '.join(offloaded) or 'nothing'} offloaded to CPU "
          "(advanced.use_cpu_offload)", file=sys.stderr)


def check_compile_launch(config: Config, accelerator) -> None:
    """``advanced.torch_compile`` compiles decoder layers; refuse the launches where that cannot trace."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        raise UserError("advanced.torch_compile does not apply under ZeRO-3: its parameters are gathered by hooks "
                        "around every module, which torch.compile cannot trace through layer by layer. Use ZeRO-2 "
                        "(accelerate_config.yaml) or set advanced.torch_compile: false.")
    if config.moe.backend == "deepspeed":
        raise UserError("advanced.torch_compile does not apply to moe.backend: deepspeed, whose MoE layers exchange "
                        "tokens between ranks inside the forward pass; use moe.backend: native to compile.")


def check_deepspeed_moe_launch(config: Config, accelerator) -> None:
    """``moe.backend: deepspeed`` needs a DeepSpeed launch (not ZeRO-3) whose process count the
    expert-parallel size divides; anything else is a UserError before anything is built."""
    plugin = accelerator.state.deepspeed_plugin
    ep_size = config.moe.expert_parallel_size
    if plugin is None:
        # A DeepSpeed MoE layer gets its expert-parallel groups, and its experts their gradient
        # reduction, from the DeepSpeed engine; under DDP every rank would average other ranks' experts.
        raise UserError("moe.backend: deepspeed needs the run launched under DeepSpeed: the DeepSpeed engine sets up "
                        "the expert-parallel groups and reduces expert gradients. Launch with an accelerate config "
                        "that uses DeepSpeed ZeRO-2, e.g. `accelerate launch --config_file accelerate_config.yaml -m "
                        "moetune train --config <this config>` (or `bash train.sh`), or set moe.backend: native.")
    if plugin.zero_stage == 3:
        raise UserError("moe.backend: deepspeed cannot run under ZeRO-3: DeepSpeed does not support its MoE layers "
                        "with ZeRO stage 3. Launch with ZeRO-2 (accelerate_config.yaml, deepspeed_moe_config.json) or "
                        "use moe.backend: native, which ZeRO-3 supports.")
    if plugin.deepspeed_config.get("use_data_before_expert_parallelism"):
        raise UserError("moe.backend: deepspeed places experts on runs of consecutive ranks; remove "
                        "\"use_data_before_expert_parallelism\" from the DeepSpeed config.")
    if accelerator.num_processes % ep_size:
        raise ConfigError("moe.expert_parallel_size", f"moe.expert_parallel_size ({ep_size}) must divide the number "
                          f"of processes ({accelerator.num_processes}); each group of {ep_size} ranks shares the experts.")


def apply_legacy_deepspeed_moe(config: Config) -> Config:
    """Read the ``"moe"`` block of an older DeepSpeed JSON (given to ``accelerate launch``) into ``moe.*``.

    Older setups kept num_experts / top_k / ... in deepspeed_moe_config.json, where DeepSpeed itself
    ignores them. They are taken over unless config.yaml sets the same key to another value, which is
    an error naming both; anything without a moe.* equivalent is rejected by the reader.
    """
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or not Path(path).is_file():
        return config
    from moetune.config import MoeConfig
    from moetune.models.deepspeed_moe import read_legacy_deepspeed_moe

    legacy = read_legacy_deepspeed_moe(path)
    if not legacy:
        return config
    defaults = MoeConfig()
    for key, value in legacy.items():
        mine = getattr(config.moe, key)
        if mine != getattr(defaults, key) and mine != value:
            raise UserError(f"moe.{key} is {mine!r} in the config but {value!r} in the \"moe\" block of {path}; "
                            f"keep it in one place: the moe section of the config (and drop the block from {path}).")
    print(f"moetune: read {', '.join(f'moe.{k}={v}' for k, v in legacy.items())} from the \"moe\" block of {path}; "
          "move them to the moe section of the config.", file=sys.stderr)
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, **legacy))


def build_training_inputs(config: Config, accelerator):
    """(tokenizer, model, train_loader, val_loader): tokenizer trained or loaded, model built, data packed.

    The main process goes first so a tokenizer trained on the data and the tokenized-data cache are
    built once and the other processes read them.
    """
    from transformers import AutoTokenizer

    from moetune.data.packing import build_dataloaders
    from moetune.data.split import load_splits
    from moetune.data.tokenizer import load_or_train_tokenizer
    from moetune.models.factory import build_model
    from moetune.models.kernels import packs_by_position_ids

    tokenizer_dir = Path(config.training.output_dir) / TOKENIZER_DIR
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            texts = None
            if config.model.random_init and config.model.tokenizer is None and not (tokenizer_dir / "tokenizer.json").is_file():
                train_records, _ = load_splits(config)
                texts = (r["text"] if "text" in r else r["prompt"] + r["completion"] for r in train_records)
            tokenizer = load_or_train_tokenizer(config, texts, save_dir=tokenizer_dir)
        else:  # what the main process just saved (output_dir is on a filesystem every node sees)
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_model(config, tokenizer, seed=config.training.seed,
                        gradient_checkpointing=config.training.gradient_checkpointing)
    _register_zero3_leaf_modules(accelerator, model)
    if config.advanced.torch_compile:
        from moetune.models.kernels import compile_decoder_layers

        compile_decoder_layers(model)
    with accelerator.main_process_first():
        train_loader, val_loader, data = build_dataloaders(
            config, tokenizer, accepts_position_ids=packs_by_position_ids(model))
    if accelerator.is_main_process:
        s = data.stats
        efficiency = f", packing efficiency {s['train_packing_efficiency']:.1%}" if data.packed else ""
        print(f"data: {s['train_samples']:,} training samples ({s['train_tokens']:,} tokens) in {s['train_rows']:,} rows"
              f"{efficiency}; {s.get('eval_samples', 0):,} validation samples", file=sys.stderr)
    return tokenizer, model, train_loader, val_loader


def _register_zero3_leaf_modules(accelerator, model) -> None:
    """ZeRO-3 must gather an MoE block's experts as one unit, or ranks routing differently hang."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return
    from deepspeed.utils import set_z3_leaf_modules

    from moetune.models.layout import find_moe_blocks

    classes = sorted({type(block.module) for block in find_moe_blocks(model)}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
        if accelerator.is_main_process:
            print(f"ZeRO-3: MoE blocks gathered whole as leaf modules: {', '.join(c.__name__ for c in classes)}",
                  file=sys.stderr)


def router_bias_updater(model, config: Config):
    """``update(step_counts)`` applying ``moe.router_bias_update_rate`` to ``model``'s correction
    biases after a step, or None when the rate is 0 (the model's build checked that it has them)."""
    rate = config.moe.router_bias_update_rate
    if rate <= 0:
        return None
    from moetune.models.balance import update_router_biases
    from moetune.models.routing import family_of_model

    family = family_of_model(model)
    return lambda counts: update_router_biases(model, family, counts, rate)


def total_optimizer_steps(t: TrainingConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, or epochs x ceil(batches / accumulation)."""
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_train_epochs * math.ceil(batches_per_epoch / t.gradient_accumulation_steps)))


def save_final(accelerator, model, tokenizer, config: Config) -> None:
    """The final adapter (or model) and tokenizer into output_dir; the merged model when asked for.
    Always in the native layout (``moe.backend: deepspeed`` blocks are converted back)."""
    from moetune.models.deepspeed_moe import native_moe_layout
    from moetune.models.esft import merge_esft

    t = config.training
    unwrapped = accelerator.unwrap_model(model)
    # Every rank enters: with expert parallelism the experts are gathered from all of them.
    with native_moe_layout(unwrapped):
        state_dict = accelerator.get_state_dict(model) if weights_are_sharded(accelerator) else None
        if not accelerator.is_main_process:
            return
        trainable_bytes = sum(p.numel() * p.element_size() for p in unwrapped.parameters() if p.requires_grad)
        with final_files_or_no_space(Path(t.output_dir), trainable_bytes):
            save_trainable_weights(unwrapped, t.output_dir, state_dict)
            tokenizer.save_pretrained(t.output_dir)
        if config.post_training.merge_and_save:
            merged_dir = Path(config.post_training.merged_output_dir or Path(t.output_dir) / "merged")
            merged = unwrapped.merge_and_unload() if hasattr(unwrapped, "merge_and_unload") else merge_esft(unwrapped)
            model_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
            with final_files_or_no_space(merged_dir, model_bytes):
                merged.save_pretrained(merged_dir, safe_serialization=True)
                tokenizer.save_pretrained(merged_dir)
            print(f"merged model saved to {merged_dir}", file=sys.stderr)


def out_of_memory_message(config: Config) -> str:
    t = config.training
    return (f"Out of memory at per_device_train_batch_size={t.per_device_train_batch_size}, "
            f"model.max_seq_length={config.model.max_seq_length}. Remedies: lower training.per_device_train_batch_size "
            f"and raise training.gradient_accumulation_steps (same effective batch); "
            f"{'keep' if t.gradient_checkpointing else 'set'} training.gradient_checkpointing=true; shorten "
            "model.max_seq_length; use ZeRO-3 (configs/accelerate/zero3.yaml) and, under DeepSpeed or FSDP, set "
            "advanced.use_cpu_offload=true; "
            "or load the base model in 4-bit (model.load_in_4bit=true). Resume with training.resume_from_checkpoint=latest.")
