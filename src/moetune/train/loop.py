"""`moetune train`: one readable training loop on Accelerate (DDP, FSDP, DeepSpeed ZeRO-2/3).

build -> accelerator.prepare -> loop (lr, forward, losses, backward under accumulate, clip, step,
log, eval, save) -> final save. Variants are config values and explicit ifs, not callbacks.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moetune.config import Config
from moetune.errors import OutOfMemory, UserError
from moetune.models.loss.objective import compute_losses, step_token_counts
from moetune.models.routing.capture import expert_token_counts
from moetune.models.trainable.weights import load_trainable_weights
from moetune.run_dir import checkpoint_dir_name
from moetune.train.accelerator import build_accelerator, log_cpu_offload
from moetune.train.checkpoint import (
    TrainerState,
    install_adapter_hooks,
    load_checkpoint,
    prepare_output_dir,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from moetune.train.expert_usage import summarize_usage, usage_heatmap, usage_scalars, usage_warnings
from moetune.train.final_save import save_final
from moetune.train.inputs import build_training_inputs
from moetune.train.log_window import LogWindow, console_line, epoch_of, eval_console_line
from moetune.train.optim import (
    build_optimizer,
    build_scheduler,
    checkpoint_peak_lr,
    describe_schedule,
    restart_schedule,
    schedule_differs,
    schedule_summary,
    total_optimizer_steps,
)
from moetune.train.out_of_memory import AttemptFiles, halved_batch, out_of_memory_message
from moetune.train.output_dir import check_output_dir, save_run_config
from moetune.train.plan_check import check_plan
from moetune.train.preflight import check_before_training
from moetune.train.reference import check_reference_fits, frozen_copy, make_references, needs_frozen_copy
from moetune.train.run_lock import RunLock
from moetune.train.run_log import RunLog
from moetune.train.signals import StopSignals
from moetune.train.validation_loss import evaluate_loss, evaluate_preference


def train(config: Config) -> int:
    """Train as ``config`` says. Returns the process exit code: 0, 1 after a NaN/inf stop, 128 + the signal
    number after SIGTERM / SIGINT in the loop (a signal before the loop raises StoppedBySignal).

    The main process holds ``output_dir``'s lock for the whole run. Running out of memory is an
    OutOfMemory naming the remedies; with ``training.auto_find_batch_size`` the attempt is retried with
    half the per-device batch and twice the accumulation, so the effective batch (and the tuned
    learning rate) stays the same, once what the attempt wrote is removed (:mod:`moetune.train.out_of_memory`).
    """
    stop, run_lock = StopSignals(), RunLock(config.training.output_dir)
    try:
        # What validate checks, before anything is built or loaded: the config against the run folder and
        # against its model on the meta device (a hub model's config is read for it).
        checked = check_before_training(config, read_hub=True)
        check_reference_fits(config, checked.weight_bytes, checked.adapter)
        return _train_retrying(config, stop, run_lock)
    finally:
        run_lock.release()
        stop.restore()


def _train_retrying(config: Config, stop: StopSignals, run_lock: RunLock) -> int:
    # An out-of-memory error anywhere (model build, prepare, a step, an evaluation, a save) is one
    # failed attempt; the retry starts, or resumes, from what the folder held before the first.
    files = AttemptFiles(config.training.output_dir)
    while True:
        try:
            return _train_once(config, stop, run_lock, files)
        except torch.OutOfMemoryError:
            smaller = halved_batch(config)
            if smaller is None:
                raise OutOfMemory(out_of_memory_message(config)) from None
        # Out of the except block, so the failed attempt's frames (and its model) can be freed.
        t, files.failed = config.training, True
        print(f"moetune: out of memory at per_device_train_batch_size={t.per_device_train_batch_size}; retrying "
              f"with {smaller.training.per_device_train_batch_size} x {smaller.training.gradient_accumulation_steps} "
              "accumulation", file=sys.stderr)
        config = smaller
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _train_once(config: Config, stop: StopSignals, run_lock: RunLock, files: AttemptFiles) -> int:
    t = config.training
    stop.in_loop = False
    if not Path(config.data.output_path).is_file():  # before anything is created or downloaded
        raise UserError(f"data.output_path {config.data.output_path} does not exist; build it first with "
                        "`moetune data --config <this config>` (or python prepare_dataset.py).")
    check_output_dir(t.output_dir)  # before anything is created or built
    files.record()
    accelerator = build_accelerator(config)
    check_plan(config, accelerator)  # on a GPU machine, before any weight is loaded
    if files.failed:  # only what the attempt that ran out of memory wrote
        if accelerator.is_main_process:
            files.remove_added()
        accelerator.wait_for_everyone()
    resume_from = stop.resuming_from = resolve_resume(t.resume_from_checkpoint, t.output_dir)
    if accelerator.is_main_process:
        run_lock.acquire()
        prepare_output_dir(t.output_dir, resuming=resume_from is not None, overwrite=t.overwrite_output_dir)
        save_run_config(config, t.output_dir)
    accelerator.wait_for_everyone()

    tokenizer, model, train_loader, val_loader = build_training_inputs(config, accelerator)
    copied = frozen_copy(model, accelerator) if needs_frozen_copy(config, model) else None  # DPO/KTO without an adapter
    optimizer = build_optimizer(model, t)
    total_steps = total_optimizer_steps(t, len(train_loader))
    scheduler = build_scheduler(optimizer, t, total_steps)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)
    install_adapter_hooks(accelerator)
    # Before a checkpoint's weights are loaded: a precomputed reference is the policy as it starts.
    train_reference, eval_reference = make_references(config, model, copied, accelerator, train_loader, val_loader)
    if config.advanced.use_cpu_offload:
        log_cpu_offload(accelerator)
    state = load_checkpoint(accelerator, resume_from) if resume_from else TrainerState()
    log = RunLog(accelerator, config, resumed_at_step=state.global_step if resume_from else None)
    state.lr_schedule = _resumed_lr_schedule(state, scheduler, t, total_steps, log) if resume_from else \
        schedule_summary(t, total_steps)
    last_saved = resume_from  # the checkpoint to go back to when the loss diverges
    update_biases = _router_bias_updater(accelerator.unwrap_model(model), config)  # None unless moe.router_bias_update_rate
    usage = None  # (MoE layers, experts) routed-token counts since the last log line
    window_log = LogWindow(accelerator.device, t.objective)  # sums since the last log line
    bad_steps = 0
    eval_every = t.eval_steps or max(1, total_steps // max(1, math.ceil(t.num_train_epochs)))
    progress = tqdm(total=total_steps, initial=state.global_step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    stop.in_loop = True  # from here a signal saves a checkpoint at the next step
    done = state.global_step >= total_steps
    try:
        while not done:
            if state.batches_done_in_epoch >= len(train_loader):  # a checkpoint of an older version, saved at an epoch's end
                state.epoch, state.batches_done_in_epoch = state.epoch + 1, 0
            train_loader.set_epoch(state.epoch)  # the seeded sampler reshuffles per epoch, the same on resume
            batches = accelerator.skip_first_batches(train_loader, state.batches_done_in_epoch)
            for window in accumulation_windows(batches, t.gradient_accumulation_steps):
                # The step's loss is a per-token mean over every micro-batch of every process, so the
                # token counts are summed before the first backward (one small all-reduce per step).
                step_tokens = accelerator.reduce(sum(step_token_counts(batch) for batch in window), "sum")
                step_usage = None
                for index, batch in enumerate(window):
                    last = index == len(window) - 1
                    with accumulating(accelerator, model, sync=last):
                        parts = compute_losses(model, batch, config, train_reference)
                        backward_share(accelerator, parts.objective(step_tokens))
                    window_log.add(parts, batch)
                    if parts.routing and (config.moe.monitor.expert_usage or update_biases is not None):
                        counts = expert_token_counts(parts.routing, batch.get("attention_mask"))
                        step_usage = counts if step_usage is None else step_usage + counts
                    # Let go of this micro-batch's losses and routing (every MoE layer's router logits, chosen
                    # experts and weights) before the next forward pass. Small as they are, they were allocated
                    # among this forward's activations: kept alive through the next one, they pin the allocator's
                    # blocks between them, so the next batch's activations (padded to another length) cannot reuse
                    # the memory around them and the heap grows (docs/benchmarks.md, DPO peak memory).
                    del parts
                if step_usage is not None and config.moe.monitor.expert_usage:
                    usage = step_usage if usage is None else usage + step_usage
                state.batches_done_in_epoch += len(window)
                epoch_ended = state.batches_done_in_epoch >= len(train_loader)
                step_lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged with it)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
                step_is_finite = window_log.step_is_finite(grad_norm)
                if step_is_finite:
                    optimizer.step()
                    scheduler.step()
                    if update_biases is not None and step_usage is not None:
                        update_biases(accelerator.reduce(step_usage, "sum"))
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                progress.update(1)
                if not step_is_finite:
                    bad_steps += 1
                    log.warn(f"step {state.global_step}: loss or gradient is NaN/inf; the update was skipped "
                             f"({bad_steps} in a row, limit advanced.max_bad_steps={config.advanced.max_bad_steps})")
                    if bad_steps >= config.advanced.max_bad_steps:
                        log.warn(_diverged_message(state.global_step, bad_steps, last_saved))
                        return 1
                    continue
                bad_steps = 0

                if state.global_step % t.logging_steps == 0 or state.global_step == total_steps:
                    record = window_log.flush(accelerator, state, step_lr, grad_norm, len(train_loader))
                    if usage is not None:
                        _add_expert_usage(record, accelerator.reduce(usage, "sum"), config, log, state.global_step)
                        usage = None
                    log.write(record, console=console_line(record))
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

                improved = False
                if val_loader is not None and (state.global_step % eval_every == 0 or state.global_step == total_steps):
                    if t.objective == "sft":
                        metrics = evaluate_loss(model, val_loader, accelerator, _eval_batches(config))
                    else:
                        metrics = evaluate_preference(model, val_loader, accelerator, config, eval_reference,
                                                      _eval_batches(config))
                    improved = _track_best(state, metrics[t.metric_for_best_model], config)
                    log.write({"step": state.global_step, "epoch": epoch_of(state, len(train_loader)), **metrics},
                              console=eval_console_line(state.global_step, metrics) + (" (best)" if improved else ""))

                stopping = stop.requested(accelerator)
                if epoch_ended:  # before saving, so a checkpoint at an epoch's end resumes at the next one
                    state.epoch, state.batches_done_in_epoch = state.epoch + 1, 0
                # The best step is always saved when the run ends on the best model, so it can be loaded back.
                for name in _checkpoints_due(t, state, epoch_ended, stopping or (improved and t.load_best_model_at_end)):
                    path = last_saved = save_checkpoint(accelerator, t.output_dir, state, name, tokenizer)
                    if accelerator.is_main_process:
                        rotate_checkpoints(t.output_dir, t.save_total_limit, keep=state.best_checkpoint)
                if stopping:
                    log.warn(f"{stop.name} received: saved {path}; resume with training.resume_from_checkpoint=latest")
                    return stop.exit_code
                done = _early_stop(state, config) or state.global_step >= total_steps
                if done:
                    break
    finally:  # also on a NaN stop, a signal or an error: flush the trackers
        progress.close()
        log.close()

    if t.load_best_model_at_end and state.best_checkpoint:
        load_trainable_weights(accelerator.unwrap_model(model), Path(t.output_dir) / state.best_checkpoint)
        log.warn(f"loaded the best checkpoint ({state.best_checkpoint}) before the final save")
    save_final(accelerator, model, tokenizer, config)
    return 0


def accumulation_windows(batches, size: int):
    """The micro-batches of each optimizer step, as lists of ``size`` (the last of an epoch may be shorter).

    The whole window is fetched first so its token count is known before the first backward.
    """
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


@contextlib.contextmanager
def accumulating(accelerator, model, sync: bool):
    """One micro-batch of a step: gradients are synchronised (and the optimizer may step) only on the last.

    Set by hand rather than by ``accelerator.accumulate``, which counts batches itself and would end a
    step early once a prefetched window has reached the end of the dataloader.
    """
    accelerator.gradient_state._set_sync_gradients(sync)
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        yield


def backward_share(accelerator, objective: torch.Tensor) -> None:
    """Backward one micro-batch's share of the step's per-token mean.

    The shares already sum to the step's loss, but accelerate divides each by the accumulation steps
    (DeepSpeed's engine, unless told not to) and DDP and ZeRO average gradients over the processes;
    both are undone here, so the gradient is exactly that of the step's per-token mean.
    """
    from accelerate.utils import DistributedType

    objective = objective * accelerator.num_processes
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.backward(objective, scale_wrt_gas=False)
    else:
        accelerator.backward(objective * accelerator.gradient_accumulation_steps)


def _resumed_lr_schedule(state: TrainerState, scheduler, t, total_steps: int, log: RunLog) -> dict:
    """The schedule a resumed run follows: the checkpoint's, with a warning when the config asks for another,
    or the config's with ``training.reset_lr_schedule``. Returns what the next checkpoint records."""
    current = schedule_summary(t, total_steps)
    # Checkpoints of older versions recorded no schedule: their peak rate is in the scheduler's state.
    saved = state.lr_schedule or {"learning_rate": checkpoint_peak_lr(scheduler)}
    if t.reset_lr_schedule:
        step = restart_schedule(scheduler, t)
        log.warn(f"training.reset_lr_schedule: the learning-rate schedule is the config's ({describe_schedule(current)}) "
                 f"from step {step}, no longer the checkpoint's ({describe_schedule(saved)}); optimizer moments kept")
        return current
    if schedule_differs(saved, current):
        log.warn(f"the config's learning-rate schedule ({describe_schedule(current)}) differs from the checkpoint's "
                 f"({describe_schedule(saved)}); resuming keeps the checkpoint's learning rate and position in the "
                 "schedule. Add training.reset_lr_schedule=true to switch to the config's.")
        return {**current, "learning_rate": saved["learning_rate"]}
    return current


def _diverged_message(step: int, bad_steps: int, last_saved: Path | None) -> str:
    # Updates of NaN/inf steps are skipped, but a too-high rate can blow the weights up to huge finite
    # values before the loss turns NaN: the weights now are not a safe point, the last save before is.
    first_bad = step - bad_steps + 1
    head = (f"stopping at step {step} after {bad_steps} NaN/inf steps in a row (the first at step {first_bad}); "
            "nothing is saved now, the weights may have diverged before the loss did.")
    if last_saved is None:
        return (f"{head} No checkpoint was saved before step {first_bad}: start again with a lower "
                "training.learning_rate, or check the data.")
    return (f"{head} The last checkpoint saved before step {first_bad} is {last_saved}: resume from it with a lower "
            f"rate, training.resume_from_checkpoint={last_saved} training.learning_rate=<lower> "
            "training.reset_lr_schedule=true, or check the data.")


def _router_bias_updater(model, config: Config):
    """``update(step_counts)`` applying ``moe.router_bias_update_rate`` to ``model``'s correction
    biases after a step, or None when the rate is 0 (the model's build checked that it has them)."""
    rate = config.moe.router_bias_update_rate
    if rate <= 0:
        return None
    from moetune.models.families import family_of
    from moetune.models.routing.balance import update_router_biases

    family = family_of(model)
    return lambda counts: update_router_biases(model, family, counts, rate)


def _add_expert_usage(record: dict, counts: torch.Tensor, config: Config, log: RunLog, step: int) -> None:
    """Shares per layer into the record; balance scalars, the heatmap and collapse warnings to the log."""
    balance = summarize_usage(counts)
    record["expert_usage"] = [list(b.shares) for b in balance]
    if config.moe.monitor.log_metrics:
        record["expert_scalars"] = usage_scalars(balance)
        log.image("expert_usage/heatmap", usage_heatmap(balance), step)
        for warning in usage_warnings(balance, config.moe.monitor.starving_expert_share, config.moe.monitor.dominant_expert_share):
            log.warn(warning)


def _eval_batches(config: Config) -> int | None:
    cap = config.validation.max_eval_samples
    return None if cap is None else max(1, math.ceil(cap / config.training.per_device_eval_batch_size))


def _track_best(state: TrainerState, metric: float, config: Config) -> bool:
    """Record an evaluation; True when it is the best so far (lower is better) by more than the threshold."""
    threshold = config.advanced.early_stopping_threshold
    if state.best_metric is None or metric < state.best_metric - threshold:
        state.best_metric = metric
        # Saved at this step when it matters (load_best_model_at_end), under a step save's name.
        state.best_checkpoint = checkpoint_dir_name(config.training.checkpoint_naming, state.global_step)
        state.evals_without_improvement = 0
        return True
    state.evals_without_improvement += 1
    return False


def _checkpoints_due(t, state: TrainerState, epoch_ended: bool, must_save: bool) -> list[str]:
    """Names of the checkpoints to save after this step (none, one, or a step's and an epoch's)."""
    names = []
    if must_save or (t.save_strategy in ("steps", "both") and state.global_step % t.save_steps == 0):
        names.append(checkpoint_dir_name(t.checkpoint_naming, state.global_step))
    if epoch_ended and t.save_strategy in ("epoch", "both"):
        names.append(checkpoint_dir_name(t.checkpoint_naming, state.global_step, epoch=state.epoch))
    return list(dict.fromkeys(names))  # with checkpoint_naming: step both are checkpoint-<step>


def _early_stop(state: TrainerState, config: Config) -> bool:
    patience = config.advanced.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience
