"""The ``moe`` section of the config: :class:`MoeConfig` and its sub-sections (expert LoRA, ESFT, shared
experts, routing monitor, router supervision, expert parallelism, sparse upcycling), one frozen dataclass each.

Re-exported by :mod:`moetune.config.schema`, which combines every section into ``Config``; checks that
involve other sections live in ``Config.__post_init__`` there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moetune.config.fields import check, opt
from moetune.errors import ConfigError


@dataclass(frozen=True)
class UpcyclingConfig:
    """Sparse upcycling: a dense MPT becomes an MoE before training, with these MoE blocks."""

    enabled: bool = opt(False, "Turn a dense model (MPT) into an MoE by sparse upcycling before training.")
    num_experts: int = opt(8, "Experts per upcycled MoE block.")
    top_k: int = opt(2, "Experts each token is routed to (1 or 2).")
    every_n_blocks: int = opt(1, "Upcycle every n-th block's FFN (1 = every block).")
    expert_noise_std: float = opt(0.0, "Std of noise added to each expert copy to break symmetry (relative to weight std).")
    router_init_std: float = opt(0.02, "Std of the new router's normal init.")
    capacity_factor: float | None = opt(None, "Expert capacity as a multiple of the even share; null = no token dropping.")
    router_jitter: float = opt(0.0, "Multiplicative jitter on router inputs while training (Switch Transformer).")

    def __post_init__(self) -> None:
        u = "moe.upcycling."
        check(self.num_experts >= 2, u + "num_experts", self.num_experts, "at least 2")
        check(self.top_k in (1, 2), u + "top_k", self.top_k, "1 or 2")
        check(self.top_k <= self.num_experts, u + "top_k", self.top_k, f"at most {u}num_experts ({self.num_experts})")
        check(self.every_n_blocks >= 1, u + "every_n_blocks", self.every_n_blocks, "a positive integer")
        check(self.expert_noise_std >= 0, u + "expert_noise_std", self.expert_noise_std, "0 or more")
        check(self.router_init_std > 0, u + "router_init_std", self.router_init_std, "greater than 0")
        if self.capacity_factor is not None:
            check(self.capacity_factor > 0, u + "capacity_factor", self.capacity_factor, "greater than 0 or null")
        check(self.router_jitter >= 0, u + "router_jitter", self.router_jitter, "0 or more")


@dataclass(frozen=True)
class ExpertLoraConfig:
    """The LoRA on each routed expert, with moe.expert_training: lora."""

    r: int | None = opt(None, "LoRA rank of each routed expert; null = lora.r.")
    alpha: float | None = opt(None, "LoRA alpha of the routed experts; null = lora.lora_alpha.")

    def __post_init__(self) -> None:
        if self.r is not None:
            check(self.r >= 1, "moe.expert_lora.r", self.r, "a positive integer or null")
        if self.alpha is not None:
            check(self.alpha > 0, "moe.expert_lora.alpha", self.alpha, "greater than 0 or null")


@dataclass(frozen=True)
class EsftConfig:
    """Expert-specialised fine-tuning, with moe.expert_training: esft."""

    experts: str | None = opt(
        None, "The experts.json `moetune experts` wrote: the experts to train per MoE layer."
    )


@dataclass(frozen=True)
class SharedExpertsConfig:
    """The shared experts some families run beside the routed ones (see Supported model families)."""

    train: bool = opt(
        False, "Train the shared experts and save them with the adapter, as moe.shared_experts.method says. Routed "
        "experts follow moe.expert_training. The model must have shared experts."
    )
    method: Literal["full", "lora"] = opt(
        "full", "How they train: full (PEFT modules_to_save when lora.enabled) or lora (LoRA with lora.r / "
        "lora.lora_alpha on their Linears; needs lora.enabled)."
    )


@dataclass(frozen=True)
class MonitorConfig:
    """Watching the routing while training: expert usage and the warnings when it collapses."""

    expert_usage: bool = opt(True, "Count routed tokens per expert and layer during training.")
    log_metrics: bool = opt(True, "Log expert usage and balance figures to the console and TensorBoard.")
    starving_expert_share: float = opt(
        0.25, "Warn when an expert gets less than this fraction of its fair share (1 / num_experts)."
    )
    dominant_expert_share: float = opt(0.5, "Warn when one expert takes more than this fraction of a layer's routed tokens.")

    def __post_init__(self) -> None:
        m = "moe.monitor."
        check(0 <= self.starving_expert_share <= 1, m + "starving_expert_share", self.starving_expert_share, "in [0, 1]")
        check(0 < self.dominant_expert_share <= 1, m + "dominant_expert_share", self.dominant_expert_share, "in (0, 1]")


@dataclass(frozen=True)
class RouterSupervisionConfig:
    """Label-guided routing: teach the routers to send each expert_label to its experts."""

    weight: float = opt(
        0.0, "Weight of a cross-entropy on every MoE layer's router logits toward the experts of the sample's "
        "expert_label (label_to_expert), over the tokens of labelled samples; unlabelled samples add nothing. "
        "The router must train. 0 = off."
    )
    label_to_expert: Literal["auto"] | dict[str, tuple[int, ...]] = opt(
        "auto", "Which experts each expert_label is routed to: auto gives the labels seen in the training data, most "
        "frequent first (ties by name), experts 0, 1, 2, ... in turn (label i -> expert i mod the number of "
        "experts); or a map {label: [expert, ...]}, where labels not in it count as unlabelled."
    )

    def __post_init__(self) -> None:
        check(self.weight >= 0, "moe.router_supervision.weight", self.weight, "0 or more")
        if not isinstance(self.label_to_expert, dict):
            return
        key = "moe.router_supervision.label_to_expert"
        check(bool(self.label_to_expert), key, self.label_to_expert, "auto or a non-empty map {label: [expert, ...]}")
        normalised = {}
        for label, experts in self.label_to_expert.items():
            experts = (experts,) if isinstance(experts, int) and not isinstance(experts, bool) else experts
            check(isinstance(label, str) and bool(label), key, label, "a map whose keys are expert_label strings")
            check(isinstance(experts, (list, tuple)) and bool(experts)
                  and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in experts),
                  f"{key}.{label}", experts, "a non-empty list of expert indices (integers, 0 or more)")
            normalised[label] = tuple(dict.fromkeys(experts))
        object.__setattr__(self, "label_to_expert", normalised)


@dataclass(frozen=True)
class ExpertParallelConfig:
    """The MoE blocks of upcycled MPT models in training: native, or DeepSpeed MoE split across ranks."""

    backend: Literal["native", "deepspeed"] = opt(
        "native", "MoE block of upcycled MPT models (moe.upcycling.enabled, or an mpt_moe checkpoint) in training: "
        "deepspeed splits the experts across ranks (needs a DeepSpeed launch, not ZeRO-3); runs save the native layout "
        "either way."
    )
    size: int = opt(
        1, "With backend: deepspeed, how many ranks the experts are split across (each holds "
        "moe.upcycling.num_experts / this many); it must divide the number of processes."
    )

    def __post_init__(self) -> None:
        check(self.size >= 1, "moe.expert_parallel.size", self.size, "a positive integer")


@dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-Experts settings: the balance losses, what trains, and the sections for each concern."""

    use_auxiliary_loss: bool = opt(True, "Add the load-balancing (auxiliary) loss of the model's router to the LM "
                                   "loss (see Supported model families: the Switch loss where transformers computes "
                                   "one, else by the router's kind).")
    auxiliary_loss_weight: float = opt(0.001, "Weight of the auxiliary loss (Mixtral's router_aux_loss_coef, "
                                       "DeepSeek's aux_loss_alpha).")
    router_z_loss_weight: float = opt(0.0, "Weight of the router z-loss (ST-MoE); 0 turns it off.")
    router_bias_update_rate: float = opt(
        0.0, "Aux-loss-free balancing (DeepSeek-V3): after each step every expert's router correction bias moves by "
        "this much toward balanced load; saved with the adapter. Routers with a correction bias only (see Supported model "
        "families); 0 = off."
    )
    freeze_router: bool = opt(True, "Keep the router frozen; false trains it and saves it in the adapter.")
    expert_training: Literal["full", "lora", "frozen", "esft"] | None = opt(
        None, "How the routed experts train: full (every expert weight; with lora.enabled a trained copy of the experts "
        "is saved with the adapter, so they take twice their memory), lora (LoRA per expert with moe.expert_lora: on "
        "the fused 3-D expert parameters through PEFT target_parameters, or on each expert's Linears), frozen, or "
        "esft: only the experts moe.esft.experts selects train, everything else frozen (needs lora.enabled: false). "
        "null: frozen for pretrained models, full for upcycled MPT."
    )
    expert_lora: ExpertLoraConfig = opt(ExpertLoraConfig(), "LoRA on the routed experts (moe.expert_training: lora).")
    esft: EsftConfig = opt(EsftConfig(), "Expert-specialised fine-tuning (moe.expert_training: esft).")
    shared_experts: SharedExpertsConfig = opt(SharedExpertsConfig(), "Training the shared experts.")
    monitor: MonitorConfig = opt(MonitorConfig(), "Expert usage and collapse warnings during training.")
    router_supervision: RouterSupervisionConfig = opt(
        RouterSupervisionConfig(), "Label-guided routing from the samples' expert_label."
    )
    expert_parallel: ExpertParallelConfig = opt(
        ExpertParallelConfig(), "The MoE blocks of upcycled MPT models: native, or DeepSpeed MoE across ranks."
    )
    upcycling: UpcyclingConfig = opt(
        UpcyclingConfig(), "Sparse upcycling of a dense MPT into an MoE, and the MoE blocks it creates."
    )

    def __post_init__(self) -> None:
        check(self.auxiliary_loss_weight >= 0, "moe.auxiliary_loss_weight", self.auxiliary_loss_weight, "0 or more")
        check(self.router_z_loss_weight >= 0, "moe.router_z_loss_weight", self.router_z_loss_weight, "0 or more")
        check(self.router_bias_update_rate >= 0, "moe.router_bias_update_rate", self.router_bias_update_rate, "0 or more")
        supervision = self.router_supervision
        if supervision.weight > 0:
            # A frozen router cannot learn the routing it is told: the loss would be logged and do nothing.
            check(self.upcycling.enabled or not self.freeze_router, "moe.freeze_router", self.freeze_router,
                  "false when moe.router_supervision.weight is above 0 (the router must train to follow the labels)")
        if self.upcycling.enabled and isinstance(supervision.label_to_expert, dict):
            for label, experts in supervision.label_to_expert.items():
                check(max(experts) < self.upcycling.num_experts, f"moe.router_supervision.label_to_expert.{label}",
                      list(experts), f"expert indices below moe.upcycling.num_experts ({self.upcycling.num_experts})")
        if self.expert_training == "esft":
            check(self.esft.experts is not None, "moe.esft.experts", self.esft.experts,
                  "the experts.json of `moetune experts` when moe.expert_training is esft")
        if self.expert_parallel.backend == "deepspeed":
            if self.upcycling.num_experts % self.expert_parallel.size:
                raise ConfigError("moe.expert_parallel.size", f"moe.upcycling.num_experts ({self.upcycling.num_experts}) "
                                  f"must be divisible by moe.expert_parallel.size ({self.expert_parallel.size}).")
            # DeepSpeed's gate would compute something else than the native mpt_moe model the run is saved as.
            check(self.upcycling.top_k == 2, "moe.upcycling.top_k", self.upcycling.top_k,
                  "2 with moe.expert_parallel.backend: deepspeed (its top-1 gate scales each expert output by the router "
                  "probability; the native block gives the chosen expert weight 1)")
            check(self.upcycling.router_jitter in (0.0, 0.01), "moe.upcycling.router_jitter", self.upcycling.router_jitter,
                  "0 or 0.01 with moe.expert_parallel.backend: deepspeed (DeepSpeed's jitter has a fixed epsilon of 0.01)")
