"""Loading a model: the factory (``build_model``), Hugging Face config overrides, 4-bit quantisation,
dtypes, and which attention and experts kernels run."""
