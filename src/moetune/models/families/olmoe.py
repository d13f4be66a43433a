"""OLMoE (Allen AI): top-8 of 64 softmax-routed experts, q/k norms in attention, no shared expert."""

from moetune.models.families._spec import FamilySpec

SPEC = FamilySpec(
    name="olmoe",
    model_types=("olmoe",),
    summary="OLMoE-1B-7B: LoRA on q/k/v/o_proj, experts frozen, Switch load-balancing loss (as transformers).",
    tiny_configs={
        "olmoe": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, vocab_size=128,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    },
    random_init_model_type="olmoe",
    attention={},
    routing="softmax over all experts, top-k, not renormalised (norm_topk_prob false)",
)
