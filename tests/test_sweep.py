"""`moetune sweep`: the sweep file, run folders, validation before work, skip/resume, the ranked table."""

import csv
import json
import shlex
import textwrap
from pathlib import Path

import pytest

from moetune.cli import main
from moetune.errors import UserError
from moetune.sweep import load_sweep, plan_runs, run_name, run_status

from .train.conftest import read_metrics, write_tiny_run

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SWEEPS = sorted(ROOT.glob("configs/**/*sweep*.yaml"))


def _sweep_file(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_grid_is_every_combination_and_paired_lists_go_position_by_position(tmp_path):
    path = _sweep_file(tmp_path, """
        grid: {training.learning_rate: [1.0e-4, 3.0e-4], lora.r: [8, 16]}
        paired: {training.max_steps: [10, 20], training.warmup_steps: [1, 2]}
    """)
    runs = load_sweep(path)
    assert len(runs) == 8
    assert runs[0] == {"training.learning_rate": 1e-4, "lora.r": 8, "training.max_steps": 10, "training.warmup_steps": 1}
    assert runs[1] == {"training.learning_rate": 1e-4, "lora.r": 8, "training.max_steps": 20, "training.warmup_steps": 2}
    assert runs[-1] == {"training.learning_rate": 3e-4, "lora.r": 16, "training.max_steps": 20, "training.warmup_steps": 2}
    assert load_sweep(_sweep_file(tmp_path, "paired: {lora.r: [4, 8], lora.lora_alpha: [8, 16]}")) == [
        {"lora.r": 4, "lora.lora_alpha": 8}, {"lora.r": 8, "lora.lora_alpha": 16}]


@pytest.mark.parametrize("text, message", [
    ("gird: {lora.r: [8]}", "unknown key 'gird' (did you mean 'grid'?)"),
    ("grid: {lora.r: 8}", "grid.lora.r must be a non-empty list"),
    ("grid: {lora.r: []}", "grid.lora.r must be a non-empty list"),
    ("paired: {lora.r: [4, 8], lora.lora_alpha: [8]}", "the `paired` lists must have one length"),
    ("grid: {training.output_dir: [a, b]}", "training.output_dir cannot be swept"),
    ("grid: {learning_rate: [0.1]}", "is not a dotted config key"),
    ("grid: {lora.r: [4]}\npaired: {lora.r: [8]}", "lora.r is in both `grid` and `paired`"),
    ("grid: {}", "`grid` and `paired` are both empty"),
])
def test_a_malformed_sweep_file_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(UserError, match="sweep.yaml") as err:
        load_sweep(_sweep_file(tmp_path, text))
    assert message in str(err.value)


def test_run_names_are_made_of_the_values():
    assert run_name({"training.learning_rate": 3e-4, "lora.r": 16}) == "learning_rate=0.0003,r=16"
    # the same last part twice: the full keys tell them apart
    assert run_name({"training.seed": 1, "data.seed": 2}) == "training.seed=1,data.seed=2"
    assert run_name({"lora.target_modules": ["q_proj", "v_proj"]}) == "target_modules=q_proj+v_proj"


@pytest.fixture
def tiny_base(tmp_path):
    return write_tiny_run(tmp_path, "sweep")[0]


@pytest.mark.parametrize("values, message", [
    ("lora.rank: [4, 8]", "lora.rank"),  # unknown key, named with the closest valid one
    ("lora.r: [4, 0]", "lora.r must be a positive integer"),
])
def test_every_run_is_validated_before_any_trains(tiny_base, tmp_path, capsys, values, message):
    sweep = _sweep_file(tmp_path, f"grid: {{{values}}}")
    assert main(["sweep", "--config", str(tiny_base), "--sweep", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "sweep").exists()  # nothing ran, not even the valid run


# Short tiny runs: 8 steps, evaluated at 4 and 8, checkpoints at 4 and 8.
TINY_SWEEP_OVERRIDES = ["training.max_steps=8", "training.eval_steps=4", "training.save_steps=4", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config, _ = write_tiny_run(root, "sweep")
    sweep = root / "grid.yaml"
    sweep.write_text("grid:\n  training.learning_rate: [1.0e-3, 3.0e-3]\n  lora.r: [4, 8]\n")
    code = main(["sweep", "--config", str(config), "--sweep", str(sweep), *TINY_SWEEP_OVERRIDES])
    return code, config, sweep, root / "sweep"


NAMES = ["learning_rate=0.001,r=4", "learning_rate=0.001,r=8", "learning_rate=0.003,r=4", "learning_rate=0.003,r=8"]


def _best_eval_loss(run: Path) -> float:
    return min(r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r)


def test_each_run_trains_in_its_own_folder_with_its_values(finished_sweep):
    code, _, _, out = finished_sweep
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == NAMES
    for name in NAMES:
        resolved = (out / name / "config.yaml").read_text()
        assert f"learning_rate: {name.split(',')[0].split('=')[1]}" in resolved and f"r: {name[-1]}\n" in resolved
        assert (out / name / "adapter_model.safetensors").is_file()
        assert [r["step"] for r in read_metrics(out / name) if "eval_loss" in r] == [4, 8]


def test_results_are_ranked_by_best_eval_loss(finished_sweep):
    _, _, _, out = finished_sweep
    rows = list(csv.DictReader((out / "grid_results.csv").open()))
    assert [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    assert sorted(row["run"] for row in rows) == NAMES
    expected = sorted(NAMES, key=lambda name: _best_eval_loss(out / name))
    assert [row["run"] for row in rows] == expected
    for row in rows:
        assert float(row["best_eval_loss"]) == pytest.approx(_best_eval_loss(out / row["run"]))
        assert row["status"] == "finished" and row["best_step"] in ("4", "8")
        assert (row["training.learning_rate"], row["lora.r"]) == tuple(v.split("=")[1] for v in row["run"].split(","))
    md = (out / "grid_results.md").read_text().splitlines()
    assert md[0].startswith("| rank | run | training.learning_rate | lora.r | best_eval_loss")
    assert [line.split(" | ")[1] for line in md[2:]] == expected
    assert (out / "grid_eval_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_finished_runs_are_skipped_and_a_half_finished_one_resumes(finished_sweep, capsys):
    _, config, sweep, out = finished_sweep
    half = out / NAMES[1]
    before = _best_eval_loss(half)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (half / name).unlink()
    for path in (half / "checkpoint-8").iterdir():
        path.unlink()
    (half / "checkpoint-8").rmdir()
    stamps = {name: (out / name / "metrics.jsonl").stat().st_mtime_ns for name in NAMES}
    capsys.readouterr()

    assert main(["sweep", "--config", str(config), "--sweep", str(sweep), "--dry-run", *TINY_SWEEP_OVERRIDES]) == 0
    listing = capsys.readouterr().err
    assert listing.count("skip (finished)") == 3 and f"{NAMES[1]}: resume from latest checkpoint" in listing
    assert not (half / "adapter_config.json").exists()  # a dry run trains nothing

    assert main(["sweep", "--config", str(config), "--sweep", str(sweep), *TINY_SWEEP_OVERRIDES]) == 0
    for name in NAMES:
        changed = (out / name / "metrics.jsonl").stat().st_mtime_ns != stamps[name]
        assert changed == (name == NAMES[1]), name
    assert (half / "adapter_config.json").is_file()
    steps = [r["step"] for r in read_metrics(half) if "loss" in r]
    assert steps == list(range(1, 9))  # steps 5-8 retrained after checkpoint-4, none twice
    assert _best_eval_loss(half) == pytest.approx(before, rel=1e-4)  # resume is exact


def test_run_status_is_done_for_every_kind_of_final_save(tmp_path):
    assert run_status(tmp_path / "never started") == "new"
    for kind, final in (("lora", ["adapter_config.json"]), ("full", ["config.json", "model.safetensors"]),
                        ("esft", ["esft_experts.json", "esft_experts.safetensors"])):
        run = tmp_path / kind
        (run / "checkpoint-4").mkdir(parents=True)
        assert run_status(run) == "resume", kind
        for name in final:
            (run / name).write_text("{}")
        assert run_status(run) == "done", kind


@pytest.mark.parametrize("path", SHIPPED_SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_files_name_their_command_and_validate(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#"), f"{path} must start with a comment"
    command = next(line.lstrip("# ").strip() for line in lines[:6] if "moetune sweep" in line)
    args = shlex.split(command)[2:]
    config = args[args.index("--config") + 1]
    assert args[args.index("--sweep") + 1] == str(path.relative_to(ROOT))
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    runs = plan_runs(ROOT / config, path, overrides)
    assert len(runs) >= 2 and len({run.output_dir for run in runs}) == len(runs)
    assert json.dumps([run.values for run in runs])  # plain YAML values
