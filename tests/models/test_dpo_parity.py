"""moetune's DPO equals TRL's DPOTrainer: the loss of each step and the LoRA weights after it, within 1e-5.

Checked with torch 2.13.0+cpu, transformers 5.25.0, peft 0.21.2, trl 1.16.0: the largest differences measured were
4e-7 in a loss and 1.3e-6 in a LoRA weight.

Both sides train one identical model (a tiny Mixtral and a tiny Qwen3-MoE built by moetune from config, float32,
attention LoRA; TRL gets a deep copy of it) on one fixed batch of three pairs of different prompt and completion
lengths, with plain SGD (no momentum, no weight decay, no clipping, constant learning rate), two steps:

- moetune: :func:`moetune.models.loss.objective.compute_losses` with the adapter switched off as the reference
  (:class:`~moetune.models.loss.reference.AdapterOff`), its ``LossParts.total`` differentiated, ``p -= lr * grad``;
- TRL: ``DPOTrainer.train()`` as a user runs it. TRL tokenizes its own text records, so the records are words
  of a word-level tokenizer whose ids are the hand-made ones (checked on TRL's prepared dataset); its collator
  pads to the right, as the batch here is padded. TRL's configs default to ``bf16=True``, which on CPU runs the
  forward under bf16 autocast (router logits then differ by ~2e-3); it is set to False, as moetune runs float32.

Why two steps: given a PeftModel, DPOTrainer takes a frozen copy of the adapter as it is at the start (its "ref"
adapter) as the reference, while moetune's AdapterOff takes the base model. The two agree when the adapter starts
at PEFT's init (lora_B = 0, the adapter is the identity), which is what moetune trains from; the first step then
has policy = reference (loss log 2), and the second step compares a policy that differs from its reference.

The MoE load-balancing loss is on for both, with the same weight (TRL's ``router_aux_loss_coef``, moetune's
``moe.auxiliary_loss_weight``): both add ``weight * aux`` computed over the policy's routed (non-padding) tokens.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from moetune.config import load_config
from moetune.data.encode import IGNORE_INDEX
from moetune.models.families import family_for_model_type
from moetune.models.load.factory import build_model
from moetune.models.loss.objective import compute_losses
from moetune.models.loss.reference import AdapterOff

VOCAB = 128
PAD, EOS = 0, 2
BETA, LEARNING_RATE, AUX_WEIGHT, STEPS = 0.5, 1.0, 0.01, 2
# (prompt, chosen, rejected) token ids; completions end with EOS, as TRL's text records get one appended.
PAIRS = [([5, 9, 17, 33], [40, 41, 42, EOS], [50, 51, EOS]),
         ([7, 8], [60, 61, 62, 63, 64, EOS], [70, EOS]),
         ([11, 12, 13, 14, 15, 16], [80, EOS], [90, 91, 92, 93, EOS])]
MODELS = {"mixtral": "mixtral", "qwen_moe": "qwen3_moe"}  # moetune architecture -> the model type it builds


def pair_batch(pairs) -> dict[str, torch.Tensor]:
    """moetune's pair batch: chosen rows then rejected rows, right-padded, labels only on the completions."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    for i, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion)
        attention_mask[i, :end] = 1
        labels[i, len(prompt):end] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pair_index": torch.arange(len(pairs))}


def word(token_id: int) -> str:
    # One width for every word: the tokenizer matches special tokens inside words ("w002" in "w0021" otherwise).
    return f"w{token_id:03d}"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose word ``word(i)`` is token i, so TRL's own tokenization yields the hand-made ids."""
    tokenizer = Tokenizer(models.WordLevel({word(i): i for i in range(VOCAB)}, unk_token=word(3)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=word(PAD), eos_token=word(EOS),
                                   unk_token=word(3))


def text(ids) -> str:
    return " ".join(word(i) for i in ids)


def moetune_config(architecture: str, loss: str):
    tiny = family_for_model_type(MODELS[architecture]).tiny_configs[MODELS[architecture]]
    # Qwen3-MoE's head_dim is not a key moetune's overrides accept; its default, hidden / heads, is the tiny 16.
    overrides = "{" + ", ".join(f"{key}: {value}" for key, value in tiny.items() if key != "head_dim") + "}"
    return load_config(None, [f"model.architecture={architecture}", "model.random_init=true", "model.torch_dtype=float32",
                              "model.max_seq_length=64", f"model.config_overrides={overrides}", "lora.r=4",
                              "lora.lora_alpha=8", "lora.lora_dropout=0.0", f"moe.auxiliary_loss_weight={AUX_WEIGHT}",
                              "training.objective=dpo", f"training.dpo_beta={BETA}", f"training.dpo_loss={loss}"])


def train_moetune(model, config) -> list[dict[str, float]]:
    """STEPS plain SGD steps on the fixed batch; each step's loss and mean rewards."""
    batch, logged = pair_batch(PAIRS), []
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(STEPS):
        parts = compute_losses(model, batch, config, AdapterOff())
        parts.total.backward()
        with torch.no_grad():
            for param in trainable:
                param -= LEARNING_RATE * param.grad
                param.grad = None
        preference = parts.preference
        logged.append({"loss": parts.total.item(), "rewards/chosen": preference.chosen_rewards.mean().item(),
                       "rewards/rejected": preference.rejected_rewards.mean().item(),
                       "rewards/margins": (preference.chosen_rewards - preference.rejected_rewards).mean().item(),
                       "aux_loss": parts.aux_loss.item()})
    return logged


def train_trl(model, loss: str, output_dir) -> list[dict[str, float]]:
    records = [{"prompt": text(p), "chosen": " " + text(c[:-1]), "rejected": " " + text(r[:-1])} for p, c, r in PAIRS]
    args = DPOConfig(output_dir=str(output_dir), per_device_train_batch_size=len(PAIRS), max_steps=STEPS,
                     learning_rate=LEARNING_RATE, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=0.0, beta=BETA, loss_type=[loss], router_aux_loss_coef=AUX_WEIGHT,
                     activation_checkpointing=False, max_length=None, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, bf16=False, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=word_tokenizer())
    prepared = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    assert prepared == [tuple(pair) for pair in PAIRS]  # TRL sees exactly moetune's tokens
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_dpo_step_equals_trl(architecture, loss, tmp_path):
    config = moetune_config(architecture, loss)
    model = build_model(config, seed=7)
    theirs_model = copy.deepcopy(model)

    ours = train_moetune(model, config)
    theirs = train_trl(theirs_model, loss, tmp_path)

    assert len(theirs) == STEPS
    for step, (mine, trl) in enumerate(zip(ours, theirs, strict=True)):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "aux_loss"):
            assert mine[key] == pytest.approx(trl[key], abs=1e-5), (step, key)
    first_preference = ours[0]["loss"] - AUX_WEIGHT * ours[0]["aux_loss"]
    assert first_preference == pytest.approx(math.log(2) if loss == "sigmoid" else (1 / (2 * BETA)) ** 2, abs=1e-6)
    assert abs(ours[1]["rewards/margins"]) > 1e-3  # the second step's policy differs from its reference

    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    theirs_params = dict(theirs_model.named_parameters())
    assert trained and all(".default." in name for name in trained)
    for name, param in trained.items():
        torch.testing.assert_close(param, theirs_params[name], atol=1e-5, rtol=0, msg=name)
    assert all(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)  # every adapter trained
