"""The config schema: one frozen dataclass per YAML section, combined into :class:`Config`.

Every field carries its documentation in ``metadata["help"]``; ``print-config`` and the README's
config reference are generated from it. Checks that involve one section live in that section's
``__post_init__`` and quote the YAML path; checks across sections live in ``Config.__post_init__``.
Names follow the Hugging Face ``TrainingArguments`` / PEFT ``LoraConfig`` vocabulary so an
existing config reads as its author expects. The ``moe`` section and its sub-sections live in
:mod:`moetune.config.moe` and are importable from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from moetune.config.fields import check, opt
from moetune.config.moe import (  # noqa: F401  (the moe section's classes, importable from here as before)
    EsftConfig,
    ExpertLoraConfig,
    ExpertParallelConfig,
    MoeConfig,
    MonitorConfig,
    RouterSupervisionConfig,
    SharedExpertsConfig,
    UpcyclingConfig,
)
from moetune.config.sources import SOURCE_TYPES, SourceConfig
from moetune.errors import ConfigError

# The registry's names, read without importing a family (torch): model.architecture's accepted
# values and the README reference follow the registry.
from moetune.plugins import FAMILY_NAMES

# --------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name: str = opt(
        "mistralai/Mixtral-8x7B-v0.1",
        "Hub id or local directory of the base model. With random_init it only names the run.",
    )
    architecture: Literal[FAMILY_NAMES] | None = opt(
        None, "Model family (see Supported model families); null detects it from the model_type in the model's "
        "config.json."
    )
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "bfloat16", "Dtype the weights are loaded in."
    )
    max_seq_length: int = opt(2048, "Longest training sequence in tokens (packing fills up to it).")
    attn_implementation: Literal["flash_attention_2", "sdpa", "eager"] = opt(
        "sdpa", "Attention kernel; flash_attention_2 falls back to sdpa with a warning where unavailable."
    )
    experts_implementation: Literal["grouped_mm", "batched_mm", "eager"] | None = opt(
        None, "Kernel for the fused experts; null picks the fastest one available."
    )
    trust_remote_code: bool = opt(False, "Allow the model's own Python code from the hub (off: native classes only).")
    load_in_4bit: bool = opt(False, "QLoRA: load the base weights in 4-bit NF4 through bitsandbytes.")
    load_in_8bit: bool = opt(False, "Load the base weights in 8-bit through bitsandbytes.")
    random_init: bool = opt(
        False, "Build the model from its config with random weights (tests, quickstart) instead of loading weights."
    )
    config_overrides: dict[str, Any] = opt(
        {}, "Keys set on the model's Hugging Face config, e.g. {num_hidden_layers: 2, hidden_size: 64}."
    )
    tokenizer: str | None = opt(
        None, "Hub id or directory of the tokenizer; null uses `name`, or trains one on the data with random_init."
    )
    tokenizer_vocab_size: int = opt(4096, "Vocabulary size of a tokenizer trained on the data.")

    def __post_init__(self) -> None:
        check(self.max_seq_length >= 16, "model.max_seq_length", self.max_seq_length, "at least 16")
        check(self.tokenizer_vocab_size >= 256, "model.tokenizer_vocab_size", self.tokenizer_vocab_size, "at least 256")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("model.load_in_8bit", "model.load_in_4bit and model.load_in_8bit are both true; pick one.")
        if self.random_init and (self.load_in_4bit or self.load_in_8bit):
            raise ConfigError("model.random_init", "model.random_init builds random weights, which cannot be loaded in "
                              "4/8-bit; set model.load_in_4bit/load_in_8bit to false or load saved weights.")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings (PEFT names)."""

    enabled: bool = opt(True, "Train a LoRA adapter; false trains the unfrozen weights directly.")
    r: int = opt(16, "LoRA rank.")
    lora_alpha: float = opt(32, "LoRA scaling numerator (the update is scaled by lora_alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = opt(
        ("q_proj", "k_proj", "v_proj", "o_proj"), "Module names that get LoRA (attention only by default)."
    )
    exclude_modules: tuple[str, ...] = opt((), "Module names never given LoRA, even when they match target_modules.")
    modules_to_save: tuple[str, ...] = opt(
        (), "Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head] for a new tokenizer."
    )
    bias: Literal["none", "all", "lora_only"] = opt("none", "Which biases train.")

    def __post_init__(self) -> None:
        check(self.r >= 1, "lora.r", self.r, "a positive integer")
        check(self.lora_alpha > 0, "lora.lora_alpha", self.lora_alpha, "greater than 0")
        check(0 <= self.lora_dropout < 1, "lora.lora_dropout", self.lora_dropout, "in [0, 1)")
        check(len(self.target_modules) > 0, "lora.target_modules", list(self.target_modules), "a non-empty list")


# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and where the built dataset goes."""

    output_path: str = opt("data/all_data.jsonl", "Built dataset (JSONL); <stem>.stats.json is written beside it.")
    sources: tuple[SourceConfig, ...] = opt(
        (), f"Sources, each {{type: {' | '.join(SOURCE_TYPES)}, path: ..., ...}}."
    )
    strict: bool = opt(False, "Stop at the first bad input line (exit 2) instead of counting and reporting it.")
    packing: bool = opt(True, "Pack samples into full sequences (no padding, attention kept within each sample).")
    num_workers: int = opt(0, "Processes for parsing source files, and for tokenizing tens of thousands of records or "
                           "more; 0 = one per CPU core.")
    chars_per_token: float = opt(
        3.0, "Characters per token assumed before a tokenizer exists (file-chunk sizes, token figures in the stats)."
    )
    max_samples: int | None = opt(
        None, "Use only the first n samples of the built dataset (before the validation split), e.g. for a quick "
        "test run; null = all."
    )
    max_target_length: int | None = opt(
        None, "Longest completion (answer) of a prompt/completion sample in tokens; a longer one keeps its first n "
        "tokens and gets no end-of-sequence token, since it did not end there. null = no limit."
    )
    long_samples: Literal["truncate", "split", "drop"] | None = opt(
        None, "A sample longer than model.max_seq_length: truncate keeps it one sample (a conversation cut after the last "
        "whole turn that fits, a QA answer cut, its question kept), split cuts it into windows that are samples of their "
        "own, drop leaves it out. null = each source kind's way: truncate for chat, instruction and QA, split for text "
        "and Rust. Counted in the training data's figures."
    )
    chat_template: str | None = opt(
        None, "Chat template that renders conversations (chat and instruction sources) and generation prompts: a .jinja "
        "file or a template shipped with moetune (chatml). null = the tokenizer's own. It is saved with the run's "
        "tokenizer, so evaluation and generation render the same way."
    )

    def __post_init__(self) -> None:
        check(bool(self.output_path), "data.output_path", self.output_path, "a non-empty path")
        weighted = [getattr(source, "weight", None) is not None for source in self.sources]
        if any(weighted) and not all(weighted):
            unset = weighted.index(False)
            raise ConfigError(f"data.sources[{unset}].weight", f"data.sources[{unset}].weight is not set while another "
                              "source's is: weights are shares of each epoch, so give every source one (or none).")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "0 or more")
        check(1.0 <= self.chars_per_token <= 16.0, "data.chars_per_token", self.chars_per_token, "in [1, 16]")
        check(self.max_samples is None or self.max_samples >= 1, "data.max_samples", self.max_samples,
              "a positive integer or null")
        check(self.max_target_length is None or self.max_target_length >= 1, "data.max_target_length",
              self.max_target_length, "a positive integer or null")


# ------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation loop, checkpoints and distributed settings (TrainingArguments names)."""

    output_dir: str = opt("outputs/run", "Run folder: checkpoints, metrics.jsonl, TensorBoard runs/, resolved config.yaml.")
    num_train_epochs: float = opt(3.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = opt(-1, "Optimizer steps to run; -1 = use num_train_epochs.")
    per_device_train_batch_size: int = opt(8, "Training sequences per device per micro-batch.")
    per_device_eval_batch_size: int = opt(8, "Evaluation sequences per device per batch.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated into one optimizer step. Its loss is the "
                                           "per-token mean over all of them and all processes.")
    learning_rate: float = opt(2e-4, "Peak learning rate.")
    min_learning_rate: float = opt(0.0, "Floor the cosine schedule decays to.")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "cosine_with_restarts"] = opt(
        "cosine", "Learning-rate schedule after warmup."
    )
    warmup_ratio: float = opt(0.0, "Warmup length as a fraction of all steps.")
    warmup_steps: int = opt(0, "Warmup length in steps (takes precedence over warmup_ratio when > 0).")
    weight_decay: float = opt(0.0, "AdamW weight decay (never applied to biases and norms).")
    label_smoothing_factor: float = opt(0.0, "Label smoothing of the LM loss.")
    optim: Literal["adamw_torch_fused", "adamw_torch", "adafactor", "sgd", "adamw_8bit"] = opt(
        "adamw_torch", "Optimizer."
    )
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 turns clipping off.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (non-reentrant, keeps the aux-loss gradient).")
    bf16: bool = opt(False, "bfloat16 mixed precision.")
    fp16: bool = opt(False, "float16 mixed precision.")
    seed: int = opt(42, "Seed for data order, initialisation and dropout.")
    logging_steps: int = opt(10, "Log every n optimizer steps.")
    eval_steps: int | None = opt(None, "Evaluate every n steps; null = once per epoch.")
    save_strategy: Literal["steps", "epoch", "both"] = opt(
        "steps", "When checkpoints are saved: every save_steps steps, at the end of every epoch, or both."
    )
    save_steps: int = opt(500, "Save a checkpoint every n steps (save_strategy steps or both).")
    checkpoint_naming: Literal["step", "kind"] = opt(
        "step", "Checkpoint folder names: `step` names every one checkpoint-<step>; `kind` names step saves "
        "checkpoint-step-<step> and end-of-epoch saves checkpoint-epoch-<epoch> (counted from 1)."
    )
    save_total_limit: int | None = opt(None, "Keep only the newest n checkpoints (never deleting the best); null = keep all.")
    load_best_model_at_end: bool = opt(False, "Finish with the best checkpoint by metric_for_best_model.")
    metric_for_best_model: Literal["eval_loss", "eval_perplexity"] = opt("eval_loss", "Metric that picks the best checkpoint (lower is better).")
    resume_from_checkpoint: str | None = opt(None, "A checkpoint folder, or `latest`, to resume from exactly.")
    reset_lr_schedule: bool = opt(
        False, "On resume, run the learning-rate schedule this config describes from the checkpoint's step instead of "
        "the checkpoint's (optimizer moments are kept); e.g. to resume with a lower training.learning_rate."
    )
    overwrite_output_dir: bool = opt(False, "Allow writing into an output_dir that holds another run's checkpoints.")
    dataloader_num_workers: int = opt(0, "DataLoader worker processes.")
    ddp_backend: Literal["nccl", "gloo", "mpi", "ccl", "hccl"] | None = opt(None, "torch.distributed backend; null = the launcher's default.")
    ddp_timeout: int = opt(1800, "Seconds a collective may wait before failing.")
    auto_find_batch_size: bool = opt(
        False, "On out-of-memory, retry with half the per-device batch and twice the accumulation (same effective batch)."
    )
    objective: Literal["sft", "dpo", "orpo", "kto"] = opt(
        "sft", "What the model learns from: `sft` the next-token loss on the trained tokens; `dpo`, `orpo` (paired "
        "prompt/chosen/rejected records) and `kto` (paired, or prompt/completion/label records) from preferences, "
        "on data of the `preference` source kind. The MoE losses, expert usage and router supervision apply to each."
    )
    dpo_beta: float = opt(0.1, "DPO's beta (also KTO's): how far the policy may move from the reference; higher "
                          "keeps it closer.")
    dpo_loss: Literal["sigmoid", "ipo"] = opt(
        "sigmoid", "DPO's loss: `sigmoid` (the DPO paper's, with dpo_label_smoothing for noisy labels) or `ipo` "
        "(squared, on the per-token mean log-ratio, as TRL computes it)."
    )
    dpo_label_smoothing: float = opt(0.0, "Share of pairs assumed mislabelled (conservative DPO), for dpo_loss: sigmoid.")
    dpo_sft_weight: float = opt(0.0, "Weight of the chosen completions' next-token loss added to the DPO loss "
                                "(RPO); 0 = pure DPO.")
    orpo_lambda: float = opt(0.1, "ORPO's weight of the odds-ratio loss beside the chosen completions' next-token loss.")
    kto_desirable_weight: float = opt(1.0, "KTO's weight of desirable completions' losses.")
    kto_undesirable_weight: float = opt(1.0, "KTO's weight of undesirable completions' losses.")
    precompute_ref_logps: bool = opt(
        False, "DPO/KTO: compute the reference log-probabilities of every training and validation sequence in one pass "
        "before training, so no reference forward runs per step; with full-parameter or expert training it also "
        "spares the frozen copy of the model."
    )
    plan_check: Literal["warn", "error"] = opt(
        "warn", "On a GPU machine, before loading weights, the run is planned as `moetune plan` does; a plan over the "
        "visible GPUs' memory is one paragraph (the parts, the largest micro-batch that fits, the knobs): a warning, "
        "or with error a refusal (exit 2)."
    )

    def __post_init__(self) -> None:
        t = "training."
        check(bool(self.output_dir), t + "output_dir", self.output_dir, "a non-empty path")
        check(self.num_train_epochs > 0, t + "num_train_epochs", self.num_train_epochs, "greater than 0")
        check(self.max_steps == -1 or self.max_steps > 0, t + "max_steps", self.max_steps, "a positive integer, or -1 to use num_train_epochs")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "ddp_timeout"):
            check(getattr(self, name) >= 1, t + name, getattr(self, name), "a positive integer")
        check(self.eval_steps is None or self.eval_steps >= 1, t + "eval_steps", self.eval_steps, "a positive integer or null")
        check(self.save_total_limit is None or self.save_total_limit >= 1, t + "save_total_limit",
              self.save_total_limit, "a positive integer or null")
        check(self.learning_rate > 0, t + "learning_rate", self.learning_rate, "greater than 0")
        check(0 <= self.min_learning_rate <= self.learning_rate, t + "min_learning_rate", self.min_learning_rate,
              f"in [0, training.learning_rate ({self.learning_rate:g})]")
        check(0 <= self.warmup_ratio < 1, t + "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        check(self.warmup_steps >= 0, t + "warmup_steps", self.warmup_steps, "0 or more")
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ConfigError(t + "warmup_steps", "training.warmup_ratio and training.warmup_steps are both set; set one of them.")
        check(self.weight_decay >= 0, t + "weight_decay", self.weight_decay, "0 or more")
        check(0 <= self.label_smoothing_factor < 1, t + "label_smoothing_factor", self.label_smoothing_factor, "in [0, 1)")
        check(0 <= self.adam_beta1 < 1, t + "adam_beta1", self.adam_beta1, "in [0, 1)")
        check(0 <= self.adam_beta2 < 1, t + "adam_beta2", self.adam_beta2, "in [0, 1)")
        check(self.adam_epsilon > 0, t + "adam_epsilon", self.adam_epsilon, "greater than 0")
        check(self.max_grad_norm >= 0, t + "max_grad_norm", self.max_grad_norm, "0 or more")
        check(self.dataloader_num_workers >= 0, t + "dataloader_num_workers", self.dataloader_num_workers, "0 or more")
        if self.bf16 and self.fp16:
            raise ConfigError(t + "fp16", "training.bf16 and training.fp16 are both true; pick one mixed-precision mode.")
        check(self.dpo_beta > 0, t + "dpo_beta", self.dpo_beta, "greater than 0")
        check(0 <= self.dpo_label_smoothing < 0.5, t + "dpo_label_smoothing", self.dpo_label_smoothing, "in [0, 0.5)")
        if self.dpo_label_smoothing and self.dpo_loss != "sigmoid":
            raise ConfigError(t + "dpo_label_smoothing", "training.dpo_label_smoothing applies to training.dpo_loss: "
                              f"sigmoid; training.dpo_loss is {self.dpo_loss!r}.")
        for name in ("dpo_sft_weight", "orpo_lambda", "kto_desirable_weight", "kto_undesirable_weight"):
            check(getattr(self, name) >= 0, t + name, getattr(self, name), "0 or more")
        if self.precompute_ref_logps and self.objective in ("sft", "orpo"):
            raise ConfigError(t + "precompute_ref_logps", f"training.precompute_ref_logps is true but training.objective "
                              f"{self.objective!r} uses no reference model; set it to false, or objective: dpo or kto.")
        if self.load_best_model_at_end and self.eval_steps is not None and self.save_steps % self.eval_steps:
            raise ConfigError(t + "save_steps", f"training.load_best_model_at_end needs training.save_steps ({self.save_steps}) "
                              f"to be a multiple of training.eval_steps ({self.eval_steps}), so every saved step has an eval.")


@dataclass(frozen=True)
class ValidationConfig:
    """The held-out split used for eval loss and perplexity."""

    validation_split: float = opt(
        0.05, "Fraction of split units held out for validation, seeded: each source kind names its unit (a Rust "
        "source file, a QA question), and all samples of one unit land on the same side.")
    max_eval_samples: int | None = opt(None, "Cap on validation samples per evaluation; null = all.")

    def __post_init__(self) -> None:
        check(0 <= self.validation_split < 1, "validation.validation_split", self.validation_split, "in [0, 1)")
        check(self.max_eval_samples is None or self.max_eval_samples >= 1, "validation.max_eval_samples",
              self.max_eval_samples, "a positive integer or null")


@dataclass(frozen=True)
class InferenceConfig:
    """Generation settings used by evaluation and `moetune generate`."""

    do_sample: bool = opt(True, "Sample; false decodes greedily.")
    temperature: float = opt(0.2, "Sampling temperature.")
    top_k: int = opt(50, "Sample from the k most likely tokens; 0 = no limit.")
    top_p: float = opt(0.95, "Nucleus sampling mass.")
    repetition_penalty: float = opt(1.1, "Penalty on repeated tokens (1.0 = none).")
    max_new_tokens: int = opt(256, "Longest generated continuation.")
    use_chat_template: bool | None = opt(
        None, "`moetune generate` wraps each prompt as one user message in the chat template (the tokenizer's, or "
        "data.chat_template). null: when there is one; false: prompts are used as written (a model trained on plain "
        "text). Evaluation renders each record as training did, whatever this says.")

    def __post_init__(self) -> None:
        check(self.temperature > 0, "inference.temperature", self.temperature, "greater than 0")
        check(self.top_k >= 0, "inference.top_k", self.top_k, "0 or more")
        check(0 < self.top_p <= 1, "inference.top_p", self.top_p, "in (0, 1]")
        check(self.repetition_penalty > 0, "inference.repetition_penalty", self.repetition_penalty, "greater than 0")
        check(self.max_new_tokens >= 1, "inference.max_new_tokens", self.max_new_tokens, "a positive integer")


@dataclass(frozen=True)
class AdvancedConfig:
    """Rarely changed knobs."""

    use_cpu_offload: bool = opt(False, "Offload optimizer state (ZeRO-1/2/3) and parameters (ZeRO-3, FSDP) to CPU "
                                "memory. Needs a DeepSpeed or FSDP launch; refused in a plain or DDP run.")
    torch_compile: bool = opt(False, "Compile each decoder layer with torch.compile (regional compilation). Not "
                              "with ZeRO-3 or moe.expert_parallel.backend: deepspeed. About a minute of compiling first (docs/benchmarks.md).")
    early_stopping_patience: int | None = opt(None, "Stop after this many evaluations without improvement; null = off.")
    early_stopping_threshold: float = opt(0.0, "Smallest improvement of the metric that counts.")
    max_bad_steps: int = opt(10, "Consecutive NaN/inf-loss steps tolerated (each skipped) before saving and stopping.")

    def __post_init__(self) -> None:
        check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
              "advanced.early_stopping_patience", self.early_stopping_patience, "a positive integer or null")
        check(self.early_stopping_threshold >= 0, "advanced.early_stopping_threshold", self.early_stopping_threshold, "0 or more")
        check(self.max_bad_steps >= 1, "advanced.max_bad_steps", self.max_bad_steps, "a positive integer")


@dataclass(frozen=True)
class PostTrainingConfig:
    """What happens after training."""

    merge_and_save: bool = opt(False, "Merge the adapter into the base weights and save a standalone model.")
    merged_output_dir: str | None = opt(None, "Where the merged model goes; null = <output_dir>/merged.")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides the console and metrics.jsonl."""

    tensorboard: bool = opt(True, "Write TensorBoard event files.")
    logging_dir: str | None = opt(None, "TensorBoard folder; null = <output_dir>/runs.")
    wandb: bool = opt(False, "Also log to Weights & Biases (needs the wandb package).")
    wandb_project: str | None = opt(None, "W&B project name; null = moetune.")
    run_name: str | None = opt(None, "Run name shown in the trackers; null = the output_dir's folder name.")


# ---------------------------------------------------------------------------------------- root


@dataclass(frozen=True)
class Config:
    """A whole moetune run. Every section may be left out of the YAML to take its defaults."""

    model: ModelConfig = opt(ModelConfig(), "The base model.")
    lora: LoraConfig = opt(LoraConfig(), "The LoRA adapter.")
    moe: MoeConfig = opt(MoeConfig(), "Mixture-of-Experts settings.")
    data: DataConfig = opt(DataConfig(), "Training data.")
    training: TrainingConfig = opt(TrainingConfig(), "The training loop.")
    validation: ValidationConfig = opt(ValidationConfig(), "The validation split.")
    inference: InferenceConfig = opt(InferenceConfig(), "Generation.")
    advanced: AdvancedConfig = opt(AdvancedConfig(), "Rarely changed knobs.")
    post_training: PostTrainingConfig = opt(PostTrainingConfig(), "After training.")
    logging: LoggingConfig = opt(LoggingConfig(), "Trackers.")

    def __post_init__(self) -> None:
        if self.moe.upcycling.enabled and self.model.architecture not in (None, "mpt"):
            raise ConfigError("moe.upcycling.enabled", "moe.upcycling.enabled turns a dense MPT model into an MoE; "
                              f"model.architecture is {self.model.architecture!r}, which is already an MoE.")
        self._check_what_trains()
        backend = self.moe.expert_parallel.backend
        if backend == "deepspeed" and self.model.architecture not in (None, "mpt"):
            raise ConfigError("moe.expert_parallel.backend", deepspeed_backend_message(self.model.architecture))
        if self.advanced.torch_compile and backend == "deepspeed":
            raise ConfigError("advanced.torch_compile", "advanced.torch_compile does not apply to "
                              "moe.expert_parallel.backend: deepspeed, whose MoE layers exchange tokens between ranks "
                              "inside the forward pass; use moe.expert_parallel.backend: native to compile.")
        if self.moe.expert_training == "esft" and (self.lora.enabled or self.moe.expert_parallel.backend != "native"):
            raise ConfigError("moe.expert_training", "moe.expert_training: esft trains the selected experts themselves "
                              "and freezes everything else, so it takes lora.enabled: false and moe.expert_parallel.backend: native.")
        if self.moe.expert_training == "esft" and self.moe.shared_experts.train:
            # ESFT freezes every weight but the selected routed experts; the shared experts would not train.
            raise ConfigError("moe.shared_experts.train", "moe.shared_experts.train does nothing under moe.expert_training: "
                              "esft, which trains only the experts moe.esft.experts selects; set it to false.")
        if self.advanced.early_stopping_patience is not None and self.validation.validation_split == 0:
            raise ConfigError("advanced.early_stopping_patience", "advanced.early_stopping_patience needs a validation split; "
                              "validation.validation_split is 0.")
        if self.training.load_best_model_at_end and self.validation.validation_split == 0:
            raise ConfigError("training.load_best_model_at_end", "training.load_best_model_at_end needs a validation split; "
                              "validation.validation_split is 0.")
        self._check_objective_data()
        if self.model.random_init and self.model.architecture is None:
            raise ConfigError("model.architecture", "model.random_init builds a model from config, so it needs "
                              f"model.architecture ({' | '.join(FAMILY_NAMES)}) and usually model.config_overrides "
                              "(e.g. {num_hidden_layers: 2, hidden_size: 64}).")

    def _check_objective_data(self) -> None:
        """Preference objectives learn from preference records only, and the next-token objective from none."""
        preference = self.training.objective != "sft"
        for n, source in enumerate(self.data.sources):
            if preference and source.type != PREFERENCE_KIND:
                raise ConfigError(f"data.sources[{n}].type", f"training.objective is {self.training.objective!r}, which "
                                  f"learns from preference records, but data.sources[{n}] is of type {source.type!r}; "
                                  f"use `type: {PREFERENCE_KIND}` sources (prompt/chosen/rejected records) or objective: sft.")
            if not preference and source.type == PREFERENCE_KIND:
                raise ConfigError(f"data.sources[{n}].type", f"data.sources[{n}] holds preference records, which train "
                                  "with training.objective: dpo, orpo or kto; training.objective is 'sft'.")

    def _check_what_trains(self) -> None:
        """What an adapter, quantised weights and upcycling need of each other (no model needed to tell)."""
        quantised = self.model.load_in_4bit or self.model.load_in_8bit
        if quantised and not self.lora.enabled:
            raise ConfigError("lora.enabled", "model.load_in_4bit/load_in_8bit freeze the base weights in a quantised "
                              "format, so only an adapter can train: set lora.enabled: true.")
        if quantised and self.moe.upcycling.enabled:
            raise ConfigError("moe.upcycling.enabled", "moe.upcycling.enabled copies dense FFN weights into experts, "
                              "which cannot be done on 4/8-bit weights; upcycle first (`moetune upcycle`), then train "
                              "the saved model.")
        if self.moe.expert_training == "lora" and not self.lora.enabled:
            raise ConfigError("moe.expert_training", "moe.expert_training is 'lora' but lora.enabled is false; enable "
                              "LoRA or choose moe.expert_training: full or frozen.")
        shared = self.moe.shared_experts
        if shared.train and shared.method == "lora" and not self.lora.enabled:
            raise ConfigError("moe.shared_experts.method", "moe.shared_experts.method is 'lora' but lora.enabled is "
                              "false; enable LoRA or choose moe.shared_experts.method: full.")


PREFERENCE_KIND = "preference"
"""The source kind whose records preference objectives learn from."""


def deepspeed_backend_message(family: str) -> str:
    """Why ``moe.expert_parallel.backend: deepspeed`` is refused for ``family``: only upcycled MPT has blocks it
    can swap."""
    return (f"moe.expert_parallel.backend: deepspeed swaps the MoE blocks of upcycled MPT models; {family} keeps its "
            "own blocks (use backend: native).")
