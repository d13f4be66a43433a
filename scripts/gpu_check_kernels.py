"""scripts/gpu_check.py's kernel stages: 3, packed rows are exact; 4, the experts kernels at real layer shapes.

Stage 3 checks that each sample of a packed row gets the per-token losses it gets alone (sdpa, and
flash_attention_2 where flash-attn imports), against a control of two samples that do see each other.
Stage 4 trains every experts kernel that ``model.experts_implementation`` accepts at Mixtral-8x7B,
Qwen3-30B-A3B and gpt-oss-20b layer shapes (2 layers) through scripts/bench_train.py: the loss
difference to eager, steady-state tokens/s, MFU and peak memory.
"""

from __future__ import annotations

import importlib
import typing
from types import SimpleNamespace

from gpu_check_harness import CheckFailed, Context, Skip, error_lines


def stage_packed_rows(ctx: Context) -> None:
    """Per-token losses of each sample in a packed row equal those of the sample alone, per attention kernel."""
    import torch
    import torch.nn.functional as F
    from transformers import MixtralConfig, MixtralForCausalLM

    from moetune.data.packing import PackedCollator, PackedDataset, plan_packed_rows
    from moetune.models.load.kernels import flash_attention_available

    vocab, hidden, row = (101, 64, 24) if ctx.cpu else (1000, 256, 1024)
    generator = torch.Generator().manual_seed(1)
    lengths = (11, 7, 5, 9, 3, 12) if ctx.cpu else torch.randint(40, 400, (10,), generator=generator).tolist()
    samples = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    rows = plan_packed_rows([len(s) for s in samples], row)
    # A wider initialisation than the default makes attention peaked, so a sample that saw another would show.
    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=2 * row, initializer_range=0.1)

    class Encoded:  # the slice of the datasets.Dataset interface PackedDataset uses
        column_names = ["input_ids", "labels"]

        def __getitem__(self, indices):
            return {"input_ids": [samples[i] for i in indices], "labels": [samples[i] for i in indices]}

    packed_rows = [PackedDataset(Encoded(), rows)[i] for i in range(len(rows))]

    def token_losses(logits, ids) -> torch.Tensor:
        return F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device), reduction="none")

    def run(model, flatten: bool):
        batch = PackedCollator(pad_token_id=0, flatten=flatten)(packed_rows)
        with torch.no_grad():
            # use_cache=False: with a cache object transformers skips the packed-sequence mask.
            packed = model(input_ids=batch["input_ids"].to(ctx.device), position_ids=batch["position_ids"].to(ctx.device),
                           use_cache=False).logits
            alone = [token_losses(model(input_ids=torch.tensor([s], device=ctx.device), use_cache=False).logits[0], s)
                     for s in samples]
            first, second = samples[rows[0][0]], samples[rows[0][1]]  # the control: no restart between two samples
            joined = model(input_ids=torch.tensor([first + second], device=ctx.device), use_cache=False).logits[0]
        got, offset = [], 0
        for b, members in enumerate(rows):
            start = 0
            for index in members:
                n = len(samples[index])
                logits = packed.reshape(-1, vocab)[offset + start:offset + start + n] if flatten else packed[b, start:start + n]
                got.append((index, token_losses(logits, samples[index])))
                start += n
            offset += start
        diff = max(float((losses - alone[i]).abs().max()) for i, losses in got)
        control = float((token_losses(joined[len(first):], second) - alone[rows[0][1]]).abs().max())
        return diff, control, alone

    torch.manual_seed(0)
    reference = MixtralForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(ctx.device).eval()
    _, _, reference_alone = run(reference, flatten=False)
    ctx.put("shape", {"hidden": hidden, "vocab": vocab, "samples": len(samples), "rows": len(rows), "row_tokens": row})
    variants = [("sdpa", torch.float32, False), ("sdpa", torch.bfloat16, False), ("flash_attention_2", torch.bfloat16, True)]
    for attn, dtype, flatten in variants:
        with ctx.variant("checks", f"{attn} {str(dtype).removeprefix('torch.')}") as entry:
            if attn == "flash_attention_2" and (ctx.cpu or not flash_attention_available()):
                raise Skip("flash-attn does not import here" if not ctx.cpu else "flash-attn has no CPU kernel")
            model = MixtralForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).to(ctx.device).eval()
            model.load_state_dict(reference.state_dict())
            diff, control, alone = run(model, flatten)
            # bf16 rounding alone moves the losses: the tolerance is a few times what it moves them when
            # each sample runs alone, far below what attending across samples does (the control).
            rounding = max(float((a - r).abs().max()) for a, r in zip(alone, reference_alone, strict=True))
            tolerance = 1e-4 if dtype == torch.float32 else max(4 * rounding, 1e-3)
            entry.update(max_abs_loss_diff=diff, tolerance=tolerance, rounding=rounding, control_without_restart=control,
                         control_discriminates=control > tolerance)
            if diff > tolerance:
                raise CheckFailed(f"packed per-token losses differ from each sample alone by {diff:.2e} "
                                  f"(tolerance {tolerance:.1e}; samples that see each other: {control:.2e})")
    checks = ctx.results["checks"]
    ctx.summary = "; ".join(f"{name}: {c['status']}" + (f" (max diff {c['max_abs_loss_diff']:.1e})" if "max_abs_loss_diff" in c else "")
                            for name, c in checks.items())


# The shapes of stage 4 (and 7) on CPU: each real shape's proportions, a few dozen wide.
KERNEL_SHAPES_CPU = {
    "mixtral-8x7b (tiny)": {"hidden": 32, "intermediate": 64, "heads": 4, "kv_heads": 2, "head_dim": None, "experts": 4,
                            "top_k": 2, "vocab": 256, "seq": 64, "batch": 1, "bf16": False},
    "qwen3-30b-a3b (tiny)": {"hidden": 32, "intermediate": 16, "heads": 4, "kv_heads": 2, "head_dim": 16, "experts": 16,
                             "top_k": 4, "vocab": 256, "seq": 64, "batch": 1, "bf16": False},
    "gpt-oss-20b (tiny)": {"architecture": "gpt_oss", "hidden": 32, "intermediate": 32, "heads": 4, "kv_heads": 2,
                           "head_dim": 8, "experts": 8, "top_k": 4, "vocab": 256, "seq": 64, "batch": 1, "bf16": False},
}


def moetune_experts_kernels() -> tuple[str, ...]:
    """The kernels ``model.experts_implementation`` accepts, read from the config schema; eager, the reference, first."""
    from moetune.config.schema import ModelConfig

    accepted = typing.get_type_hints(ModelConfig)["experts_implementation"]  # Literal[...] | None
    kernels = [kernel for option in typing.get_args(accepted) if typing.get_origin(option) is typing.Literal
               for kernel in typing.get_args(option)]
    return tuple(sorted(kernels, key=lambda kernel: kernel != "eager"))


def other_kernels() -> dict[str, str]:
    """Experts kernels transformers registers beyond moetune's, with why each is not measured."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    accepted, reasons = moetune_experts_kernels(), {}
    for name in ALL_EXPERTS_FUNCTIONS.keys():
        if name in accepted:
            continue
        check = getattr(importlib.import_module(f"transformers.integrations.{name}"), f"is_{name}_loadable", None)
        why = "not accepted by model.experts_implementation"
        if check is not None:
            try:
                check(raise_error=True)
            except Exception as err:  # noqa: BLE001 - the reason is the report
                why = f"cannot load here ({error_lines(err, 1).splitlines()[0]}); also {why}"
        reasons[name] = why
    return reasons


def stage_experts_kernels(ctx: Context) -> None:
    """Each accepted experts kernel trains the same model on the same data at each shape: its losses must match eager's."""
    # Imported in the stage's own process: bench_train imports torch, which the parent leaves unimported on CUDA.
    from bench_train import PRESETS, bench_variants

    shapes = KERNEL_SHAPES_CPU if ctx.cpu else {name: PRESETS[name] for name in ("mixtral-8x7b", "qwen3-30b-a3b",
                                                                                 "gpt-oss-20b")}
    steps, samples = (2, 16) if ctx.cpu else (12, 600)
    optimizer = [] if ctx.cpu else ["training.optim=adamw_torch_fused"]
    ctx.put("setup", {"layers": 2, "steps": steps, "logging_steps": 1, "lora": "q/k/v/o r 16",
                      "gradient_checkpointing": not ctx.cpu, "precision": "fp32" if ctx.cpu else "bf16"})
    ctx.put("not_measured", other_kernels())
    lines = []
    for shape, sizes in shapes.items():
        args = SimpleNamespace(layers=2, samples=samples, steps=steps, **sizes)
        args.intermediate = args.intermediate or 2 * args.hidden
        tokenizer: list[str] = []
        for kernel in moetune_experts_kernels():
            with ctx.variant(shape, kernel) as entry:
                root = ctx.work / "kernels" / shape.replace(" ", "_").replace("(", "").replace(")", "") / kernel
                root.mkdir(parents=True)
                [result] = bench_variants(args, root, {kernel: (kernel, [*tokenizer, *optimizer])}, logging_steps=1)
                tokenizer = tokenizer or [f"model.tokenizer={root / kernel / 'tokenizer'}"]
                entry.update(result)
        measured = {k: v for k, v in ctx.results[shape].items() if v.get("status") == "ok"}
        eager = measured.get("eager", {}).get("lm_losses")
        tolerance = 1e-3 if ctx.cpu else 5e-2  # bf16 sums in another order move the loss by ~1e-2
        for kernel, entry in measured.items():
            if eager and kernel != "eager":
                common = min(len(eager), len(entry["lm_losses"]))
                entry["loss_diff_vs_eager"] = {"step_1": abs(entry["lm_losses"][0] - eager[0]),
                                               "max": max(abs(a - b) for a, b in zip(entry["lm_losses"][:common], eager[:common], strict=True))}
                if entry["loss_diff_vs_eager"]["step_1"] > tolerance:
                    entry["status"] = "FAILED"
                    entry["error"] = (f"step-1 loss differs from eager by {entry['loss_diff_vs_eager']['step_1']:.2e} "
                                      f"(tolerance {tolerance:.0e}): the kernel computes something else")
                    ctx.failures.append(f"{shape}: {kernel}")
        ctx.save()
        lines.append(f"{shape}: " + ", ".join(
            f"{k} {v['tokens_per_second']:,.0f} tok/s" + (f" MFU {v['mfu']:.1%}" if v.get("mfu") else "")
            if "tokens_per_second" in v else f"{k} {v['status']}" for k, v in ctx.results[shape].items()))
    ctx.summary = "; ".join(lines)


