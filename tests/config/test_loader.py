"""load_config: strict keys, types, cross-field checks, overrides, print-config round trip."""

import textwrap

import pytest

from moetune.cli import main
from moetune.config import Config, dump_config, load_config, parse_override
from moetune.errors import ConfigError, UserError


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, text), overrides)
    return str(info.value)


def test_defaults_without_file():
    config = load_config(None)
    assert config == Config()
    assert config.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert config.training.max_steps == -1
    assert config.logging.tensorboard is True


def test_values_are_read_and_typed(tmp_path):
    config = load_config(write(tmp_path, """
        training:
          learning_rate: 2e-4        # YAML 1.1 reads this as a string; it is a number here
          num_train_epochs: 2
          save_total_limit: 3
        lora:
          target_modules: [q_proj, v_proj]
        data:
          sources:
            - {type: rust_repo, path: hyperswitch}
            - {type: qa_jsonl, path: qa.jsonl}
    """))
    assert config.training.learning_rate == pytest.approx(2e-4)
    assert isinstance(config.training.num_train_epochs, float)
    assert config.training.save_total_limit == 3
    assert config.lora.target_modules == ("q_proj", "v_proj")
    assert [s.type for s in config.data.sources] == ["rust_repo", "qa_jsonl"]
    assert config.data.sources[1].prompt_template == "Question: {question}\nAnswer:"


def test_unknown_key_names_path_line_suggestion_and_section_keys(tmp_path):
    message = error_of(tmp_path, """
        training:
          output_dir: out
          learnin_rate: 1.0e-4
    """)
    assert "c.yaml:4" in message
    assert "unknown key 'training.learnin_rate'" in message
    assert "Did you mean training.learning_rate?" in message
    assert "Valid keys in training: output_dir, num_train_epochs," in message


def test_unknown_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    message = error_of(tmp_path, "model:\n  learning_rate: 1.0\n")
    assert "Did you mean training.learning_rate? (it belongs in another section)" in message


def test_unknown_section_and_alias(tmp_path):
    assert "Did you mean training?" in error_of(tmp_path, "trainig:\n  seed: 1\n")
    assert "Did you mean training.num_train_epochs?" in error_of(tmp_path, "training:\n  epochs: 1\n")


def test_unknown_key_inside_a_source(tmp_path):
    message = error_of(tmp_path, """
        data:
          sources:
            - {type: qa_jsonl, path: a.jsonl, promt_template: "Q: {question}"}
    """)
    assert "unknown key 'data.sources[0].promt_template'" in message
    assert "Did you mean data.sources[0].prompt_template?" in message


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("training:\n  per_device_train_batch_size: four\n",
     "training.per_device_train_batch_size must be an integer, got 'four'."),
    ("training:\n  bf16: 'yes please'\n", "training.bf16 must be true or false, got 'yes please'."),
    ("training:\n  learning_rate: fast\n", "training.learning_rate must be a number, got 'fast'."),
    ("training:\n  save_total_limit: many\n", "training.save_total_limit must be an integer or null, got 'many'."),
    ("training:\n  optim: adam_w\n", "training.optim must be one of adamw_torch_fused, adamw_torch, adafactor, sgd, adamw_8bit; got 'adam_w'."),
    ("lora:\n  target_modules: q_proj\n", "lora.target_modules must be a list, got 'q_proj'."),
    ("lora:\n  target_modules: [q_proj, 3]\n", "lora.target_modules[1] must be a string, got 3."),
    ("model: fast\n", "model must be a mapping of keys, got 'fast'."),
    ("data:\n  sources:\n    - {type: rust_repository, path: x}\n",
     "data.sources[0].type must be one of rust_repo, qa_jsonl, chat, instruction, text, preference; got 'rust_repository'. Did you mean 'rust_repo'?"),
    ("data:\n  sources:\n    - {type: rust_repo}\n", "data.sources[0].path is required"),
])
def test_wrong_types_name_key_value_and_accepted(tmp_path, yaml_text, expected):
    assert expected in error_of(tmp_path, yaml_text)


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("training:\n  bf16: true\n  fp16: true\n", "training.bf16 and training.fp16 are both true; pick one"),
    ("training:\n  warmup_ratio: 1.0\n", "training.warmup_ratio must be in [0, 1), got 1.0."),
    ("training:\n  warmup_ratio: -0.1\n", "training.warmup_ratio must be in [0, 1), got -0.1."),
    ("training:\n  warmup_ratio: 0.1\n  warmup_steps: 10\n", "warmup_ratio and training.warmup_steps are both set"),
    ("training:\n  max_steps: 0\n", "training.max_steps must be a positive integer, or -1 to use num_train_epochs, got 0."),
    ("training:\n  learning_rate: 1.0e-5\n  min_learning_rate: 1.0e-4\n",
     "training.min_learning_rate must be in [0, training.learning_rate (1e-05)], got 0.0001."),
    ("training:\n  load_best_model_at_end: true\n  eval_steps: 30\n  save_steps: 100\n",
     "needs training.save_steps (100) to be a multiple of training.eval_steps (30)"),
    ("inference:\n  top_p: 0\n", "inference.top_p must be in (0, 1], got 0.0."),
    ("inference:\n  top_p: 1.5\n", "inference.top_p must be in (0, 1], got 1.5."),
    ("inference:\n  temperature: 0\n", "inference.temperature must be greater than 0, got 0.0."),
    ("lora:\n  lora_alpha: 0\n", "lora.lora_alpha must be greater than 0, got 0.0."),
    ("lora:\n  r: 0\n", "lora.r must be a positive integer, got 0."),
    ("validation:\n  validation_split: 1\n", "validation.validation_split must be in [0, 1), got 1.0."),
    ("moe:\n  upcycling:\n    top_k: 3\n", "moe.upcycling.top_k must be 1 or 2, got 3."),
    ("moe:\n  upcycling: {num_experts: 2, top_k: 2}\n  auxiliary_loss_weight: -1\n",
     "moe.auxiliary_loss_weight must be 0 or more, got -1.0."),
    ("model:\n  load_in_4bit: true\n  load_in_8bit: true\n", "model.load_in_4bit and model.load_in_8bit are both true"),
    ("model:\n  random_init: true\n", "model.random_init builds a model from config, so it needs model.architecture"),
    ("validation:\n  validation_split: 0\nadvanced:\n  early_stopping_patience: 3\n",
     "advanced.early_stopping_patience needs a validation split"),
    ("model:\n  architecture: mixtral\nmoe:\n  upcycling:\n    enabled: true\n",
     "moe.upcycling.enabled turns a dense MPT model into an MoE"),
    ("lora:\n  enabled: false\nmoe:\n  expert_training: esft\n  esft: {experts: e.json}\n  shared_experts: {train: true}\n",
     "moe.shared_experts.train does nothing under moe.expert_training: esft"),
])
def test_cross_field_and_range_checks(tmp_path, yaml_text, expected):
    assert expected in error_of(tmp_path, yaml_text)


def test_range_error_carries_the_line(tmp_path):
    message = error_of(tmp_path, "training:\n  seed: 1\n  warmup_ratio: 2\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}:3: training.warmup_ratio")


def test_duplicate_key_is_an_error(tmp_path):
    message = error_of(tmp_path, "training:\n  seed: 1\n  seed: 2\n")
    assert "key 'training.seed' is given twice (first at" in message and "c.yaml:2" in message


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="not valid YAML") as raised:
        load_config(write(tmp_path, "training:\n  seed: 1\n  lr: [unclosed\n"))
    assert "at line 4, column 1" in str(raised.value)  # where the parser found the problem, on one line
    assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")) == Config()


def test_parse_override_values_are_yaml():
    assert parse_override("training.learning_rate=1e-4") == ("training.learning_rate", "1e-4")
    assert parse_override("lora.target_modules=[q_proj, v_proj]") == ("lora.target_modules", ["q_proj", "v_proj"])
    assert parse_override("training.bf16=true") == ("training.bf16", True)
    assert parse_override("training.save_total_limit=null") == ("training.save_total_limit", None)
    assert parse_override("logging.run_name=a=b") == ("logging.run_name", "a=b")
    for bad in ("training.learning_rate", "=3", ".a=1", "a..b=1"):
        with pytest.raises(UserError, match="must look like section.key=value"):
            parse_override(bad)


def test_overrides_apply_over_the_file_and_are_validated(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: 1.0e-3\n  output_dir: a\n")
    config = load_config(path, ["training.learning_rate=1e-4", "lora.r=32", "training.output_dir=runs/lr1e-4"])
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.lora.r == 32
    assert config.training.output_dir == "runs/lr1e-4"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["lora.r=0"])
    assert str(info.value) == "override 'lora.r=0': lora.r must be a positive integer, got 0."
    with pytest.raises(ConfigError, match="override 'training.lr=1': unknown key 'training.lr'"):
        load_config(path, ["training.lr=1"])


def test_override_into_a_list_entry(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - {type: rust_repo, path: a}\n")
    assert load_config(path, ["data.sources.0.path=b"]).data.sources[0].path == "b"
    with pytest.raises(UserError, match="not an index"):
        load_config(path, ["data.sources.3.path=b"])


def test_print_config_output_loads_back_to_the_same_config(tmp_path):
    config = load_config(write(tmp_path, """
        model: {name: x, config_overrides: {hidden_size: 64}}
        training: {learning_rate: 3e-4, eval_steps: 5, save_total_limit: 2}
        data: {sources: [{type: qa_jsonl, path: q.jsonl, prompt_template: "Q: {question}\\nA:"}]}
    """))
    resolved = write(tmp_path, dump_config(config), "resolved.yaml")
    assert load_config(resolved) == config
    assert "min_learning_rate: 0.0" in resolved.read_text()  # defaults are spelled out


def test_a_key_moetune_makes_unnecessary_is_accepted_with_the_reason(tmp_path, capsys):
    path = tmp_path / "guide.yaml"
    path.write_text("training:\n  gradient_accumulation_steps: 4\n  gradient_accumulation_steps_auto: true\n")
    config = load_config(path)
    assert config.training.gradient_accumulation_steps == 4
    err = capsys.readouterr().err
    assert "training.gradient_accumulation_steps_auto is not needed and is ignored" in err
    assert "per-token mean over all of its micro-batches" in err


def _alias_bomb(levels: int, width: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_rejected_naming_the_file(tmp_path, capsys):
    path = write(tmp_path, _alias_bomb(9, 9))  # 9**9 values once expanded, from a few hundred bytes
    assert path.stat().st_size < 600

    assert main(["validate", "--config", str(path)]) == 2

    err = capsys.readouterr().err
    assert err == (f"error: {path}: its YAML aliases (*name) expand to more than 100,000 values; a config is far "
                   "smaller. Write the values out, or reuse fewer levels of anchors.\n")


def test_aliases_within_the_budget_still_work(tmp_path):
    config = load_config(write(tmp_path, """\
        lora:
          target_modules: &attn [q_proj, k_proj]
          exclude_modules: *attn
        """))
    assert config.lora.target_modules == config.lora.exclude_modules == ("q_proj", "k_proj")


def test_a_value_that_contains_itself_or_nests_absurdly_deep_is_a_user_error(tmp_path, capsys):
    assert "c.yaml:2: a YAML alias refers to the value that contains it" in error_of(tmp_path, """\
        model:
          name: &n [*n]
        """)
    assert error_of(tmp_path, "model: " + "[" * 5000 + "]" * 5000 + "\n").endswith(
        "c.yaml: the YAML is nested too deeply to be a config.")
    bomb = "&a [" + ", ".join(["&b [" + ", ".join(["x"] * 400) + "]"] + ["*b"] * 400) + "]"
    assert main(["validate", "--config", str(write(tmp_path, "{}\n")), f"data.sources={bomb}"]) == 2
    assert f"error: Override 'data.sources={bomb}': its YAML aliases (*name) expand to more than 100,000" in capsys.readouterr().err
