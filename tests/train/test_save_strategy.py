"""training.save_strategy (steps | epoch | both), training.checkpoint_naming, and checkpoints that stand alone:
tokenizer files in every checkpoint folder, so eval and AutoTokenizer work from a checkpoint by itself."""

import json
import shutil

import pytest

from moetune.cli import main
from moetune.config import load_config
from moetune.data.build import build_dataset_unless_current, stats_path_for
from moetune.data.encode import IGNORE_INDEX, encode_records
from moetune.data.tokenizer import train_bpe_tokenizer
from moetune.run_dir import checkpoint_dir_name, list_checkpoints
from moetune.train.checkpoint import TrainerState, earlier_checkpoint_hint, rotate_checkpoints
from moetune.train.output_dir import check_output_dir

from .conftest import read_metrics


def test_checkpoint_names_of_both_namings_sort_by_step_and_rotate_together(tmp_path):
    for name, step in [("checkpoint-step-4", 4), ("checkpoint-epoch-1", 3), ("checkpoint-step-2", 2),
                       ("checkpoint-epoch-2", 6), ("checkpoint-step-6", 6)]:
        (tmp_path / name).mkdir()
        TrainerState(global_step=step).save(tmp_path / name)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-step-2", "checkpoint-epoch-1", "checkpoint-step-4", "checkpoint-step-6", "checkpoint-epoch-2"]
    assert earlier_checkpoint_hint(tmp_path / "checkpoint-step-4").endswith(
        f"training.resume_from_checkpoint={tmp_path / 'checkpoint-epoch-1'}.")
    check_output_dir(tmp_path)  # all of them are a run's own folders
    rotate_checkpoints(tmp_path, limit=2, keep="checkpoint-step-2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-step-2", "checkpoint-epoch-2"]
    assert [checkpoint_dir_name("step", 6), checkpoint_dir_name("step", 6, epoch=2), checkpoint_dir_name("kind", 6),
            checkpoint_dir_name("kind", 6, epoch=2)] == ["checkpoint-6", "checkpoint-6", "checkpoint-step-6",
                                                         "checkpoint-epoch-2"]


def test_epoch_checkpoints_hold_the_tokenizer_and_evaluate_on_their_own(tiny_run, tmp_path):
    config, out = tiny_run
    assert main(["train", "--config", str(config), "training.max_steps=-1", "training.num_train_epochs=2",
                 "training.save_strategy=epoch", "data.max_samples=32", "training.eval_steps=null"]) == 0
    checkpoints = list_checkpoints(out)
    states = [json.loads((p / "trainer_state.json").read_text()) for p in checkpoints]
    # One checkpoint at the end of each epoch, named by its step; each resumes at the start of the next epoch.
    assert [(s["epoch"], s["batches_done_in_epoch"]) for s in states] == [(1, 0), (2, 0)]
    assert [p.name for p in checkpoints] == [f"checkpoint-{s['global_step']}" for s in states]
    last_step = max(r["step"] for r in read_metrics(out) if "loss" in r)
    assert states[1]["global_step"] == last_step == 2 * states[0]["global_step"]

    from transformers import AutoTokenizer

    alone = tmp_path / "elsewhere" / "checkpoint"
    shutil.copytree(checkpoints[0], alone)  # away from the run's tokenizer/ folder
    assert AutoTokenizer.from_pretrained(alone).get_vocab() == AutoTokenizer.from_pretrained(out / "tokenizer").get_vocab()
    assert main(["eval", "--config", str(out / "config.yaml"), "--adapter-path", str(alone), "--max-samples", "4",
                 "inference.max_new_tokens=4"]) == 0
    assert json.loads((alone / "eval" / "report.json").read_text())["perplexity"]["tuned"]["tokens"] > 0


def test_max_target_length_caps_the_answer_and_drops_the_eos_of_a_cut_one():
    tokenizer = train_bpe_tokenizer(["Question: q\nAnswer: one two three four five six"] * 4, 300)
    records = [{"prompt": "Question: q\nAnswer:", "completion": " one two three four five six"},
               {"prompt": "Question: q\nAnswer:", "completion": " one"}]
    full = encode_records(records, tokenizer, 128)
    capped = encode_records(records, tokenizer, 128, max_target_length=2)
    answer = [sum(label != IGNORE_INDEX for label in labels) for labels in capped["labels"]]
    long_answer = sum(label != IGNORE_INDEX for label in full["labels"][0])
    assert long_answer > 3 and answer[0] == 2 and capped["labels"][0][-1] != tokenizer.eos_token_id
    assert capped["input_ids"][1] == full["input_ids"][1] and capped["input_ids"][1][-1] == tokenizer.eos_token_id


def test_a_dataset_is_rebuilt_only_when_its_source_or_settings_changed(tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "a?", "answer": "b"}\n')
    overrides = [f"data.output_path={tmp_path / 'built.jsonl'}", f"data.sources=[{{type: qa_jsonl, path: {qa}}}]"]
    config = load_config(None, overrides)
    assert build_dataset_unless_current(config) == 0
    built = (tmp_path / "built.jsonl").stat().st_mtime_ns
    assert build_dataset_unless_current(load_config(None, [*overrides, "data.max_samples=1"])) == 0
    assert "is up to date with data.sources; not rebuilt" in capsys.readouterr().err
    assert (tmp_path / "built.jsonl").stat().st_mtime_ns == built
    qa.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": "d"}\n')
    build_dataset_unless_current(config)
    assert json.loads(stats_path_for(tmp_path / "built.jsonl").read_text())["samples_total"] == 2
    capsys.readouterr()
    build_dataset_unless_current(load_config(None, [*overrides, "data.sources=[{type: qa_jsonl, path: " + str(qa) +
                                                    ", prompt_template: 'Q: {question} A:'}]"]))
    assert "not rebuilt" not in capsys.readouterr().err
    assert json.loads((tmp_path / "built.jsonl").read_text().splitlines()[0])["prompt"] == "Q: a? A:"


@pytest.mark.parametrize("value", ["weekly", "epochs"])
def test_save_strategy_takes_the_trainingarguments_words(value):
    with pytest.raises(Exception, match="training.save_strategy"):
        load_config(None, [f"training.save_strategy={value}"])
