"""advanced.torch_compile and advanced.use_cpu_offload change the run, or refuse it; never silently nothing."""

import pytest

from moetune.cli import main

from .conftest import read_metrics


def test_cpu_offload_without_a_distributed_engine_is_refused_before_any_work(tiny_run, capsys):
    config, out = tiny_run
    assert main(["train", "--config", str(config), "advanced.use_cpu_offload=true"]) == 2
    err = capsys.readouterr().err
    assert "advanced.use_cpu_offload needs a DeepSpeed or FSDP launch" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()


def test_compiled_decoder_layers_give_the_uncompiled_loss_curve(tiny_run, tmp_path, capsys):
    config, out = tiny_run
    steps = ["training.max_steps=3", "training.eval_steps=3", "training.save_steps=3", "lora.lora_dropout=0.0"]
    assert main(["train", "--config", str(config), *steps, f"training.output_dir={tmp_path / 'eager'}"]) == 0
    assert main(["train", "--config", str(config), *steps, "advanced.torch_compile=true"]) == 0
    assert "advanced.torch_compile: compiled 2 decoder layers (MixtralDecoderLayer)" in capsys.readouterr().err
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(out)
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3, 3]
    for a, b in zip(eager, compiled, strict=True):
        for key in ("lm_loss", "aux_loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
