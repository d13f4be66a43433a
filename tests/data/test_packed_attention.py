"""Proof that packed rows keep attention inside each sample: a tiny Mixtral gives, for every packed
sample, the same logits as for that sample run alone (sdpa and eager, padded and flattened batches)."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moetune.data.packing import PackedCollator, PackedDataset, plan_packed_rows
from moetune.models.families import get_family

VOCAB = 101


def _tiny_mixtral(attn_implementation: str) -> MixtralForCausalLM:
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    torch.manual_seed(0)
    return MixtralForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def _samples() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (11, 7, 5, 9, 3, 12)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_logits_of_packed_samples_equal_logits_of_each_sample_alone(attn_implementation: str, flatten: bool):
    model = _tiny_mixtral(attn_implementation)
    assert get_family("mixtral").packs_by_position_ids  # where the trainer's packs_by_position_ids starts
    samples = _samples()
    encoded = {"input_ids": samples, "labels": samples}
    rows = plan_packed_rows([len(s) for s in samples], 24)
    assert len(rows) == 2 and all(len(row) > 1 for row in rows)  # two rows of several samples each

    class Encoded:  # the slice of the datasets.Dataset interface PackedDataset uses
        column_names = list(encoded)

        def __getitem__(self, indices):
            return {k: [v[i] for i in indices] for k, v in encoded.items()}

    dataset = PackedDataset(Encoded(), rows)
    batch = PackedCollator(pad_token_id=0, flatten=flatten)([dataset[0], dataset[1]])
    with torch.no_grad():
        # use_cache=False matters: with a cache object transformers skips the packed-sequence mask.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in samples]

    flat_logits = packed.reshape(-1, VOCAB) if flatten else None
    offset = 0
    for b, row in enumerate(rows):
        start = 0
        for index in row:
            n = len(samples[index])
            got = flat_logits[offset + start:offset + start + n] if flatten else packed[b, start:start + n]
            torch.testing.assert_close(got, alone[index], rtol=1e-4, atol=1e-5)
            start += n
        offset += sum(len(samples[i]) for i in row)


def test_without_restarting_positions_the_samples_would_mix():
    """The control: the same concatenation with ordinary positions changes later samples' logits."""
    model = _tiny_mixtral("sdpa")
    first, second = _samples()[:2]
    with torch.no_grad():
        joined = model(input_ids=torch.tensor([first + second]), use_cache=False).logits[0, len(first):]
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
    assert (joined - alone).abs().max() > 1e-2
