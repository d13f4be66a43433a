"""``moetune train``'s pre-check: on a GPU machine, the run is planned (:mod:`moetune.plan`) before any weight is
loaded, and a plan over the visible GPUs' memory is said in one paragraph: a warning, or with
``training.plan_check: error`` a refusal. On a CPU machine nothing is planned.

The plan reads the model's config.json from a local folder or the Hugging Face cache only; a model not
downloaded yet is not planned (the run goes on and downloads it).
"""

from __future__ import annotations

import logging

from moetune.errors import UserError

logger = logging.getLogger(__name__)


def check_plan(config, accelerator) -> None:
    """Plan ``config`` under ``accelerator``'s launch on the visible GPU; warn or refuse when it does not fit."""
    from moetune.plan import gpus
    from moetune.plan.gpus import GIB
    from moetune.plan.launch import launch_of
    from moetune.plan.report import make_plan

    gpu = gpus.visible_gpu()
    if gpu is None:  # a CPU machine
        return
    try:
        plan = make_plan(config, launch=launch_of(accelerator, config.advanced.use_cpu_offload), gpu=gpu)
    except UserError as err:  # e.g. a hub model whose config.json is not downloaded yet
        logger.info("plan check skipped: %s", err)
        return
    except Exception as err:  # noqa: BLE001 - a planning failure never stops a run that may well fit
        logger.warning("plan check failed (%s: %s); training goes on", type(err).__name__, err)
        return
    if plan.fits:
        logger.info("plan: %.1f GiB per GPU of %.1f GiB; micro-batches up to %d fit", plan.total() / GIB,
                    plan.gpu.memory / GIB, plan.largest_batch())
        return
    message = over_memory_message(plan)
    if config.training.plan_check == "error":
        raise UserError(message + " (training.plan_check: error; set it to warn to try anyway).")
    logger.warning("%s (training.plan_check: warn, so the run goes on).", message)


def over_memory_message(plan) -> str:
    """One paragraph: the planned total and its parts, the GPU's memory, the largest micro-batch that fits, the knobs."""
    from moetune.plan.gpus import GIB

    s = plan.states
    rows = plan.batch * plan.rows_per_sample
    reference = f"reference copy {plan.reference / GIB:.1f}, " if plan.reference else ""
    parts = (f"weights {s.weights / GIB:.1f}, gradients and optimizer states {(s.gradients + s.optimizer) / GIB:.1f}, "
             f"{reference}activations {plan.activations.at(rows, plan.checkpointing) / GIB:.1f}, "
             f"LM loss {plan.loss.at(rows) / GIB:.1f}, allowance {plan.allowance() / GIB:.1f}")
    largest = plan.largest_batch()
    fit = (f"the largest micro-batch that fits is {largest} (training.per_device_train_batch_size)" if largest
           else "not even micro-batch 1 fits")
    knobs = "; ".join(plan.remedies)
    return (f"This run is planned at {plan.total() / GIB:.1f} GiB per GPU ({parts} GiB) at micro-batch {plan.batch} x "
            f"{plan.seq_len} tokens, and the GPU ({plan.gpu.name}) has {plan.gpu.memory / GIB:.1f} GiB: {fit}."
            + (f" What would fit: {knobs}." if knobs else "") + " `moetune plan` shows the whole plan")
