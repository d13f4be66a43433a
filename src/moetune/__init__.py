"""moetune: config-driven fine-tuning of Mixture-of-Experts language models."""

from moetune.auto_classes import register_with_transformers

__version__ = "0.1.0"

# AutoModelForCausalLM.from_pretrained then loads upcycled (mpt_moe) checkpoints; torch is not imported here.
register_with_transformers()
