"""packs_by_position_ids: whether packed rows keep samples apart follows the model as built (its family and
the attention kernel it runs after any fallback), not the kernel the config asked for."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from moetune.config import load_config
from moetune.data.dataloaders import build_train_eval_datasets
from moetune.data.packing import PackedCollator
from moetune.data.padding import PaddingCollator
from moetune.data.tokenizer import train_bpe_tokenizer
from moetune.models.families import get_family, packs_by_position_ids
from moetune.models.load.factory import build_model
from moetune.models.load.kernels import flattens_packed_rows


def tiny_config(architecture: str, attn_implementation: str, *overrides: str):
    shape = dict(get_family(architecture).tiny_configs[architecture])
    return load_config(None, [f"model.architecture={architecture}", "model.random_init=true", "model.torch_dtype=float32",
                              "model.max_seq_length=64", f"model.config_overrides={json.dumps(shape)}",
                              f"model.attn_implementation={attn_implementation}", "lora.enabled=false", *overrides])


def samples_stay_apart(model) -> bool:
    """Two samples packed into one row with restarting position_ids and no mask: does the second one's
    output equal its output alone?"""
    first = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    second = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
    return torch.allclose(packed[:, 7:], alone, atol=1e-5)


@pytest.mark.parametrize("architecture, requested, chosen, packs", [
    ("mixtral", "flash_attention_2", "sdpa", True),  # no flash-attn here: sdpa, which packs as well
    # Its attention sinks have no sdpa kernel, and its eager masks ignore position_ids: padded, not packed.
    ("gpt_oss", "sdpa", "eager", False),
    ("mpt", "sdpa", "eager", False),  # ALiBi: the forward takes no position_ids at all
])
def test_the_fact_follows_the_kernel_the_model_runs(architecture, requested, chosen, packs):
    model = build_model(tiny_config(architecture, requested), seed=0).eval()
    assert model.config._attn_implementation == chosen
    assert packs_by_position_ids(model) is packs
    assert samples_stay_apart(model) is packs


def test_a_kernel_without_a_packed_mask_does_not_pack():
    # An attention function registered by name gets no mask from transformers' masking_utils.
    AttentionInterface.register("unmasked_sdpa", sdpa_attention_forward)
    try:
        model = build_model(tiny_config("mixtral", "sdpa"), seed=0).eval()
        assert packs_by_position_ids(model) and samples_stay_apart(model)
        model.set_attn_implementation("unmasked_sdpa")
        assert not packs_by_position_ids(model) and not samples_stay_apart(model)
    finally:
        del AttentionInterface._global_mapping["unmasked_sdpa"]


def test_the_data_packs_exactly_when_the_model_keeps_packed_samples_apart(tmp_path):
    records = [{"text": f"pub fn f{i}() -> u32 {{ {i} * {i} }}", "source": "rust_repo", "repo": "r",
                "path": f"src/f{i}.rs", "kind": "function"} for i in range(30)]
    dataset = tmp_path / "all.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = train_bpe_tokenizer([r["text"] for r in records], 320)
    for architecture, requested in (("mixtral", "flash_attention_2"), ("gpt_oss", "sdpa"), ("mpt", "sdpa")):
        config = tiny_config(architecture, requested, f"data.output_path={dataset}", "validation.validation_split=0.2")
        model = build_model(config, seed=0)
        packs = packs_by_position_ids(model)
        data = build_train_eval_datasets(config, tokenizer, packs_by_position_ids=packs,
                                         flatten_packed_rows=flattens_packed_rows(model))
        assert data.packed is packs and config.data.packing
        assert isinstance(data.collator, PackedCollator if packs else PaddingCollator)
        # Asked for flash_attention_2, the Mixtral runs sdpa here: its packed rows are not flattened.
        assert not getattr(data.collator, "flatten", False)


def test_packed_rows_are_flattened_only_for_a_flash_kernel_the_model_runs():
    class Model(torch.nn.Module):
        def __init__(self, kernel):
            super().__init__()
            self.config = type("Config", (), {"_attn_implementation": kernel})()

    assert flattens_packed_rows(Model("flash_attention_2")) and flattens_packed_rows(Model("flash_attention_3"))
    assert not any(flattens_packed_rows(Model(kernel)) for kernel in ("sdpa", "eager", "flex_attention", None))
    fell_back = build_model(tiny_config("mixtral", "flash_attention_2"), seed=0)  # no flash-attn on this machine
    assert fell_back.config._attn_implementation == "sdpa" and not flattens_packed_rows(fell_back)
