"""The shipped quickstart, end to end: data from data/, tiny model, LoRA, aux loss, expert usage, eval, checkpoints."""

from pathlib import Path

from moetune.cli import main

from .conftest import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_end_to_end_and_validation_loss_goes_down(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the quickstart names its sample data relative to the repository root
    paths = [f"data.output_path={tmp_path / 'all_data.jsonl'}", f"training.output_dir={tmp_path / 'run'}"]
    assert main(["data", "--config", "configs/quickstart.yaml", *paths]) == 0
    assert main(["train", "--config", "configs/quickstart.yaml", *paths]) == 0
    records = read_metrics(tmp_path / "run")
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    train = [r for r in records if "loss" in r]
    # From about ln(2048) = 7.6 at the start to well below it, and still falling after the first evaluation.
    assert len(evals) == 4 and train[0]["lm_loss"] > evals[0] + 1.0 and min(evals[1:]) < evals[0] - 0.1
    assert train[-1]["step"] == 200 and all(r["aux_loss"] > 1.0 and len(r["expert_usage"]) == 2 for r in train)
    best_step = min((r for r in records if "eval_loss" in r), key=lambda r: r["eval_loss"])["step"]
    kept = {p.name for p in (tmp_path / "run").glob("checkpoint-*")}  # save_total_limit 2, never the best
    assert kept == {f"checkpoint-{best_step}", "checkpoint-200"} or kept == {"checkpoint-150", "checkpoint-200"}
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
