"""The routing report on a model whose routing is forced: known shares, known mutual information."""

import math

import pytest
import torch

from moetune.config import load_config
from moetune.eval.routing_report import (
    build_routing_report,
    entropy_bits,
    group_of,
    mutual_information_bits,
    save_routing_heatmap,
)
from moetune.eval.scoring import score_records
from moetune.models.load.factory import build_base_model

WORDS = {"alpha": ("aa", "bb"), "beta": ("ww", "xx")}


def test_mutual_information_of_hand_made_tables():
    assert mutual_information_bits(torch.tensor([[2.0, 2, 0, 0], [0, 0, 2, 2]])) == pytest.approx(1.0)
    assert mutual_information_bits(torch.tensor([[1.0, 1], [3, 3]])) == pytest.approx(0.0)
    # 3 equally likely groups, each on its own expert: log2(3) bits
    assert mutual_information_bits(torch.eye(3) * 5) == pytest.approx(math.log2(3))
    assert entropy_bits(torch.tensor([1.0, 1, 2])) == pytest.approx(1.5)


def test_groups_are_qa_labels_and_sample_kinds():
    assert group_of({"source": "qa_jsonl", "expert_label": "refunds", "kind": "qa"}) == "label:refunds"
    assert group_of({"source": "qa_jsonl", "expert_label": None}) == "label:none"
    assert group_of({"source": "rust_repo", "kind": "function"}) == "kind:function"


def _word_tokenizer():
    """One token per word, so every sample's token count is known exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "aa": 4, "bb": 5, "ww": 6, "xx": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _forced_model(tokenizer, experts_of: dict[str, tuple[int, int]]):
    """A tiny Mixtral whose router input is the token's embedding in every layer, and whose router sends
    the words of each group to the two experts ``experts_of[group]`` (the first preferred)."""
    config = load_config(None, [
        "model.architecture=mixtral", "model.random_init=true", "model.torch_dtype=float32", "model.max_seq_length=64",
        "model.config_overrides={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,"
        " num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2, max_position_embeddings: 128}"])
    model = build_base_model(config, tokenizer, seed=config.training.seed).eval()
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.zero_()
        embed[:, 2] = 1.0  # special tokens point along dimension 2 (never counted)
        for dim, group in enumerate(WORDS):
            for word in WORDS[group]:
                embed[tokenizer.convert_tokens_to_ids(word)] = torch.nn.functional.one_hot(torch.tensor(dim), 64).float()
        for layer in model.model.layers:
            # No attention output and no expert output: the residual stream stays the embedding.
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            gate = layer.mlp.gate.weight
            gate.zero_()
            for dim, group in enumerate(WORDS):
                first, second = experts_of[group]
                gate[first, dim], gate[second, dim] = 2.0, 1.0
    return model


def _records():
    # alpha: 3 samples x 4 words = 12 tokens; beta: 2 samples x 6 words = 12 tokens
    alpha = [{"prompt": "aa bb", "completion": " bb aa", "source": "qa_jsonl", "kind": "qa", "expert_label": "alpha"}] * 3
    beta = [{"prompt": "ww xx ww", "completion": " xx ww xx", "source": "qa_jsonl", "kind": "qa", "expert_label": "beta"}] * 2
    return alpha + beta


@pytest.mark.parametrize("experts_of, shares, mi_bits", [
    # disjoint experts: the expert tells the label -> I = H(label) = 1 bit
    ({"alpha": (0, 1), "beta": (2, 3)}, {"alpha": [0.5, 0.5, 0, 0], "beta": [0, 0, 0.5, 0.5]}, 1.0),
    # one shared expert: p(l, e) = 1/4 on four cells, p(e1) = 1/2 -> I = 2 * 1/4 * log2(2) = 0.5 bit
    ({"alpha": (0, 1), "beta": (2, 1)}, {"alpha": [0.5, 0.5, 0, 0], "beta": [0, 0.5, 0.5, 0]}, 0.5),
    # the same experts for both: the expert says nothing about the label
    ({"alpha": (3, 0), "beta": (0, 3)}, {"alpha": [0.5, 0, 0, 0.5], "beta": [0.5, 0, 0, 0.5]}, 0.0),
])
def test_forced_routing_gives_the_expected_shares_and_mutual_information(experts_of, shares, mi_bits, tmp_path):
    tokenizer = _word_tokenizer()
    model = _forced_model(tokenizer, experts_of)
    result = score_records(model, tokenizer, _records(), max_seq_length=64, batch_size=2)
    assert result.top_k == 2
    report = build_routing_report(result.routing_counts, result.top_k)
    assert report.groups == ("label:alpha", "label:beta")
    assert report.tokens == {"label:alpha": 12, "label:beta": 12}  # bos/eos not counted
    for group in WORDS:
        assert report.shares[f"label:{group}"] == [pytest.approx(shares[group])] * 2  # both layers
    assert report.mutual_information_bits == [pytest.approx(mi_bits, abs=1e-9)] * 2
    assert report.group_entropy_bits == pytest.approx(1.0)
    assert report.specialisation == pytest.approx(mi_bits, abs=1e-9)  # H(label) = 1 bit
    png = save_routing_heatmap(report, tmp_path / "routing.png", "forced")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_group_has_no_specialisation_figure():
    report = build_routing_report({"kind:function": torch.tensor([[4.0, 2, 2, 0]]), "kind:empty": torch.zeros(1, 4)}, 2)
    assert report.groups == ("kind:function",)  # a group without routed tokens is left out
    assert report.tokens == {"kind:function": 4}
    assert report.shares["kind:function"] == [[0.5, 0.25, 0.25, 0.0]]
    assert report.specialisation is None
