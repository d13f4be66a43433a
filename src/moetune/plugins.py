"""The short-name registries: which module implements each data source kind and each model family.

Each table maps the name a config uses (``data.sources[].type``, ``model.architecture``) to the
dotted path of the module that implements it. The modules are imported with
:func:`importlib.import_module` when a name is first used, never here, so any stage can read the
names (the config layer checks them) without importing the stages that implement them: this
module imports nothing from moetune and sits below every stage.

Adding a source kind: write a module that exports a
:class:`moetune.data.sources.SourceKind` as ``SOURCE`` (its config class, how it reads samples,
its stats and summary, how its records are split, grouped and evaluated; see
``moetune/data/sources/qa_jsonl.py``), and add its name and module path to :data:`SOURCE_MODULES`.
The module may live outside moetune; it must import nothing heavy (torch, tree-sitter,
transformers) at module level, since ``moetune validate`` imports it to build the config.

Adding a model family: write ``moetune/models/families/<name>.py`` exporting a
:class:`moetune.models.families._spec.FamilySpec` as ``SPEC`` and add it to :data:`FAMILY_MODULES`.
A model type of a shape a family already has goes into that family's module instead. Either way the
type also gets its line in the test matrix (tests/models/test_families.py), and nothing else changes.

In both tables the key must equal the name the module's description carries; the loaders check it.
"""

from __future__ import annotations

SOURCE_MODULES: dict[str, str] = {
    "rust_repo": "moetune.data.sources.rust_repo",
    "qa_jsonl": "moetune.data.sources.qa_jsonl",
    "chat": "moetune.data.sources.chat",
    "instruction": "moetune.data.sources.instruction",
    "text": "moetune.data.sources.text",
    "preference": "moetune.data.sources.preference",
}
"""``data.sources[].type`` -> the module exporting that kind's ``SOURCE``. The order is the order of
kinds in error messages, the config reference, the stats file and the build summary."""

FAMILY_MODULES: dict[str, str] = {
    "afmoe": "moetune.models.families.afmoe",
    "cohere_moe": "moetune.models.families.cohere_moe",
    "deepseek": "moetune.models.families.deepseek",
    "ernie": "moetune.models.families.ernie",
    "gemma4": "moetune.models.families.gemma4",
    "gpt_oss": "moetune.models.families.gpt_oss",
    "granite": "moetune.models.families.granite",
    "granite_hybrid": "moetune.models.families.granite_hybrid",
    "hunyuan": "moetune.models.families.hunyuan",
    "jamba": "moetune.models.families.jamba",
    "kimi_linear": "moetune.models.families.kimi_linear",
    "lfm2_moe": "moetune.models.families.lfm2_moe",
    "llama4": "moetune.models.families.llama4",
    "minimax": "moetune.models.families.minimax",
    "minimax_m2": "moetune.models.families.minimax_m2",
    "mistral4": "moetune.models.families.mistral4",
    "mixtral": "moetune.models.families.mixtral",
    "mpt": "moetune.models.families.mpt",
    "nemotron_h": "moetune.models.families.nemotron_h",
    "olmoe": "moetune.models.families.olmoe",
    "phimoe": "moetune.models.families.phimoe",
    "qwen_moe": "moetune.models.families.qwen_moe",
    "qwen_next": "moetune.models.families.qwen_next",
}
"""``model.architecture`` -> the module exporting that family's ``SPEC``."""

FAMILY_NAMES: tuple[str, ...] = tuple(sorted(FAMILY_MODULES))
"""The accepted values of ``model.architecture``, in name order."""
