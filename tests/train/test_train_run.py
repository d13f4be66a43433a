"""A whole tiny training run through the CLI: files, logged values, TensorBoard, adapter, merge, safety."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moetune.cli import main
from moetune.config import load_config

from .conftest import read_metrics, write_tiny_run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    config, out = write_tiny_run(tmp_path_factory.mktemp("run"))
    code = main(["train", "--config", str(config), "training.save_total_limit=2", "post_training.merge_and_save=true",
                 "training.max_steps=24", "training.eval_steps=8", "training.save_steps=8"])
    return code, config, out


def test_run_writes_the_output_contract(finished_run):
    code, config, out = finished_run
    assert code == 0
    assert load_config(out / "config.yaml").training.max_steps == 24  # the resolved config, overrides applied
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]  # save_total_limit=2
    for name in ("adapter_model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json"):
        assert (out / "checkpoint-24" / name).is_file(), name


def test_metrics_jsonl_has_every_field_and_expert_usage(finished_run):
    _, _, out = finished_run
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 25))
    for r in train:
        for key in ("epoch", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_second"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["aux_loss"], rel=1e-5)
        assert len(r["expert_usage"]) == 2 and all(len(layer) == 4 for layer in r["expert_usage"])
        assert all(sum(layer) == pytest.approx(1.0, abs=1e-3) for layer in r["expert_usage"])
        assert r["aux_loss"] >= 1.0  # top_k=2 routing gives >= ~2 when balanced; never near 0
    assert train[0]["lr"] == pytest.approx(0.0) and train[2]["lr"] == pytest.approx(3e-3, rel=1e-3)  # 2 warmup steps
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns


def test_tensorboard_has_losses_expert_scalars_and_heatmap(finished_run):
    _, _, out = finished_run
    [event_file] = list((out / "runs").rglob("events.out.tfevents.*"))[:1]
    events = EventAccumulator(str(event_file.parent), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("loss", "lm_loss", "aux_loss", "lr", "eval_loss", "expert_usage/layer_1/expert_3", "expert_balance/mean_entropy"):
        assert tag in tags["scalars"], tag
    assert len(events.Scalars("loss")) == 24
    assert "expert_usage/heatmap" in tags["images"]


def test_final_adapter_loads_with_peft_and_merged_model_with_auto(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moetune.models.load.factory import build_base_model

    _, config_path, out = finished_run
    config = load_config(config_path)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = build_base_model(config, tokenizer, seed=config.training.seed)  # the run's own random base
    tuned = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.tensor([tokenizer("fn main() { let amount = 10; }")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(tuned(ids).logits, merged(ids).logits, atol=1e-4)
        untrained = build_base_model(config, tokenizer, seed=config.training.seed)
        assert not torch.allclose(untrained(ids).logits, merged(ids).logits, atol=1e-3)


def test_a_second_run_into_the_same_output_dir_stops_clearly(finished_run, capsys):
    _, config, out = finished_run
    before = sorted(p.name for p in out.iterdir())
    assert main(["train", "--config", str(config)]) == 2
    assert "already holds another run's checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_nan_loss_steps_are_skipped_then_the_run_stops_naming_the_step(tiny_run, monkeypatch, capsys):
    import moetune.train.loop as loop

    config, out = tiny_run
    real = loop.compute_losses

    def poisoned(model, batch, cfg, reference=None):
        parts = real(model, batch, cfg, reference)
        parts.lm_loss_sum = parts.lm_loss_sum * float("nan")
        return parts

    monkeypatch.setattr(loop, "compute_losses", poisoned)
    assert main(["train", "--config", str(config), "advanced.max_bad_steps=3"]) == 1
    err = capsys.readouterr().err
    assert "step 1: loss or gradient is NaN/inf; the update was skipped" in err
    assert "stopping at step 3 after 3 NaN/inf steps in a row (the first at step 1)" in err
    assert "No checkpoint was saved before step 1: start again with a lower training.learning_rate" in err
    assert list(out.glob("checkpoint-*")) == []  # the weights at the stop are no point to resume from


def test_sigterm_saves_a_checkpoint_then_exits(tiny_run):
    config, out = tiny_run
    process = subprocess.Popen([sys.executable, "-m", "moetune", "train", "--config", str(config),
                                "training.max_steps=400", "training.save_steps=1000", "training.eval_steps=1000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGTERM
    assert "SIGTERM received: saved" in err
    [checkpoint] = list(out.glob("checkpoint-*"))
    assert (checkpoint / "adapter_model.safetensors").is_file()


def test_out_of_memory_exits_1_with_remedies(tiny_run, monkeypatch, capsys):
    import moetune.train.loop as loop

    def out_of_memory(model, batch, cfg, reference=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "compute_losses", out_of_memory)
    config, _ = tiny_run
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "failed: Out of memory at per_device_train_batch_size=4, model.max_seq_length=128." in err
    assert "raise training.gradient_accumulation_steps" in err and "Traceback" not in err


def test_auto_find_batch_size_halves_the_batch_and_keeps_the_effective_batch(tiny_run, monkeypatch):
    import moetune.train.loop as loop

    real = loop.compute_losses

    def needs_small_batches(model, batch, cfg, reference=None):
        if batch["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(model, batch, cfg, reference)

    monkeypatch.setattr(loop, "compute_losses", needs_small_batches)
    config, out = tiny_run
    assert main(["train", "--config", str(config), "training.auto_find_batch_size=true", "training.max_steps=2"]) == 0
    resolved = load_config(out / "config.yaml").training
    assert (resolved.per_device_train_batch_size, resolved.gradient_accumulation_steps) == (1, 8)
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_early_stopping_and_the_best_checkpoint_loaded_at_the_end(tiny_run, capsys):
    from safetensors.torch import load_file

    config, out = tiny_run
    # A learning rate this high makes eval loss rise after the first evaluation, so patience 1 stops the run.
    assert main(["train", "--config", str(config), "training.learning_rate=0.5", "training.eval_steps=2",
                 "training.save_steps=4", "training.load_best_model_at_end=true", "advanced.early_stopping_patience=1",
                 "training.max_grad_norm=0", "training.warmup_steps=0"]) == 0
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert evals[-1]["eval_loss"] > best["eval_loss"] and evals[-1]["step"] < 12  # stopped early
    assert f"loaded the best checkpoint (checkpoint-{best['step']})" in capsys.readouterr().err
    final = load_file(out / "adapter_model.safetensors")
    saved_best = load_file(out / f"checkpoint-{best['step']}" / "adapter_model.safetensors")
    assert final.keys() == saved_best.keys() and all((final[k] == saved_best[k]).all() for k in final)


def test_a_missing_dataset_stops_before_anything_is_written(tiny_run, tmp_path, capsys):
    config, out = tiny_run
    assert main(["train", "--config", str(config), f"data.output_path={tmp_path / 'nope.jsonl'}"]) == 2
    assert "does not exist; build it first with `moetune data" in capsys.readouterr().err
    assert not out.exists()
