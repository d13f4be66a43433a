"""Models: build a ready-to-train MoE model from config (factory), its losses, and MPT sparse upcycling.

Import from the submodules (``moetune.models.load.factory.build_model``). This package imports nothing
itself, so that importing the upcycled architecture (``moetune.models.families.mpt.modeling``, which registers
``mpt_moe`` with transformers' Auto classes) pulls in only torch and transformers.
"""
