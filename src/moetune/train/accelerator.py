"""The Accelerator a run trains with, the launch checks made as it is built, and what the launch is.

Nothing here imports torch or accelerate at import time: the command line asks
:func:`is_main_process` and :func:`is_deepspeed_launch` before any verb has loaded them.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

from moetune.errors import ConfigError, UserError

if TYPE_CHECKING:
    from moetune.config import Config


def is_main_process() -> bool:
    """Whether this process is the launch's main process (the one that prints and writes files).

    accelerate's state answers once an Accelerator exists; before that, the rank the launcher gave
    this process in the variables accelerate itself reads to find it (torchrun / accelerate launch:
    RANK; mpirun: PMI_RANK, OMPI_COMM_WORLD_RANK, MV2_COMM_WORLD_RANK).
    """
    state = _accelerator_state()
    if state is not None:
        return state.is_main_process
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        rank = os.environ.get(name, "")
        if rank.isdigit():
            return int(rank) == 0
    return True


def is_deepspeed_launch() -> bool:
    """Whether this process runs under DeepSpeed (``accelerate launch`` with a DeepSpeed config).

    accelerate's state answers once an Accelerator exists. Before that only the launcher's
    ACCELERATE_USE_DEEPSPEED says it: accelerate's Accelerator and AcceleratorState decide from that
    variable themselves, with this same test, and offer no function for it; building a state to ask
    would fix the device and process group before the Accelerator is configured.
    """
    state = _accelerator_state()
    if state is not None:
        return state.deepspeed_plugin is not None
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _accelerator_state():
    """accelerate's AcceleratorState when an Accelerator was built in this process, else None.

    Without accelerate imported no state can exist, so it is not imported (with torch) just to ask.
    """
    state = sys.modules.get("accelerate.state")
    if state is None or state.AcceleratorState._shared_state == {}:
        return None
    return state.AcceleratorState()


def build_accelerator(config: Config):
    """An Accelerator for this config: precision, accumulation, trackers, seeded sampler, timeouts."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, set_seed

    from moetune.train.run_log import logging_dir, tracker_names

    t = config.training
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "no"
    handlers = [
        InitProcessGroupKwargs(timeout=timedelta(seconds=t.ddp_timeout), backend=t.ddp_backend),
        # Where a family's experts can get no tokens in a step, DDP must not wait for their gradients.
        DistributedDataParallelKwargs(find_unused_parameters=_experts_may_get_no_tokens(config)),
    ]
    # Without a GPU, plain and DDP runs need cpu=True (gloo); DeepSpeed brings its own CPU accelerator.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available() and not is_deepspeed_launch(),
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
    if config.moe.expert_parallel.backend == "deepspeed":
        check_deepspeed_moe_launch(config, accelerator)
    if config.advanced.use_cpu_offload:
        apply_cpu_offload(accelerator)
    if config.advanced.torch_compile:
        check_compile_launch(config, accelerator)
    return accelerator


def _experts_may_get_no_tokens(config: Config) -> bool:
    from moetune.models.load.factory import resolve_family

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
        import torch

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
    """``advanced.torch_compile`` compiles decoder layers; refuse the launches where that cannot trace (the
    config's own conflict, with ``moe.expert_parallel.backend: deepspeed``, is the schema's)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        raise UserError("advanced.torch_compile does not apply under ZeRO-3: its parameters are gathered by hooks "
                        "around every module, which torch.compile cannot trace through layer by layer. Use ZeRO-2 "
                        "(accelerate_config.yaml) or set advanced.torch_compile: false.")


def check_deepspeed_moe_launch(config: Config, accelerator) -> None:
    """``moe.expert_parallel.backend: deepspeed`` needs a DeepSpeed launch (not ZeRO-3) whose process count the
    expert-parallel size divides; anything else is a UserError before anything is built."""
    plugin = accelerator.state.deepspeed_plugin
    ep_size = config.moe.expert_parallel.size
    if plugin is None:
        # A DeepSpeed MoE layer gets its expert-parallel groups, and its experts their gradient
        # reduction, from the DeepSpeed engine; under DDP every rank would average other ranks' experts.
        raise UserError("moe.expert_parallel.backend: deepspeed needs the run launched under DeepSpeed: the DeepSpeed engine sets up "
                        "the expert-parallel groups and reduces expert gradients. Launch with an accelerate config "
                        "that uses DeepSpeed ZeRO-2, e.g. `accelerate launch --config_file accelerate_config.yaml -m "
                        "moetune train --config <this config>` (or `bash train.sh`), or set moe.expert_parallel.backend: native.")
    if plugin.zero_stage == 3:
        raise UserError("moe.expert_parallel.backend: deepspeed cannot run under ZeRO-3: DeepSpeed does not support its MoE layers "
                        "with ZeRO stage 3. Launch with ZeRO-2 (accelerate_config.yaml, deepspeed_moe_config.json) or "
                        "use moe.expert_parallel.backend: native, which ZeRO-3 supports.")
    if plugin.deepspeed_config.get("use_data_before_expert_parallelism"):
        raise UserError("moe.expert_parallel.backend: deepspeed places experts on runs of consecutive ranks; remove "
                        "\"use_data_before_expert_parallelism\" from the DeepSpeed config.")
    if accelerator.num_processes % ep_size:
        raise ConfigError("moe.expert_parallel.size", f"moe.expert_parallel.size ({ep_size}) must divide the number "
                          f"of processes ({accelerator.num_processes}); each group of {ep_size} ranks shares the experts.")
