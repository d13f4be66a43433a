"""The preference objectives' losses, from sequence log-probabilities: DPO (sigmoid, IPO), ORPO and KTO.

Pure functions of per-sequence summed log-probabilities (:func:`moetune.models.loss.lm_loss.forward_with_sequence_logps`)
and their token counts, so they are checked against their papers' formulas and TRL's trainers on plain tensors.
Each returns one loss per pair (KTO: per row) and the rewards logged beside it; the trainer sums the losses
and divides by the pairs of the whole optimizer step (:class:`moetune.models.loss.objective.LossParts`).

- DPO (Rafailov et al. 2023): ``reward = beta * (log pi(y|x) - log ref(y|x))``; ``sigmoid``:
  ``-(1 - eps) * logsigmoid(r_c - r_r) - eps * logsigmoid(r_r - r_c)`` (eps: label smoothing, conservative DPO);
  ``ipo``: ``((d_c - d_r) - 1 / (2 beta))^2`` on the per-token mean log-ratios d, as TRL computes it.
- ORPO (Hong et al. 2024): ``-logsigmoid(log odds(y_c) - log odds(y_r))`` on per-token mean log-probabilities,
  weighted by lambda beside the chosen completions' next-token loss; no reference model.
- KTO (Ethayarajh et al. 2024): desirable rows ``1 - sigmoid(beta * (log-ratio - KL))``, undesirable rows
  ``1 - sigmoid(beta * (KL - log-ratio))``; KL is estimated on mismatched prompt/completion rows, detached and
  clamped at 0, averaged over every process's rows as TRL does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIRED_OBJECTIVES = ("dpo", "orpo")
REFERENCE_OBJECTIVES = ("dpo", "kto")
PREFERENCE_SUMS = 8
"""How many sums :meth:`PreferenceParts.sums` gives."""


@dataclass
class PreferenceParts:
    """One micro-batch's preference loss and what is logged beside it.

    ``loss_sum``: the losses summed over its ``pairs`` (KTO: rows), differentiable. The rewards are the
    detached per-pair (KTO: per-row) implicit rewards: ``chosen_rewards``/``rejected_rewards`` for pairs;
    for KTO, the desirable rows' and the undesirable rows' (of different lengths). ``weight``: the loss's
    weight in the step's objective (ORPO's lambda; 1 otherwise).
    """

    loss_sum: torch.Tensor
    pairs: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    weight: float = 1.0

    def sums(self) -> torch.Tensor:
        """(loss, pairs, chosen reward sum, chosen count, rejected reward sum, rejected count, correct pairs,
        margin sum), detached, float64: what the trainer's log window adds up. ``correct``: pairs whose chosen
        reward beats the rejected one (none for KTO, whose rows are not paired)."""
        chosen, rejected = self.chosen_rewards.double(), self.rejected_rewards.double()
        paired = chosen.shape == rejected.shape
        correct = (chosen > rejected).sum().double() if paired else chosen.new_zeros(())
        margin = (chosen - rejected).sum() if paired else chosen.new_zeros(())
        return torch.stack([self.loss_sum.detach().double(), self.pairs.double(), chosen.sum(), chosen.new_tensor(chosen.numel()),
                            rejected.sum(), chosen.new_tensor(rejected.numel()), correct, margin])


def preference_metrics(sums, paired: bool) -> dict[str, float]:
    """The logged preference figures of summed :meth:`PreferenceParts.sums` (a window, an evaluation): the mean
    loss per pair (KTO: row) and mean rewards; for pairs also the accuracy (chosen reward above rejected) and the
    mean margin. TRL's names, so runs compare."""
    loss, pairs, chosen, chosen_count, rejected, rejected_count, correct, margin = (float(x) for x in sums)
    metrics = {"preference_loss": loss / max(pairs, 1.0), "rewards/chosen": chosen / max(chosen_count, 1.0),
               "rewards/rejected": rejected / max(rejected_count, 1.0)}
    if paired:
        metrics["rewards/accuracies"] = correct / max(pairs, 1.0)
        metrics["rewards/margins"] = margin / max(pairs, 1.0)
    return metrics


def dpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) of DPO. Log-probabilities are per-sequence sums;
    ``ipo`` needs the completions' token counts."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens")
        delta = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair odds-ratio losses, chosen rewards, rejected rewards) of ORPO; rewards are ``beta`` times the
    per-token mean log-probabilities, as TRL logs them."""
    chosen_mean = chosen_logps / chosen_tokens.clamp_min(1)
    rejected_mean = rejected_logps / rejected_tokens.clamp_min(1)
    # log odds(y) = log p - log(1 - p), with p the per-token mean probability; log1p(-exp) is exact near p = 1.
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-torch.exp(chosen_mean)) - torch.log1p(-torch.exp(rejected_mean)))
    return -F.logsigmoid(log_odds), beta * chosen_mean.detach(), beta * rejected_mean.detach()


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
               desirable: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row weighted losses, desirable rows' rewards, undesirable rows' rewards, KL estimate) of KTO."""
    kl = _mean_over_processes((kl_logps - ref_kl_logps).detach()).clamp_min(0)
    ratio = logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    return losses, rewards[desirable], rewards[~desirable], kl


def _mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over every process's rows (TRL's KTO averages the KL estimate the same way)."""
    total = torch.stack([values.sum().float(), torch.tensor(float(values.numel()), device=values.device)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total[0] / total[1].clamp_min(1)
