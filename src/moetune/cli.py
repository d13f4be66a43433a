"""The `moetune` command line: argument parsing only; every verb calls one library function.

Exit codes: 0 success, 2 bad input (config, data, paths, checkpoints: one paragraph, no
traceback), 1 a failure during work, 130 / 143 a run stopped by SIGINT / SIGTERM. Heavy libraries (torch, transformers) are imported inside
the verbs so `moetune --help` and `moetune validate` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from moetune.errors import RunFailure, StoppedBySignal, UserError

DEFAULT_CONFIG = "config.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moetune` console script, `python -m moetune` and the root shims."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return report_errors(lambda: args.run(args))


def report_errors(work: Callable[[], int | None]) -> int:
    """Run ``work`` and turn what it raises into the exit codes above, with one paragraph on stderr."""
    _configure_logging()
    try:
        return work() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailure as err:
        print(f"failed: {err}", file=sys.stderr)
        return 1
    except StoppedBySignal as err:
        print(f"moetune: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetune",
        description="Fine-tune Mixture-of-Experts language models from one YAML config.",
        epilog="Run `moetune VERB --help` for a verb's options. Overrides go after the options: "
        "moetune train --config config.yaml training.learning_rate=1e-4 lora.r=32",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, description: str, run: Callable[[argparse.Namespace], int | None],
             overrides: bool = True, config_help: str | None = None) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=description,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        if config_help is None:
            sub.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                             help=f"YAML config (default: ./{DEFAULT_CONFIG}).")
        else:  # a verb that needs no config unless one is named
            sub.add_argument("--config", default=None, metavar="FILE", help=config_help)
        if overrides:
            sub.add_argument("overrides", nargs="*", metavar="section.key=value",
                             help="Config overrides; values are YAML and are validated like the file.")
        sub.set_defaults(run=run)
        return sub

    verb("data", "build the training dataset from data.sources",
         "Walk every source in data.sources (Rust repositories, question/answer JSONL) and write\n"
         "data.output_path (JSONL) with <stem>.stats.json beside it: what was kept, skipped and why.",
         _run_data)
    verb("train", "fine-tune the model (LoRA / upcycled MoE) with Accelerate",
         "Train as the config says: LM loss plus router auxiliary loss, expert-usage logging,\n"
         "evaluation, checkpoints and exact resume. Launch through `accelerate launch` (or train.sh)\n"
         "for several GPUs or nodes.",
         _run_train)
    ev = verb("eval", "compare base and fine-tuned: perplexity, generations, QA scores, routing",
              "Evaluate the base model and the fine-tuned adapter on the validation split and write\n"
              "report.json, report.md and figures.",
              _run_eval)
    ev.add_argument("--adapter-path", metavar="DIR",
                    help="Adapter checkpoint or merged model (default: the final adapter in training.output_dir).")
    ev.add_argument("--max-samples", type=int, metavar="N", help="Evaluate at most N validation samples.")
    ev.add_argument("--output-dir", metavar="DIR", help="Where the report goes (default: <adapter>/eval).")
    gen = verb("generate", "try the fine-tuned model on prompts (streamed, or a prompts file to JSONL)",
               "Load the fine-tuned adapter (or merged model) as `moetune eval` does and generate with the\n"
               "inference settings. --prompt and --interactive stream the tokens to the terminal; --prompts\n"
               "FILE (one prompt per line, blank lines skipped) is generated in batches, one JSON line per\n"
               "prompt (prompt, completion, prompt_tokens, completion_tokens, seconds) to --output or stdout.",
               _run_generate)
    gen.add_argument("--adapter-path", metavar="DIR",
                     help="Adapter checkpoint or merged model (default: the final adapter in training.output_dir).")
    given = gen.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", metavar="TEXT", help="One prompt; the completion is streamed.")
    given.add_argument("--prompts", metavar="FILE", help="A text file, one prompt per line.")
    given.add_argument("--interactive", action="store_true", help="Read prompts from stdin, one per line, until EOF.")
    gen.add_argument("--output", metavar="FILE", help="Write one JSON line per prompt here.")
    gen.add_argument("--compare-base", action="store_true",
                     help="Generate with the base model too (the adapter switched off) and record both completions.")
    ex = verb("experts", "score the experts on training samples and select those ESFT trains",
              "Run the frozen model (or --adapter-path's) over training samples and score every expert of\n"
              "every MoE layer (average gate score, token selection ratio; overall and per data group).\n"
              "Write the selection and every score to --output, a layer x expert heatmap beside it (.png),\n"
              "and print how many experts each layer got. Train them with moe.expert_training=esft.",
              _run_experts)
    ex.add_argument("--adapter-path", metavar="DIR", help="Score a fine-tuned adapter or merged model instead of the base.")
    ex.add_argument("--method", choices=("gate", "token"), default="gate",
                    help="Score that selects: average gate score (default) or token selection ratio.")
    ex.add_argument("--threshold", type=float, metavar="P",
                    help="Cumulative score share to reach per layer (default 0.1 for gate, 0.2 for token).")
    ex.add_argument("--max-samples", type=int, metavar="N", help="Score at most N training samples (a seeded choice).")
    ex.add_argument("--output", default="experts.json", metavar="FILE", help="experts.json to write (default: ./experts.json).")
    sw = verb("sweep", "run a grid of configs, skipping finished runs, and rank them",
              "Run every combination (grid) or paired list of config values in sweep.yaml, each in its\n"
              "own output_dir; finished runs are skipped, half-finished ones resume.",
              _run_sweep)
    sw.add_argument("--sweep", required=True, metavar="FILE", help="Sweep definition (YAML).")
    sw.add_argument("--dry-run", action="store_true", help="List the runs without training.")
    up = verb("upcycle", "turn a dense MPT checkpoint into an MoE (sparse upcycling)",
              "Copy every (or every n-th) block's FFN into num_experts identical experts with a new\n"
              "router, and save config + safetensors + tokenizer in the dense checkpoint's dtype. Other\n"
              "moe.* settings come from --config when one is given, else from the defaults.",
              _run_upcycle, config_help="YAML config for the other moe.* settings (default: none; the moe.* defaults).")
    up.add_argument("--model", required=True, metavar="DIR", help="Folder of a dense MPT checkpoint (config.json + weights); "
                    "a hub id must be downloaded first.")
    up.add_argument("--output", required=True, metavar="DIR", help="Where the upcycled checkpoint is written.")
    up.add_argument("--num-experts", type=int, metavar="N", help="Experts per MoE block (moe.upcycling.num_experts).")
    up.add_argument("--top-k", type=int, metavar="K", help="Experts per token, 1 or 2 (moe.upcycling.top_k).")
    up.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="Save the upcycled model in this dtype (default: the dense checkpoint's).")
    pl = verb("plan", "will this run fit its GPUs, and how long will it take (no weights read)",
              "Build the model on the meta device from its config.json (a local folder, the Hugging Face cache, or\n"
              "--model-config) and the run's training plan; report parameters (total, active, trainable by part),\n"
              "memory per GPU by part (weights, gradients, optimizer states as the launch shards them, activations,\n"
              "the LM loss, a stated allowance), whether it fits and the largest micro-batch that does, and model\n"
              "FLOPs with steps per hour at a stated MFU. Exit 1 when it does not fit the named GPU.",
              _run_plan)
    pl.add_argument("--gpus", type=int, metavar="N", help="Processes (GPUs) in all (default: the accelerate config's, else 1).")
    which = pl.add_mutually_exclusive_group()
    which.add_argument("--gpu", metavar="NAME", help="h100 | h200 | a100-80 | l40s: its memory and peak FLOP/s.")
    which.add_argument("--gpu-memory", type=float, metavar="GIB", help="Memory of each GPU in GiB (no steps per hour).")
    pl.add_argument("--model-config", metavar="FILE", help="The model's config.json (default: model.name's, from a "
                    "local folder or the Hugging Face cache; nothing is downloaded).")
    pl.add_argument("--accelerate-config", metavar="FILE", help="The accelerate launch config (e.g. accelerate_config.yaml): "
                    "processes, DeepSpeed ZeRO stage / offload from the JSON it names, or FSDP.")
    pl.add_argument("--deepspeed-config", metavar="FILE", help="A DeepSpeed JSON (overrides the accelerate config's).")
    pl.add_argument("--mfu", type=float, metavar="F", help="Model-FLOPs utilisation for steps per hour (default 0.30).")
    pl.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    checks = [verb("validate", "check a config and exit 0 (valid) or 2 (invalid)",
                   "Load and validate the config with any overrides, and run every check train makes before it\n"
                   "loads a weight: the output_dir, the packages the config needs, and, when the model's config\n"
                   "is local (model.random_init or a folder with a config.json), the config against that model\n"
                   "built on the meta device (LoRA targets, experts, shared experts, router bias, context length).\n"
                   "Print what is wrong, where.", _run_validate),
              verb("print-config", "print the fully resolved config (defaults included) as YAML",
                   "Print the config after defaults and overrides; the output loads back to the same config.",
                   _run_print_config)]
    for sub in checks:
        sub.add_argument("--deepspeed-config", metavar="FILE",
                         help="The DeepSpeed JSON a launch passes (accelerate_config.yaml's deepspeed_config_file, e.g. "
                         "deepspeed_moe_config.json): its older \"moe\" block is read into the moe section, as in "
                         "training. Default: $ACCELERATE_DEEPSPEED_CONFIG_FILE when set.")
    return parser


# ------------------------------------------------------------------------------------- verbs


def _load(args: argparse.Namespace, *extra: str):
    from moetune.config import load_config

    return load_config(args.config, [*getattr(args, "overrides", []), *extra],
                       deepspeed_config=getattr(args, "deepspeed_config", None))


def _run_validate(args: argparse.Namespace) -> int:
    from moetune.train.preflight import validate

    print(validate(_load(args), args.config))
    return 0


def _run_print_config(args: argparse.Namespace) -> int:
    from moetune.config import dump_config

    sys.stdout.write(dump_config(_load(args)))
    return 0


def _run_plan(args: argparse.Namespace) -> int | None:
    config = _load(args)
    run_plan = _library("moetune.plan.render", "run_plan")
    return run_plan(config, model_config=args.model_config, accelerate_config=args.accelerate_config,
                    deepspeed_config=args.deepspeed_config, gpus=args.gpus, gpu=args.gpu, gpu_memory=args.gpu_memory,
                    mfu=args.mfu, as_json=args.json)


def _run_data(args: argparse.Namespace) -> int | None:
    config = _load(args)
    return _library("moetune.data.build", "build_dataset")(config)


def _run_train(args: argparse.Namespace) -> int | None:
    from moetune.train.signals import StopSignals

    config = _load(args)
    with StopSignals():  # importing the training stack takes seconds: a signal then gets the start-up line too
        train = _library("moetune.train.loop", "train")
    return train(config)


def _run_eval(args: argparse.Namespace) -> int | None:
    config = _load(args)
    evaluate = _library("moetune.eval.compare_models", "evaluate")
    return evaluate(config, adapter_path=args.adapter_path, max_samples=args.max_samples, output_dir=args.output_dir)


def _run_generate(args: argparse.Namespace) -> int | None:
    config = _load(args)
    generate = _library("moetune.eval.generate", "generate_from_prompts")
    return generate(config, adapter_path=args.adapter_path, prompt=args.prompt, prompts_file=args.prompts,
                    interactive=args.interactive, output=args.output, compare_base=args.compare_base)


def _run_experts(args: argparse.Namespace) -> int | None:
    config = _load(args)
    select = _library("moetune.eval.expert_selection", "run_expert_selection")
    return select(config, adapter_path=args.adapter_path, method=args.method, threshold=args.threshold,
                  max_samples=args.max_samples, output=args.output)


def _run_sweep(args: argparse.Namespace) -> int | None:
    run_sweep = _library("moetune.sweep", "run_sweep")
    return run_sweep(args.config, args.sweep, overrides=args.overrides, dry_run=args.dry_run)


def _run_upcycle(args: argparse.Namespace) -> int | None:
    flags = [f"moe.upcycling.num_experts={args.num_experts}"] if args.num_experts is not None else []
    flags += [f"moe.upcycling.top_k={args.top_k}"] if args.top_k is not None else []
    config = _load(args, *flags)
    return _library("moetune.models.families.mpt.upcycle", "upcycle_checkpoint")(config, args.model, args.output, dtype=args.dtype)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it is swapped when moetune runs inside another tool)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging() -> None:
    """moetune's own log lines (kernels picked, trainable parameters, ...) to stderr, from rank 0 only."""
    logger = logging.getLogger("moetune")
    if logger.handlers:
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("moetune: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    # Only the main process of a launch says what it does; the others speak up for warnings. Asked per
    # line: accelerate's state knows the process once a verb has built it.
    logger.setLevel(logging.INFO)
    handler.addFilter(_from_main_process_or_a_warning)
    # bitsandbytes warns on every import on CPUs with AVX512-BF16 that an optional kernel package is
    # missing; it changes nothing for training and buries moetune's own lines.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # PEFT still reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: the
    # warning is about PEFT's code, not the user's, and nothing in a config can change it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # accelerate imports DeepSpeed, when installed, to recognise its engine whenever a model is unwrapped
    # or saved, and DeepSpeed's import announces that it found no GPU. Only a DeepSpeed run needs to hear it.
    logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_accelerator_notice)


def _from_main_process_or_a_warning(record: logging.LogRecord) -> bool:
    from moetune.train.accelerator import is_main_process

    return record.levelno >= logging.WARNING or is_main_process()


def _not_the_cpu_accelerator_notice(record: logging.LogRecord) -> bool:
    # Under DeepSpeed the import happens while accelerate builds its state, so the launch says which run this is.
    from moetune.train.accelerator import is_deepspeed_launch

    return is_deepspeed_launch() or not record.getMessage().startswith("Setting accelerator to CPU")


def _library(module: str, name: str) -> Callable:
    """Import a verb's implementation on demand (torch is heavy; --help and validate stay instant)."""
    return getattr(importlib.import_module(module), name)
