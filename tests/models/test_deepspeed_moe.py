"""moe.expert_parallel.backend: deepspeed (an optional extra): refused where it cannot apply, equal to the native block where it does.

The older deepspeed_moe_config.json "moe" block is read by the config loader (tests/config/test_legacy_deepspeed.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from moetune.errors import UserError
from moetune.models.load.factory import build_model

from ..conftest import free_port

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_deepspeed_backend_without_deepspeed_says_how_to_install_it(mpt_config, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"needs the deepspeed package.*pip install moetune\[deepspeed\]"):
        build_model(mpt_config("moe.upcycling.enabled=true", "moe.expert_parallel.backend=deepspeed"), seed=42)


def test_deepspeed_backend_is_for_upcycled_models(mixtral_config):
    with pytest.raises(UserError, match="mixtral keeps its own blocks"):
        build_model(mixtral_config("moe.expert_parallel.backend=deepspeed"), seed=42)


DEEPSPEED_SCRIPT = textwrap.dedent("""
    import os, torch, deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    from moetune.config import load_config
    from moetune.models.load.factory import build_model
    from moetune.models.families.mpt.deepspeed_moe import DeepSpeedMoeFeedForward, native_moe_layout
    from moetune.models.families.mpt.modeling import MoeFeedForward
    # Noisy expert copies: the experts differ, so the logits only agree if both blocks route alike.
    overrides = ["model.architecture=mpt", "model.random_init=true", "model.torch_dtype=float32", "model.max_seq_length=64",
                 "model.config_overrides={n_layers: 2, d_model: 64, n_heads: 4, vocab_size: 128, max_seq_len: 64}",
                 "moe.upcycling.enabled=true", "moe.upcycling.num_experts=4", "moe.upcycling.expert_noise_std=0.5",
                 "lora.enabled=false"]
    torch.manual_seed(0)
    native = build_model(load_config(None, overrides), seed=42).eval()
    model = build_model(load_config(None, overrides + ["moe.expert_parallel.backend=deepspeed"]), seed=42).eval()
    for module in model.modules():
        if hasattr(module, "set_deepspeed_parallelism"):
            module.set_deepspeed_parallelism()
    assert isinstance(model.transformer.blocks[0].ffn, DeepSpeedMoeFeedForward)
    ids = torch.randint(0, 128, (2, 10))
    out = model(ids, output_router_logits=True)
    ref = native(ids, output_router_logits=True)
    routers = max((a - b).abs().max().item() for a, b in zip(out.router_logits, ref.router_logits))
    with native_moe_layout(model):
        assert isinstance(model.transformer.blocks[0].ffn, MoeFeedForward)
        assert model.state_dict().keys() == native.state_dict().keys()
        back = model(ids).logits
    assert isinstance(model.transformer.blocks[0].ffn, DeepSpeedMoeFeedForward)
    print("max_diff", (out.logits - ref.logits).abs().max().item(), "layers", len(out.router_logits),
          "routers", routers, "native_layout", (back - ref.logits).abs().max().item())
""")


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed (the moetune[deepspeed] extra) is not installed")
def test_deepspeed_block_computes_what_the_native_block_computes(tmp_path):
    # A separate process: DeepSpeed sets up a process group, which must not leak into other tests.
    # TORCHDYNAMO_DISABLE skips DeepSpeed's torch.compile of its gating (~30 s on CPU, same numbers).
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "TORCHDYNAMO_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("max_diff"))
    _, diff, _, layers, _, routers, _, round_trip = line.split()
    assert float(diff) < 1e-5 and int(layers) == 2 and float(routers) < 1e-5
    assert float(round_trip) < 1e-5  # the same modules, back in the native layout (what a run saves)
