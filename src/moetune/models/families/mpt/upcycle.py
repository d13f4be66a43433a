"""Sparse upcycling (Komatsuzaki et al., 2022): a dense MPT becomes an MoE without retraining from scratch.

Each chosen block's FFN is copied into ``moe.upcycling.num_experts`` experts and a freshly initialised
router is put in front of them. With identical experts and renormalised top-k weights the MoE
block computes exactly the dense FFN, so the upcycled model starts where the dense one ended.
See docs/upcycling.md for why the experts must then be trained.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, MptForCausalLM

from moetune.errors import UserError
from moetune.models.families.mpt.modeling import MptMoeConfig, MptMoeForCausalLM
from moetune.models.load.dtypes import resolve_dtype
from moetune.models.load.loading_info import check_loading_info
from moetune.run_dir import holds_tokenizer

logger = logging.getLogger(__name__)

def moe_layer_indices(num_layers: int, every: int) -> list[int]:
    """Blocks that become MoE: every ``every``-th, counting from 1 (every=2 -> blocks 1, 3, 5, ...)."""
    return [index for index in range(num_layers) if index % every == every - 1]


def upcycled_config(dense_config, moe) -> MptMoeConfig:
    """The MptMoeConfig of the upcycled model: the dense config plus ``moe`` (a MoeConfig)."""
    values = {k: v for k, v in dense_config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    upcycling = moe.upcycling
    values.update(
        num_local_experts=upcycling.num_experts,
        num_experts_per_tok=upcycling.top_k,
        moe_layer_indices=moe_layer_indices(dense_config.n_layers, upcycling.every_n_blocks),
        capacity_factor=upcycling.capacity_factor,
        router_jitter_noise=upcycling.router_jitter,
        router_aux_loss_coef=moe.auxiliary_loss_weight,
        router_z_loss_coef=moe.router_z_loss_weight,
    )
    config = MptMoeConfig(**values)
    config.architectures = [MptMoeForCausalLM.__name__]
    return config


@torch.no_grad()
def upcycle_mpt(dense: MptForCausalLM, moe, generator: torch.Generator | None = None) -> MptMoeForCausalLM:
    """Return the sparse-upcycled copy of ``dense`` (an MptForCausalLM) following ``moe`` (a MoeConfig).

    Expert e of block b starts as block b's dense FFN (plus ``moe.upcycling.expert_noise_std``
    Gaussian noise relative to each weight's std, if set); routers are drawn from
    N(0, moe.upcycling.router_init_std).
    ``generator`` (a CPU generator) makes both reproducible: rebuilding the base to load an adapter
    trained on it must give the same router and experts.
    The model is built on the meta device and receives its tensors directly, so no
    throw-away random initialisation of a model E times larger than the dense one is paid for.
    """
    if isinstance(dense, MptMoeForCausalLM):
        raise UserError("This model is already upcycled (model_type mpt_moe); upcycling it again would nest experts.")
    if not isinstance(dense, MptForCausalLM):
        raise UserError(f"Sparse upcycling takes a dense MPT model (MptForCausalLM), got {type(dense).__name__}.")
    config = upcycled_config(dense.config, moe)
    upcycling = moe.upcycling
    dense_state = dense.state_dict()
    state = {}
    moe_layers = set(config.moe_layers())
    for key, tensor in dense_state.items():
        parts = key.split(".")  # transformer.blocks.N.ffn.{up,down}_proj.weight
        if parts[:2] == ["transformer", "blocks"] and parts[3] == "ffn" and int(parts[2]) in moe_layers:
            prefix = ".".join(parts[:4])
            for expert in range(upcycling.num_experts):
                state[f"{prefix}.experts.{expert}.{parts[4]}.weight"] = _expert_copy(tensor, upcycling.expert_noise_std,
                                                                                     generator)
            continue
        state[key] = tensor.clone()
    hidden = config.hidden_size
    reference = dense.transformer.wte.weight
    for index in moe_layers:
        # Drawn on the CPU so one seeded CPU generator reproduces the same router on any device.
        router = torch.empty(upcycling.num_experts, hidden, dtype=torch.float32).normal_(
            0.0, upcycling.router_init_std, generator=generator)
        state[f"transformer.blocks.{index}.ffn.router.weight"] = router.to(reference.device, reference.dtype)
    with torch.device("meta"):
        model = MptMoeForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gives lm_head its own copy; tie it back to the embedding
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # a tensor the state dict does not carry would otherwise stay without storage
        raise RuntimeError(f"upcycling left tensors without values: {left_on_meta[:5]}")
    model.generation_config = dense.generation_config
    model.train(dense.training)
    logger.info("upcycled %d of %d MPT blocks into %d experts each (top-%d routing)", len(moe_layers),
                config.n_layers, upcycling.num_experts, upcycling.top_k)
    return model


def _expert_copy(weight: torch.Tensor, noise_std: float, generator: torch.Generator | None) -> torch.Tensor:
    copy = weight.clone()
    if noise_std > 0:
        noise = torch.randn(copy.shape, generator=generator, dtype=torch.float32).to(copy.device)
        copy += (noise * noise_std * weight.float().std()).to(copy.dtype)
    return copy


def upcycle_checkpoint(config, model_dir: str, output_dir: str, dtype: str | None = None) -> int:
    """`moetune upcycle`: read a dense MPT from ``model_dir``, upcycle it per ``config.moe.upcycling``, and write
    config.json + safetensors (+ the tokenizer when ``model_dir`` has one) to ``output_dir``.

    The weights keep the dense checkpoint's dtype unless ``dtype`` ("float32", "bfloat16",
    "float16") says otherwise: ``model.torch_dtype`` is how training loads a model, and a float32
    checkpoint silently rounded to bfloat16 here would no longer compute the dense model's logits.
    """
    source = Path(model_dir)
    if not source.is_dir():
        raise UserError(f"--model {model_dir}: no such directory. Pass the folder of a dense MPT checkpoint "
                        "(config.json + weights); a hub id is not downloaded here: fetch it first, e.g. "
                        f"`hf download {model_dir} --local-dir DIR`, and pass DIR.")
    config_file = source / "config.json"
    if not config_file.is_file():
        raise UserError(f"--model {model_dir} has no config.json; it is not a Hugging Face model folder.")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON ({err}).") from None
    if model_type == "mpt_moe":
        raise UserError(f"--model {model_dir} is already upcycled (model_type 'mpt_moe'); pass the dense MPT it came from.")
    if model_type != "mpt":
        raise UserError(f"--model {model_dir} is a {model_type!r} model; sparse upcycling takes a dense MPT "
                        "(model_type 'mpt').")
    try:
        dense, info = MptForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype or "auto"),
                                                     output_loading_info=True)
    except OSError as err:
        raise UserError(f"--model {model_dir}: the weights could not be read ({err}).") from None
    check_loading_info(info, model_dir)
    model = upcycle_mpt(dense, config.moe)
    target = Path(output_dir)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    if holds_tokenizer(source):
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    # The verb's result: printed, as `moetune validate` prints its verdict, whatever the log level.
    print(f"upcycled {model.config.name_or_path or model_dir}: {len(model.moe_blocks())} MoE blocks x "
          f"{config.moe.upcycling.num_experts} experts (top-{config.moe.upcycling.top_k}, "
          f"{str(model.dtype).removeprefix('torch.')}) "
          f"written to {target}", file=sys.stderr)
    return 0
