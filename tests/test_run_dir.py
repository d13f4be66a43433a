"""The layout of a run folder: checkpoint names and order, the tokenizer folder, and when a run is finished."""

import json
import re
from pathlib import Path

from moetune import run_dir
from moetune.run_dir import (
    checkpoint_dir_name,
    has_final_weights,
    latest_checkpoint,
    list_checkpoints,
    step_in_checkpoint_name,
)


def test_checkpoint_names_state_their_step_or_epoch():
    assert checkpoint_dir_name("step", 12) == "checkpoint-12"
    assert checkpoint_dir_name("step", 12, epoch=2) == "checkpoint-12"
    assert checkpoint_dir_name("kind", 12) == "checkpoint-step-12"
    assert checkpoint_dir_name("kind", 12, epoch=2) == "checkpoint-epoch-2"
    assert [step_in_checkpoint_name(n) for n in ("checkpoint-12", "checkpoint-step-7", "checkpoint-epoch-2",
                                                 ".partial-checkpoint-4", "checkpoint-x")] == [12, 7, None, None, None]


def test_checkpoints_are_listed_oldest_first_and_partial_saves_are_not_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path) is None
    for name in ("checkpoint-10", "checkpoint-step-4", "checkpoint-epoch-1", ".partial-checkpoint-12", "tokenizer"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-epoch-1" / run_dir.STATE_FILE).write_text(json.dumps({"global_step": 4}))
    (tmp_path / "checkpoint-3").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-step-4", "checkpoint-epoch-1", "checkpoint-10"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_a_run_is_finished_once_its_final_adapter_model_or_experts_are_saved(tmp_path):
    assert not has_final_weights(tmp_path / "missing")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "adapter_config.json").write_text("{}")
    assert not has_final_weights(tmp_path)  # a checkpoint's adapter is not the final one
    finals = {"adapter": ["adapter_config.json"], "full model": ["model.safetensors"],
              "sharded model": ["model-00001-of-00002.safetensors"], "esft": list(run_dir.ESFT_FILES)}
    for kind, names in finals.items():
        folder = tmp_path / kind
        folder.mkdir()
        for name in names:
            (folder / name).write_text("")
        assert has_final_weights(folder), kind
    (tmp_path / "half of esft").mkdir()
    (tmp_path / "half of esft" / run_dir.ESFT_FILES[0]).write_text("")
    assert not has_final_weights(tmp_path / "half of esft")


def _name_constants() -> set[str]:
    """Every name run_dir gives an entry of a run folder: its upper-case strings and tuples of strings, less the
    patterns, affixes and the one name found only inside a checkpoint."""
    not_names = ("CHECKPOINT_NAME", "FULL_MODEL_SHARD", "FULL_MODEL_WEIGHTS", "TMP_SUFFIX", "PARTIAL_PREFIX", "STATE_FILE")
    names = set()
    for key, value in vars(run_dir).items():
        if not key.isupper() or key in not_names:
            continue
        if isinstance(value, str):
            names.add(value)
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            names.update(value)
    return names


def test_what_moetune_may_overwrite_is_exactly_the_run_folders_names():
    from moetune.train.output_dir import OWN_NAMES, OWN_PATTERNS, is_own_entry

    rewritten = {run_dir.CONFIG_FILE + run_dir.TMP_SUFFIX, run_dir.METRICS_FILE + run_dir.TMP_SUFFIX}
    assert OWN_NAMES == _name_constants() | rewritten
    assert OWN_PATTERNS == (run_dir.CHECKPOINT_NAME, re.escape(run_dir.PARTIAL_PREFIX) + run_dir.CHECKPOINT_NAME,
                            run_dir.FULL_MODEL_SHARD)
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", checkpoint_dir_name("kind", 3),
                 run_dir.PARTIAL_PREFIX + "checkpoint-3", "additional_chat_templates"):
        assert is_own_entry(name), name
    for name in ("model.bin", "notes.txt", "checkpoint-x", "config.yml", "model-1.safetensors"):
        assert not is_own_entry(name), name


def test_the_names_are_the_ones_the_stages_write(tmp_path):
    from moetune.data.tokenizer import train_bpe_tokenizer
    from moetune.models.trainable import esft

    assert run_dir.ESFT_FILES == (esft.SELECTION_FILE, esft.WEIGHTS_FILE)
    tokenizer = train_bpe_tokenizer(["fn main() {}"] * 20, 280)
    tokenizer.chat_template = {"default": "{{ messages }}", "tool_use": "{{ tools }}"}  # two: the folder of others too
    tokenizer.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == set(run_dir.TOKENIZER_FILES[:4])
    assert run_dir.holds_tokenizer(tmp_path) and not run_dir.holds_tokenizer(tmp_path / "additional_chat_templates")


def test_only_run_dir_spells_the_file_names_of_a_run_folder():
    # Names that could mean something else (config.json of a hub model, the eval verb) are left out.
    names = [run_dir.METRICS_FILE, run_dir.LOCK_FILE, run_dir.RUN_FILE, run_dir.STATE_FILE, run_dir.ADAPTER_CONFIG,
             *run_dir.ADAPTER_WEIGHTS, *run_dir.ESFT_FILES, *run_dir.TOKENIZER_FILES, run_dir.GENERATION_CONFIG,
             run_dir.FULL_MODEL_INDEX]
    package = Path(run_dir.__file__).parent
    spelled = [f"{path.relative_to(package)}: {name}" for path in sorted(package.rglob("*.py")) if path.name != "run_dir.py"
               for name in names if re.search(rf"""["']{re.escape(name)}["']""", path.read_text())]
    assert spelled == []
