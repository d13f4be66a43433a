"""OLMoE (Allen AI, top-8 of 64 experts) and FlexOlmo (``flex_olmo``, experts trained apart on
separate data and merged): softmax-routed experts, q/k norms in attention, no shared expert."""

from moetune.models.families._spec import FamilySpec, softmax_router
from moetune.models.families._tiny import tiny_config

SPEC = FamilySpec(
    name="olmoe",
    model_types=("olmoe", "flex_olmo"),
    tiny_configs={
        "olmoe": tiny_config(num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "flex_olmo": tiny_config(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    },
    random_init_model_type="olmoe",
    router=softmax_router(transformers_aux_loss=True),
)
