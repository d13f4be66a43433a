"""What one training log line holds: the loss sums of the micro-batches since the last line (kept on the device,
one reduction per line), turned into the logged record and its console line."""

from __future__ import annotations

import math
import time

import torch

from moetune.models.loss.objective import weighted_loss
from moetune.models.loss.preference import PAIRED_OBJECTIVES, PREFERENCE_SUMS, preference_metrics
from moetune.train.checkpoint import TrainerState


class LogWindow:
    """Loss sums and token counts between log lines, kept on the device (no host sync per micro-batch).

    The logged ``lm_loss`` is a per-token mean over the whole window and every process, ``aux_loss``,
    ``z_loss`` (and ``router_supervision_loss`` when label-guided routing is on) are routed-token-weighted
    means, and ``loss`` combines them with the config's weights.
    """

    # Columns of ``sums``: summed LM loss, label tokens, aux x routed tokens, z x routed tokens, routed tokens,
    # router supervision x routed tokens; then, under a preference objective, PreferenceParts.sums().
    LM_SUM, LOSS_TOKENS, AUX_SUM, Z_SUM, ROUTED, SUPERVISION_SUM = range(6)

    def __init__(self, device, objective: str = "sft"):
        self.objective = objective
        self.sums = torch.zeros(6 + (PREFERENCE_SUMS if objective != "sft" else 0), dtype=torch.float64, device=device)
        self.lm_weight, self.preference_weight = 1.0, 0.0
        self.samples = torch.zeros((), dtype=torch.float64, device=device)
        self.started = self.loop_started = time.perf_counter()
        self.step_total = torch.zeros((), dtype=torch.float64, device=device)
        self.aux_weight = self.z_weight = self.supervision_weight = 0.0

    def add(self, parts, batch) -> None:
        routed = parts.routed_tokens.detach()
        supervision = parts.router_supervision_loss
        supervision = supervision.detach() if supervision is not None else torch.zeros_like(routed)
        row = torch.stack([parts.lm_loss_sum.detach(), parts.loss_tokens.detach(), parts.aux_loss.detach() * routed,
                           parts.z_loss.detach() * routed, routed, supervision * routed]).double()
        if parts.preference is not None:
            row = torch.cat([row, parts.preference.sums().to(row.device)])
            self.lm_weight, self.preference_weight = parts.lm_weight, parts.preference.weight
        self.sums += row
        self.step_total += parts.total.detach().double()
        self.aux_weight, self.z_weight = parts.aux_weight, parts.z_weight
        self.supervision_weight = parts.supervision_weight or self.supervision_weight
        # A packed row holds several samples; each starts where position_ids restart at 0.
        starts = batch["position_ids"] == 0 if "position_ids" in batch else None
        self.samples += starts.sum() if starts is not None else batch["input_ids"].shape[0]

    def step_is_finite(self, grad_norm) -> bool:
        # One host sync per optimizer step. With DDP the gradients are already all-reduced, so a NaN on
        # any rank makes the norm NaN everywhere and every rank skips the same step.
        # DeepSpeed reports the norm as a float, DDP and single-process runs as a tensor.
        finite = bool(torch.isfinite(self.step_total)) and (grad_norm is None or math.isfinite(float(grad_norm)))
        self.step_total.zero_()
        return finite

    def flush(self, accelerator, state: TrainerState, lr: float, grad_norm, batches_per_epoch: int) -> dict:
        sums = accelerator.reduce(self.sums, "sum").tolist()
        samples = accelerator.reduce(self.samples, "sum").item()
        seconds = max(time.perf_counter() - self.started, 1e-9)
        tokens, routed = sums[self.LOSS_TOKENS], max(sums[self.ROUTED], 1.0)
        lm_loss, aux_loss, z_loss = sums[self.LM_SUM] / max(tokens, 1.0), sums[self.AUX_SUM] / routed, sums[self.Z_SUM] / routed
        supervision = sums[self.SUPERVISION_SUM] / routed
        preference = preference_metrics(sums[6:], self.objective in PAIRED_OBJECTIVES) if self.objective != "sft" else {}
        record = {
            "step": state.global_step, "epoch": epoch_of(state, batches_per_epoch),
            "loss": weighted_loss(lm_loss, aux_loss, z_loss, supervision, aux_weight=self.aux_weight,
                                  z_weight=self.z_weight, supervision_weight=self.supervision_weight,
                                  lm_weight=self.lm_weight, preference_loss=preference.get("preference_loss"),
                                  preference_weight=self.preference_weight),
            "lm_loss": lm_loss, "aux_loss": aux_loss, "z_loss": z_loss, **preference,
            **({"router_supervision_loss": supervision} if self.supervision_weight else {}), "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_second": tokens / seconds, "samples_per_second": samples / seconds,
        }
        if torch.cuda.is_available():
            record["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        state.tokens_seen += int(tokens)
        record["tokens_seen"] = state.tokens_seen
        record["elapsed_seconds"] = time.perf_counter() - self.loop_started
        self.sums.zero_()
        self.samples.zero_()
        self.started = time.perf_counter()
        return record


def epoch_of(state: TrainerState, batches_per_epoch: int) -> float:
    return round(state.epoch + state.batches_done_in_epoch / max(batches_per_epoch, 1), 4)


def console_line(record: dict) -> str:
    preference = ""
    if "preference_loss" in record:
        preference = f", preference {record['preference_loss']:.4f}"
        if "rewards/accuracies" in record:
            preference += f" (accuracy {record['rewards/accuracies']:.2f}, margin {record['rewards/margins']:.3f})"
    return (f"step {record['step']}: loss {record['loss']:.4f} (lm {record['lm_loss']:.4f}, aux {record['aux_loss']:.4f}"
            f"{preference}), lr {record['lr']:.2e}, grad_norm {record['grad_norm'] or 0:.3f}, "
            f"{record['tokens_per_second']:.0f} tok/s")


def eval_console_line(step: int, metrics: dict) -> str:
    line = f"step {step}: eval_loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}"
    if "eval_rewards/accuracies" in metrics:
        line += (f", preference accuracy {metrics['eval_rewards/accuracies']:.3f}, "
                 f"margin {metrics['eval_rewards/margins']:.3f}")
    return line
