"""Preference training runs end to end on a tiny Mixtral: `moetune data` then `moetune train` with DPO, ORPO and KTO.

What the runs must show: the MoE parts stay on (aux loss, expert usage) beside the preference figures; the three
ways of getting the reference give the same steps; resume is exact; the final adapter merges; and a reference
that cannot be made is refused before any weight is loaded.
"""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from moetune.cli import main

from .conftest import WORDS, read_metrics, write_config


def write_dpo_config(path, root):
    """A DPO run of the tiny Mixtral on the pairs under ``root``: 4 steps of 4 pairs x 2 micro-batches."""
    return write_config(
        path, model={"max_seq_length": 64, "tokenizer_vocab_size": 384},
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        moe={"use_auxiliary_loss": True, "auxiliary_loss_weight": 0.01, "freeze_router": False},
        data={"output_path": str(root / "prefs.built.jsonl"), "sources": [{"type": "preference", "path": str(root / "prefs.jsonl")}]},
        validation={"validation_split": 0.25},
        training={"objective": "dpo", "output_dir": str(root / "run"), "max_steps": 4, "per_device_train_batch_size": 4,
                  "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 5.0e-3,
                  "lr_scheduler_type": "constant", "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "seed": 5},
        logging={"tensorboard": False})


def write_pairs(path, pairs: int = 48, seed: int = 0):
    """Pairs whose chosen completion names a payment word and whose rejected one a Rust keyword."""
    rng = random.Random(seed)
    payments, rust = WORDS[9:], WORDS[:9]
    with path.open("w") as f:
        for i in range(pairs):
            prompt = f"Question {i}: what does {rng.choice(WORDS)} do?\nAnswer:"
            record = {"prompt": prompt, "chosen": " " + " ".join(rng.choices(payments, k=4)),
                      "rejected": " " + " ".join(rng.choices(rust, k=3)),
                      "expert_label": rng.choice(["payments", "refunds"])}
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(config path, root) with the preference dataset built once."""
    root = tmp_path_factory.mktemp("preference")
    write_pairs(root / "prefs.jsonl")
    config = write_dpo_config(root / "dpo.yaml", root)
    assert main(["data", "--config", str(config)]) == 0
    return config, root


@pytest.fixture(scope="module")
def run(built):
    """``run(name, *overrides)`` -> the metrics of a run of the built config; a run of the same overrides is made once."""
    config, root = built
    made: dict[tuple[str, ...], list[dict]] = {}

    def train(name: str, *overrides: str) -> list[dict]:
        if overrides not in made:
            assert main(["train", "--config", str(config), f"training.output_dir={root / name}", *overrides]) == 0
            made[overrides] = read_metrics(root / name)
        return made[overrides]

    return train


def steps(metrics: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in metrics if "loss" in r}


# The DPO run most tests share: it also merges, and supervises the routing by each pair's label.
MERGE = ("post_training.merge_and_save=true", "moe.router_supervision.weight=0.05")


def test_dpo_logs_preference_figures_beside_the_moe_parts_and_merges(built, run):
    config, root = built
    metrics = run("dpo", *MERGE)
    logged = steps(metrics)
    assert sorted(logged) == [1, 2, 3, 4]
    first = logged[1]
    # At step 1 the adapter is at its initialisation (lora_B = 0): policy and reference agree exactly.
    assert first["preference_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for record in logged.values():
        assert record["aux_loss"] > 0 and len(record["expert_usage"]) == 2  # two MoE layers, usage per layer
        assert record["router_supervision_loss"] > 0
        assert record["loss"] == pytest.approx(record["preference_loss"] + 0.01 * record["aux_loss"]
                                               + 0.05 * record["router_supervision_loss"], rel=1e-6)
    assert logged[4]["preference_loss"] < first["preference_loss"]
    evals = [r for r in metrics if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert 0.0 <= record["eval_rewards/accuracies"] <= 1.0 and record["eval_pairs"] == 12
    merged = root / "dpo" / "merged"
    assert (merged / "config.json").is_file()


# (run name, overrides): DPO's reference with the adapter off and as a frozen copy; KTO's, whose KL rows too.
LIVE_REFERENCES = {
    "adapter-off": ("dpo", MERGE),
    "frozen-copy": ("full", ("lora.enabled=false", "moe.expert_training=full", "training.learning_rate=1e-3")),
    "kto": ("kto", ("training.objective=kto",)),
}


@pytest.mark.parametrize("case", LIVE_REFERENCES)
def test_a_precomputed_reference_gives_the_same_steps_as_a_live_one(built, run, case):
    config, root = built
    name, extra = LIVE_REFERENCES[case]
    live = steps(run(name, *extra))
    precomputed = steps(run(f"precomputed-{name}", *extra, "training.precompute_ref_logps=true"))
    assert (root / f"precomputed-{name}" / "reference_logps.pt").is_file()
    for step in live:
        for key in ("preference_loss", "rewards/chosen", "rewards/rejected", "aux_loss"):
            assert precomputed[step][key] == pytest.approx(live[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_a_step_is_the_mean_over_its_pairs_whatever_the_accumulation(built, run):
    # 4 pairs x 2 micro-batches and 8 pairs x 1 take the same data in the same order: the same updates. (The
    # balance loss of a micro-batch is not a mean over its tokens, so it is off here, as in the SFT test.)
    config, root = built
    no_router_loss = ("moe.use_auxiliary_loss=false", "moe.freeze_router=true")
    accumulated = steps(run("accumulated", *no_router_loss))
    whole = steps(run("batch-8", *no_router_loss, "training.per_device_train_batch_size=8",
                      "training.gradient_accumulation_steps=1"))
    for step in accumulated:
        for key in ("loss", "preference_loss", "rewards/margins", "grad_norm"):
            assert whole[step][key] == pytest.approx(accumulated[step][key], rel=1e-5, abs=1e-7), (step, key)
    a, b = (load_file(root / name / "adapter_model.safetensors") for name in ("accumulated", "batch-8"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_resume_with_a_precomputed_reference_is_exact(built, run):
    config, root = built
    whole = steps(run("precomputed-dpo", *MERGE, "training.precompute_ref_logps=true"))
    run("halves", *MERGE, "training.precompute_ref_logps=true", "training.max_steps=2")
    table = torch.load(root / "halves" / "reference_logps.pt")
    resumed = steps(run("halves", *MERGE, "training.precompute_ref_logps=true", "training.resume_from_checkpoint=latest"))
    assert torch.equal(torch.load(root / "halves" / "reference_logps.pt")["train"], table["train"])  # read, not redone
    for step in (1, 2, 3, 4):
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-6)


@pytest.mark.parametrize("objective", ["orpo", "kto"])
def test_orpo_and_kto_train_and_log_their_figures(built, run, objective):
    config, root = built
    logged = steps(run(objective, f"training.objective={objective}"))  # the KTO run is LIVE_REFERENCES["kto"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged.values())
    assert logged[4]["loss"] < logged[1]["loss"]
    if objective == "orpo":  # the chosen completions' next-token loss plus lambda x the odds-ratio loss
        for r in logged.values():
            assert r["loss"] == pytest.approx(r["lm_loss"] + 0.1 * r["preference_loss"] + 0.01 * r["aux_loss"], rel=1e-6)
            assert "rewards/accuracies" in r
    else:  # KTO's rows are not pairs: no accuracy, one reward per kind of completion
        assert logged[1]["preference_loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) at initialisation
        assert "rewards/accuracies" not in logged[1]
    adapter = load_file(root / objective / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())


def test_a_reference_copy_that_cannot_fit_is_refused_before_loading(built, monkeypatch, capsys):
    config, root = built
    import moetune.train.reference as reference

    monkeypatch.setattr(reference, "device_memory", lambda: (1000, "GPU 0 (test)"))
    code = main(["train", "--config", str(config), f"training.output_dir={root / 'refused'}", "lora.enabled=false",
                 "moe.expert_training=full"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "frozen copy" in err and "training.precompute_ref_logps: true" in err and "GPU 0 (test)" in err
    assert not (root / "refused" / "checkpoint-2").exists()
    # The same run with the log-probabilities precomputed needs no copy and is not refused.
    assert main(["validate", "--config", str(config), "lora.enabled=false", "moe.expert_training=full",
                 "training.precompute_ref_logps=true"]) == 0


def test_a_preference_objective_on_a_dataset_of_another_kind_exits_2(built, tmp_path, capsys):
    config, root = built
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "Q:", "completion": " A", "source": "qa_jsonl", "kind": "qa"}) + "\n")
    code = main(["train", "--config", str(config), f"data.output_path={sft}", f"training.output_dir={tmp_path / 'o'}",
                 "validation.validation_split=0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "moetune data" in err


def test_eval_reports_the_preference_accuracy_training_measured(built, run):
    # `moetune eval` scores the validation pairs with the adapter on and off: its accuracy and margin are the
    # trainer's last evaluation's, computed by another path (whole records, the base as the reference).
    config, root = built
    last_eval = [r for r in run("dpo", *MERGE) if "eval_loss" in r][-1]
    assert main(["eval", "--config", str(config), "--adapter-path", str(root / "dpo")]) == 0
    report = json.loads((root / "dpo" / "eval" / "report.json").read_text())
    preference = report["preference"]
    assert preference["pairs"] == last_eval["eval_pairs"] == 12
    assert preference["accuracy"] == pytest.approx(last_eval["eval_rewards/accuracies"], abs=1e-9)
    assert preference["margin"] == pytest.approx(last_eval["eval_rewards/margins"], rel=1e-4, abs=1e-6)
    assert set(preference["per_label"]) <= {"payments", "refunds"}
    assert sum(g["pairs"] for g in preference["per_label"].values()) == 12


def test_a_micro_batch_s_losses_and_routing_are_let_go_before_the_next_forward(built, monkeypatch):
    # Kept alive through the next forward pass, a micro-batch's routing (allocated among its activations) pins the
    # allocator's blocks between them and the heap grows: DPO's peak memory on CPU (docs/benchmarks.md).
    config, root = built
    import weakref

    from moetune.train import loop

    real, earlier, still_held = loop.compute_losses, [], []

    def noting(model, batch, cfg, reference=None):
        still_held.append(sum(ref() is not None for ref in earlier))
        parts = real(model, batch, cfg, reference)
        earlier.extend(weakref.ref(tensor) for layer in parts.routing for tensor in (layer.logits, layer.experts))
        earlier.append(weakref.ref(parts))
        return parts

    monkeypatch.setattr(loop, "compute_losses", noting)
    assert main(["train", "--config", str(config), f"training.output_dir={root / 'released'}",
                 "validation.validation_split=0", "training.max_steps=2"]) == 0
    # 2 steps x 2 micro-batches, each of the 2 MoE layers' routing recorded (logits and experts), and the parts.
    assert len(still_held) == 4 and len(earlier) == 4 * (2 * 2 + 1)
    assert still_held == [0, 0, 0, 0]
