"""The layout of a run folder: checkpoint names and order, the tokenizer folder, and when a run is finished."""

import json

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


def test_the_names_are_the_ones_the_stages_write():
    from moetune.models.trainable import esft
    from moetune.train.output_dir import is_own_entry

    assert run_dir.ESFT_FILES == (esft.SELECTION_FILE, esft.WEIGHTS_FILE)
    for name in (run_dir.METRICS_FILE, run_dir.TOKENIZER_DIR, run_dir.ADAPTER_CONFIG, *run_dir.ESFT_FILES,
                 "model.safetensors", checkpoint_dir_name("kind", 3), run_dir.PARTIAL_PREFIX + "checkpoint-3"):
        assert is_own_entry(name), name
