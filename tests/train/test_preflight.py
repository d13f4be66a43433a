"""`moetune validate` refuses what `moetune train` refuses, with the same error.

Every ConfigError / UserError raised on train's way to its first step is listed in PRE_STEP_RAISES (read
from the source, so a new one must be listed), with what answers for it: the CASES below, where validate
and train raise the same error (type, key, message) and so does the code that raised it before
validation existed (the real build on weights, the first step's routing targets, the optimizer); or why
validate cannot know it (the weights, the launch, the run folder's state, the data file).
"""

from __future__ import annotations

import ast
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from moetune.cli import main
from moetune.config import load_config
from moetune.data.chat_templates import read_chat_template
from moetune.errors import ConfigError, UserError
from moetune.models.check import check_config_against_model
from moetune.models.families import family_for_model_type, family_of
from moetune.models.layout import find_moe_blocks, innermost_model
from moetune.models.load.factory import build_model
from moetune.models.routing.supervision import label_targets
from moetune.models.trainable.counts import count_parameters
from moetune.train.loop import train
from moetune.train.optim import build_optimizer
from moetune.train.output_dir import check_output_dir
from moetune.train.preflight import validate

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "moetune"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MPT = ["model.architecture=mpt", "model.random_init=true", "model.torch_dtype=float32", "model.max_seq_length=128",
       "model.config_overrides={n_layers: 2, d_model: 64, n_heads: 4, vocab_size: 128, max_seq_len: 128}",
       "moe.upcycling.num_experts=4", "lora.r=4", "lora.lora_dropout=0.0"]
UPCYCLED = [*MPT, "moe.upcycling.enabled=true"]
FOLDER = ["model.torch_dtype=float32", "model.max_seq_length=64", "lora.r=4", "lora.lora_dropout=0.0"]


@dataclass(frozen=True)
class Case:
    """A config train refuses before its first step: ``base`` (quickstart, mpt, or a model_type whose tiny
    checkpoint folder is model.name) with ``overrides`` ({tmp} is a scratch folder); the error expected;
    ``real``: the code that raises it in the run (build: build_model on weights, step: the routing targets
    of the first step, optimizer: build_optimizer, folder: the output_dir check, template: reading
    data.chat_template when the tokenizer loads; None: the schema, so
    load_config); ``hide``: a package
    made to look uninstalled."""

    id: str
    base: str
    overrides: tuple[str, ...]
    error: type
    key: str | None
    message: str
    real: str | None = "build"
    hide: str | None = None


CASES = [
    # The four, on the quickstart's tiny Mixtral.
    Case("expert_lora_dropout", "quickstart", ("moe.expert_training=lora", "lora.lora_dropout=0.1"), ConfigError,
         "lora.lora_dropout", "LoRA on expert parameters (model.layers.0.mlp.experts.gate_up_proj, ...) cannot be "
         "combined with dropout"),
    Case("unknown_target", "quickstart", ("lora.target_modules=[no_such_proj]",), ConfigError, "lora.target_modules",
         "lora.target_modules names 'no_such_proj', but this model has no Linear module of that name"),
    Case("router_bias_mixtral", "quickstart", ("moe.router_bias_update_rate=0.01",), ConfigError,
         "moe.router_bias_update_rate", "correction bias, which 'mixtral' models cannot do: they have none"),
    Case("shared_experts_mixtral", "quickstart", ("moe.shared_experts.train=true",), ConfigError,
         "moe.shared_experts.train", "this 'mixtral' model (mixtral family) has no shared experts: its MoE blocks "
         "(model.layers.0.mlp, one of 2) hold gate, experts"),
    # More of what the model's config decides, on the same model.
    Case("context", "quickstart", ("model.max_seq_length=1024",), ConfigError, "model.max_seq_length",
         "model.max_seq_length (1024) is longer than the model's context (max_position_embeddings: 512"),
    Case("targets_all_excluded", "quickstart", ("lora.exclude_modules=[q_proj, k_proj, v_proj, o_proj]",), ConfigError,
         "lora.target_modules", "with lora.exclude_modules ['q_proj', 'k_proj', 'v_proj', 'o_proj'] leaves no module"),
    Case("override_typo", "quickstart", ("model.config_overrides={num_hidden_layer: 2}",), ConfigError,
         "model.config_overrides.num_hidden_layer", "is not a setting of MixtralConfig. Did you mean 'num_hidden_layers'?"),
    Case("override_invalid", "quickstart", ("model.config_overrides={num_hidden_layers: two}",), ConfigError,
         "model.config_overrides", "model.config_overrides is not a valid MixtralConfig: Validation error for field "
         "'num_hidden_layers': TypeError: Field 'num_hidden_layers' expected int, got str (value: 'two')"),
    Case("override_invalid_on_a_checkpoint", "qwen3_moe", ("model.config_overrides={num_hidden_layers: two}",),
         ConfigError, "model.config_overrides.num_hidden_layers", "model.config_overrides.num_hidden_layers: 'two' is "
         "not valid for Qwen3MoeConfig"),
    Case("esft_no_file", "quickstart", ("moe.expert_training=esft", "lora.enabled=false", "moe.esft.experts={tmp}/none.json"),
         UserError, None, "moe.esft.experts: {tmp}/none.json does not exist"),
    Case("esft_selects_nothing", "quickstart", ("moe.expert_training=esft", "lora.enabled=false",
                                                "moe.esft.experts={tmp}/empty.json"),
         UserError, None, "selects no expert in any layer"),
    Case("esft_layers", "quickstart", ("moe.expert_training=esft", "lora.enabled=false", "moe.esft.experts={tmp}/three.json"),
         ConfigError, "moe.esft.experts", "selects experts for 3 MoE layers but this model has 2"),
    Case("esft_expert", "quickstart", ("moe.expert_training=esft", "lora.enabled=false", "moe.esft.experts={tmp}/nine.json"),
         ConfigError, "moe.esft.experts", "selects expert 9 in model.layers.0.mlp, which has 4 experts"),
    Case("label_to_expert", "quickstart", ("moe.router_supervision.weight=0.1", "moe.router_supervision.label_to_expert={payments: [7]}"),
         ConfigError, "moe.router_supervision.label_to_expert.payments", "names expert 7, but the model's MoE layers have 4 experts",
         real="step"),
    Case("output_dir_is_a_file", "quickstart", ("training.output_dir={tmp}/a_file",), UserError, None,
         "is a file, not a folder", real="folder"),
    Case("chat_template_file", "quickstart", ("data.chat_template={tmp}/none.jinja",), UserError, None,
         "data.chat_template: '{tmp}/none.jinja' is neither a template shipped with moetune (chatml) nor a file",
         real="template"),
    Case("optimizer_package", "quickstart", ("training.optim=adamw_8bit",), UserError, None,
         "training.optim: adamw_8bit needs bitsandbytes", real="optimizer", hide="bitsandbytes"),
    # MPT, dense and upcycled on the meta device.
    Case("deepspeed_dense_mpt", "mpt", ("moe.expert_parallel.backend=deepspeed",), ConfigError, "moe.expert_parallel.backend",
         "moe.expert_parallel.backend: deepspeed found no MoE block to replace"),
    Case("deepspeed_package", "mpt", ("moe.upcycling.enabled=true", "moe.expert_parallel.backend=deepspeed"), UserError, None,
         "moe.expert_parallel.backend: deepspeed needs the deepspeed package", hide="deepspeed"),
    Case("expert_lora_dense_mpt", "mpt", ("moe.expert_training=lora",), ConfigError, "moe.expert_training",
         "this model has no MoE block"),
    Case("full_experts_dense_mpt", "mpt", ("moe.expert_training=full",), ConfigError, "moe.expert_training",
         "this model has no MoE block"),
    Case("full_experts_dense_mpt_no_lora", "mpt", ("moe.expert_training=full", "lora.enabled=false"), ConfigError,
         "moe.expert_training", "this model has no MoE block"),
    Case("context_upcycled", "mpt", ("moe.upcycling.enabled=true", "model.max_seq_length=256"), ConfigError,
         "model.max_seq_length", "the model's context (max_seq_len: 128 in its config)"),
    Case("router_bias_upcycled", "mpt", ("moe.upcycling.enabled=true", "moe.router_bias_update_rate=0.01"), ConfigError,
         "moe.router_bias_update_rate", "which 'mpt' models cannot do: they have none"),
    Case("shared_experts_upcycled", "mpt", ("moe.upcycling.enabled=true", "moe.shared_experts.train=true"), ConfigError,
         "moe.shared_experts.train", "this 'mpt_moe' model (mpt family) has no shared experts: its MoE blocks "
         "(transformer.blocks.0.ffn, one of 2) hold router, experts"),
    # A checkpoint folder (architecture detected from its config.json).
    Case("shared_experts_qwen3", "qwen3_moe", ("moe.shared_experts.train=true",), ConfigError, "moe.shared_experts.train",
         "this 'qwen3_moe' model (qwen_moe family) has no shared experts"),
    Case("router_bias_deepseek_v2", "deepseek_v2", ("moe.router_bias_update_rate=0.01",), ConfigError,
         "moe.router_bias_update_rate", "which 'deepseek_v2' models cannot do: they have none"),
    Case("architecture_mismatch", "qwen3_moe", ("model.architecture=mixtral",), ConfigError, "model.architecture",
         "model.architecture is 'mixtral' but model.name"),
    Case("deepspeed_backend_detected", "qwen3_moe", ("moe.expert_parallel.backend=deepspeed",), ConfigError, "moe.expert_parallel.backend",
         "qwen_moe keeps its own blocks"),
    Case("upcycling_detected", "qwen3_moe", ("moe.upcycling.enabled=true",), ConfigError, "moe.upcycling.enabled",
         "model.name is a qwen_moe model, which is already an MoE"),
    Case("quantisation_package", "mixtral", ("model.load_in_4bit=true",), UserError, None,
         "model.load_in_4bit needs the bitsandbytes package", hide="bitsandbytes"),
    Case("unknown_model_type", "llama", (), ConfigError, "model.architecture",
         "is a 'llama' model, which moetune does not support"),
    Case("unreadable_config_json", "broken", (), UserError, None, "config.json has no readable model_type"),
    Case("unloadable_config_json", "no_such_type", ("model.architecture=mixtral",), UserError, None,
         "could not be loaded"),
    # The config alone tells (the schema): load_config refuses them for both.
    Case("expert_lora_without_lora", "quickstart", ("moe.expert_training=lora", "lora.enabled=false"), ConfigError,
         "moe.expert_training", "moe.expert_training is 'lora' but lora.enabled is false", real=None),
    Case("shared_lora_without_lora", "qwen2_moe", ("moe.shared_experts.train=true", "moe.shared_experts.method=lora",
                                                   "lora.enabled=false"),
         ConfigError, "moe.shared_experts.method", "moe.shared_experts.method is 'lora' but lora.enabled is false",
         real=None),
    Case("quantised_without_lora", "mixtral", ("model.load_in_4bit=true", "lora.enabled=false"), ConfigError,
         "lora.enabled", "only an adapter can train: set lora.enabled: true", real=None),
    Case("upcycling_quantised", "mpt", ("model.random_init=false", "model.load_in_8bit=true",
                                        "moe.upcycling.enabled=true"),
         ConfigError, "moe.upcycling.enabled", "cannot be done on 4/8-bit weights", real=None),
    Case("deepspeed_backend_mixtral", "quickstart", ("moe.expert_parallel.backend=deepspeed",), ConfigError, "moe.expert_parallel.backend",
         "mixtral keeps its own blocks (use backend: native)", real=None),
    Case("deepspeed_expert_parallel", "mpt", ("moe.upcycling.enabled=true", "moe.expert_parallel.backend=deepspeed",
                                              "moe.expert_parallel.size=3"),
         ConfigError, "moe.expert_parallel.size", "moe.upcycling.num_experts (4) must be divisible by "
         "moe.expert_parallel.size (3)", real=None),
    Case("compile_deepspeed_backend", "mpt", ("moe.upcycling.enabled=true", "moe.expert_parallel.backend=deepspeed",
                                              "advanced.torch_compile=true"),
         ConfigError, "advanced.torch_compile", "advanced.torch_compile does not apply to moe.expert_parallel.backend: deepspeed",
         real=None),
]

# Configs that differ from a case above only in what the model has: both checks accept them.
ACCEPTED = [
    ("quickstart", ()),
    ("mpt", ("moe.upcycling.enabled=true", "moe.expert_training=lora", "lora.lora_dropout=0.1")),  # per-expert Linears
    ("qwen2_moe", ("moe.shared_experts.train=true",)),
    ("deepseek_v3", ("moe.router_bias_update_rate=0.01",)),
]

# Every `raise ConfigError(...)` / `raise UserError(...)` in the code train runs before its first step, per
# module::function with their number, and what answers for them: the CASES proving validate raises them
# too, or why validate cannot know.
PRE_STEP_RAISES = {
    "models/load/factory.py::resolve_family": (1, ["unknown_model_type"]),
    "models/load/factory.py::check_router_bias_update": (1, ["router_bias_mixtral", "router_bias_upcycled",
                                                             "router_bias_deepseek_v2"]),
    "models/load/factory.py::check_context_length": (1, ["context", "context_upcycled"]),
    "models/load/pretrained.py::read_model_type": (2, ["unreadable_config_json"]
                                                   + ["network: a hub model's config, which validate does not read"]),
    "models/load/pretrained.py::read_model_config": (1, ["unloadable_config_json"]),
    "models/load/pretrained.py::check_model_type": (1, ["architecture_mismatch"]),
    "models/load/pretrained.py::check_not_quantised_twice": (1, "a checkpoint stored in MXFP4 (gpt-oss) with 4/8-bit: "
                                                             "the pass calls this function as the build does"),
    "models/load/pretrained.py::check_pretrained_settings": (2, ["deepspeed_backend_detected", "upcycling_detected"]),
    "models/load/pretrained.py::_from_pretrained": (1, "weights: the checkpoint's weight files cannot be read"),
    "models/load/meta.py::local_model_config": (1, "not on train's way: a folder's config.json is read with "
                                                   "read_model_config, as the build reads it"),
    "models/load/meta.py::offline_model_config": (2, "moetune plan's reading (--model-config, the Hugging Face cache); "
                                                     "train's plan check skips a model it cannot read"),
    "models/load/meta.py::_read_config": (1, "moetune plan's reading; train's plan check skips a model it cannot read"),
    "train/plan_check.py::check_plan": (1, "the GPUs a launch gets: training.plan_check: error on a plan over their "
                                           "memory (moetune plan --gpu says it ahead)"),
    "models/load/hf_config.py::check_overrides": (1, ["override_typo"]),
    "models/load/hf_config.py::build_random_init_config": (1, ["override_invalid"]),
    "models/load/hf_config.py::apply_overrides": (1, ["override_invalid_on_a_checkpoint"]),
    "models/load/loading_info.py::check_loading_info": (1, "weights: the checkpoint's weights do not fit its config"),
    "models/load/quant.py::require_bitsandbytes": (1, ["quantisation_package"]),
    "models/layout.py::resolve_target_modules": (2, ["unknown_target", "targets_all_excluded"]),
    "models/trainable/plan.py::check_shared_experts": (1, ["shared_experts_mixtral", "shared_experts_upcycled",
                                                           "shared_experts_qwen3"]),
    "models/trainable/plan.py::_check_experts": (1, ["full_experts_dense_mpt_no_lora"]),
    "models/trainable/expert_lora.py::plan_expert_adapters": (3, ["expert_lora_dense_mpt", "full_experts_dense_mpt",
                                                                  "expert_lora_dropout"]),
    "models/trainable/esft.py::read_selection": (4, ["esft_no_file", "esft_selects_nothing"]),
    "models/trainable/esft.py::install_selection": (2, ["esft_layers", "esft_expert"]),
    "models/trainable/esft.py::load_esft": (3, "state: resuming an ESFT run from a checkpoint"),
    "models/trainable/weights.py::_load_trainable_weights": (6, "state: resuming from a checkpoint's weights"),
    "models/families/mpt/deepspeed_moe.py::require_deepspeed": (1, ["deepspeed_package"]),
    "models/families/mpt/deepspeed_moe.py::check_deepspeed_conversion": (1, ["deepspeed_dense_mpt"]),
    "models/families/mpt/upcycle.py::upcycle_mpt": (2, "not on train's way: build_mpt upcycles dense MPT only"),
    "models/families/mpt/upcycle.py::upcycle_checkpoint": (6, "`moetune upcycle` only"),
    "models/routing/supervision.py::check_label_experts": (1, ["label_to_expert"]),
    "train/output_dir.py::check_output_dir": (6, ["output_dir_is_a_file"]),
    "train/optim.py::require_optimizer_package": (1, ["optimizer_package"]),
    "train/optim.py::decay_groups": (1, "a guard: the training plan refuses a plan that trains nothing first"),
    "train/loop.py::_train_once": (1, "data: data.output_path is written by `moetune data`, usually after validate"),
    "train/run_lock.py::acquire": (1, "state: another run holds training.output_dir"),
    "train/checkpoint.py::resolve_resume": (2, "state: training.resume_from_checkpoint and the checkpoints there"),
    "train/checkpoint.py::load": (2, "state: the checkpoint resumed from"),
    "train/checkpoint.py::load_checkpoint": (2, "state: the checkpoint resumed from"),
    "train/checkpoint.py::prepare_output_dir": (1, "state: another run's checkpoints in training.output_dir"),
    "train/accelerator.py::apply_cpu_offload": (2, "launch: advanced.use_cpu_offload needs a DeepSpeed / FSDP launch"),
    "train/accelerator.py::check_compile_launch": (1, "launch: advanced.torch_compile under ZeRO-3"),
    "train/accelerator.py::check_deepspeed_moe_launch": (4, "launch: moe.expert_parallel.backend deepspeed's launch and process count"),
    "data/tokenizer.py::load_or_train_tokenizer": (1, "data: the tokenizer is trained on the data file"),
    "data/tokenizer.py::load_run_tokenizer": (1, "state: the tokenizer a run saved"),
    "data/tokenizer.py::_from_pretrained": (2, "files: model.tokenizer / model.name's tokenizer files"),
    "data/dataloaders.py::_supervised_labels": (1, "data: labelled samples in the data file"),
    "data/dataloaders.py::_raise_empty_train": (1, "data: the data file's training split"),
    "data/dataloaders.py::check_record_kinds": (2, "data: the data file's kind of record against training.objective"),
    "data/records.py::read_records": (3, "data: the data file's lines"),
    "data/records.py::check_record": (5, "data: the data file's records"),
    "data/record_table.py::load_split_tables": (1, "data: data.output_path is written by `moetune data`"),
    "data/record_table.py::_record_facts": (1, "data: the data file's lines"),
    "data/rendering.py::render_record": (1, "data: a preference record met where samples are encoded one by one"),
    "data/encode.py::_encode_batch": (1, "data: a conversation the chat template cannot render, under data.strict"),
    "data/encode.py::_tokenize_slow": (1, "files: a tokenizer without offsets (no tokenizer.json) met with a conversation"),
    "data/chat_templates.py::read_chat_template": (2, ["chat_template_file"]),
    "data/chat_templates.py::apply_chat_template_setting": (1, "files: data.chat_template's control tokens against the "
                                                               "tokenizer's vocabulary"),
    "data/chat_templates.py::require_chat_template": (1, "data: a conversation in the data file met with a tokenizer "
                                                         "that has no chat template"),
}
SCANNED = ["models/load", "models/trainable", "models/families", "models/routing/supervision.py", "models/layout.py",
           "models/check.py", "train/preflight.py", "train/loop.py", "train/inputs.py", "train/accelerator.py",
           "train/output_dir.py", "train/checkpoint.py", "train/plan_check.py", "train/run_lock.py", "train/optim.py", "data/tokenizer.py",
           "data/packing.py", "data/padding.py", "data/dataloaders.py", "data/records.py", "data/record_table.py",
           "data/encode.py", "data/rendering.py", "data/chat_templates.py", "data/chat_render.py", "data/mixing.py"]


def user_error_raises() -> dict[str, int]:
    """module::function -> how many `raise ConfigError(...)` / `raise UserError(...)` it holds, in SCANNED."""
    found: dict[str, int] = {}

    def visit(node, path: str, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if (isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call)
                    and getattr(child.exc.func, "id", None) in ("ConfigError", "UserError")):
                key = f"{path}::{function}"
                found[key] = found.get(key, 0) + 1
            visit(child, path, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function)

    for entry in SCANNED:
        target = PACKAGE / entry
        for file in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            visit(ast.parse(file.read_text()), str(file.relative_to(PACKAGE)), "<module>")
    return found


def test_every_error_before_the_first_step_is_accounted_for():
    assert user_error_raises() == {key: count for key, (count, _) in PRE_STEP_RAISES.items()}
    ids = {case.id for case in CASES}
    named = [name for _, answer in PRE_STEP_RAISES.values() if isinstance(answer, list) for name in answer
             if not name.startswith("network:")]
    assert set(named) <= ids
    # Every case that is not the schema's answers for a raise listed above.
    assert {case.id for case in CASES if case.real is not None} <= set(named)


# ------------------------------------------------------------------------------------------ the cases


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``folders(kind)`` -> a model folder: a tiny checkpoint of a model_type, or a config.json moetune refuses."""
    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind in made:
            return made[kind]
        folder = made[kind] = root / kind
        folder.mkdir()
        if kind == "broken":
            (folder / "config.json").write_text("{")
        elif kind == "no_such_type":
            (folder / "config.json").write_text('{"model_type": "no_such_type"}')
        elif kind == "llama":
            LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        vocab_size=128).save_pretrained(folder)
        else:
            values = family_for_model_type(kind).tiny_configs[kind]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **values)).save_pretrained(folder)
        return folder

    return make


def config_of(base: str, overrides, tmp_path: Path, folders):
    """The Config of a case: its base, a scratch output_dir, then its overrides."""
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    out = [] if any(o.startswith("training.output_dir=") for o in overrides) else [f"training.output_dir={tmp_path / 'out'}"]
    if base == "quickstart":
        return load_config(QUICKSTART, [*out, *overrides])
    if base == "mpt":
        return load_config(None, [*MPT, *out, *overrides])
    return load_config(None, [f"model.name={folders(base)}", *FOLDER, *out, *overrides])


def raised(work) -> tuple[type, str | None, str] | None:
    """(type, key, message) of the UserError ``work()`` raises; None when it raises none."""
    try:
        work()
    except UserError as err:
        return type(err), getattr(err, "key", None), str(err)
    return None


def hide_package(monkeypatch, name: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda spec, *a: None if spec == name else real(spec, *a))


def run_real(case: Case, config) -> None:
    """What raises the case's error in a run without the pass: the build on weights, the first step, the optimizer."""
    if case.real == "build":
        build_model(config, seed=0)
    elif case.real == "step":
        label_targets(config.moe.router_supervision.label_to_expert, torch.zeros(4, dtype=torch.long), num_experts=4)
    elif case.real == "optimizer":
        build_optimizer(torch.nn.Linear(2, 2), config.training)
    elif case.real == "folder":
        check_output_dir(config.training.output_dir)
    elif case.real == "template":
        read_chat_template(config.data.chat_template)


def write_selections(tmp_path: Path) -> None:
    for name, selected in (("empty", [[], []]), ("three", [[0], [1], [2]]), ("nine", [[0, 9], [1]])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"selected": selected}))
    (tmp_path / "a_file").write_text("not a folder")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_validate_raises_what_train_raises_before_its_first_step(case, tmp_path, folders, monkeypatch):
    write_selections(tmp_path)
    if case.hide:
        hide_package(monkeypatch, case.hide)

    def load():
        return config_of(case.base, case.overrides, tmp_path, folders)

    by_validate = raised(lambda: validate(load(), "config.yaml"))
    by_train = raised(lambda: train(load()))
    assert by_validate is not None, f"validate accepts {case.overrides}"
    error, key, message = by_validate
    assert (error, key) == (case.error, case.key) and case.message.replace("{tmp}", str(tmp_path)) in message
    assert by_train == by_validate
    assert not (tmp_path / "out").exists()  # refused before train wrote anything
    if case.real is not None:  # and the code that raises it in a run without the pass agrees
        config = load()
        assert raised(lambda: run_real(case, config)) == by_validate


@pytest.mark.parametrize(("base", "overrides"), ACCEPTED, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "as is")
def test_validate_accepts_what_the_model_has_and_counts_what_the_run_trains(base, overrides, tmp_path, folders):
    config = config_of(base, overrides, tmp_path, folders)
    checked = check_config_against_model(config)
    assert validate(config, "config.yaml").splitlines() == [
        f"config.yaml: valid ({len(config.data.sources)} data source(s), output_dir {tmp_path / 'out'})", checked.summary()]
    real = build_model(config, seed=0)  # the run's build accepts it too, and the plan on the meta device was its plan
    family = family_of(real)
    blocks = find_moe_blocks(innermost_model(real), family.router_name)
    assert (checked.family, checked.model_type) == (family.name, innermost_model(real).config.model_type)
    assert (checked.trainable, checked.total) == count_parameters(real) and checked.trainable > 0
    assert checked.moe_layers == len(blocks) > 0


def test_validate_of_a_hub_model_checks_the_config_only_and_says_so(tmp_path):
    config = load_config(None, ["model.name=someone/not-downloaded", f"training.output_dir={tmp_path / 'out'}"])
    assert validate(config, "c.yaml").splitlines()[1] == (
        "config only: model.name 'someone/not-downloaded' is not a local folder with a config.json, so train checks "
        "the config against the model (LoRA targets, experts, context length) once it has read the model's config.")


def test_the_command_line_refuses_shared_experts_mixtral_has_not_in_one_paragraph(capsys):
    assert main(["validate", "--config", str(QUICKSTART), "moe.shared_experts.train=true"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.splitlines() == [
        "error: moe.shared_experts.train is true, but this 'mixtral' model (mixtral family) has no shared experts: its "
        "MoE blocks (model.layers.0.mlp, one of 2) hold gate, experts. Set moe.shared_experts.train: false."]
