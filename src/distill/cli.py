"""The `distill` command line: thin wrappers that parse arguments and call one stage each.

Exit codes: 0 success; 2 bad input or config (one line on stderr, no traceback); 1 internal error.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback

from distill.errors import DistillError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message: str):
        raise DistillError(f"{self.prog}: {message}")


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distill", description="Distill a teacher language model into a smaller student.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser(
        "demo", help="distill the shipped teacher into a student and a hard-label baseline (offline, ~3 min)"
    )
    demo.add_argument("--steps", type=int, help="training steps of the student and of the baseline (default 160)")
    demo.add_argument("--out", default="runs/demo", help="output folder")

    train = commands.add_parser("train", help="train a student as the recipe says")
    _add_recipe_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    run = commands.add_parser("run", help="the whole pipeline: build student, train, evaluate")
    _add_recipe_arguments(run)
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    cache = commands.add_parser(
        "cache", help="run the teacher once and store its signals (`distill cache verify DIR` checks a cache)"
    )
    cache.add_argument("recipe", help="recipe YAML file, or `verify` followed by a cache folder")
    cache.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (or the cache folder)")
    cache.add_argument("--quiet", action="store_true", help="no progress bar")

    config = commands.add_parser("config", help="inspect recipes")
    config_commands = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    show = config_commands.add_parser("show", help="print the resolved recipe with every default filled in")
    _add_recipe_arguments(show)

    evaluate = commands.add_parser("eval", help="evaluate teacher and students; write the retention report")
    evaluate.add_argument("--teacher", required=True, help="teacher model folder or hub id")
    evaluate.add_argument(
        "--student", action="append", required=True, metavar="DIR|NAME=DIR", help="a student (repeatable)"
    )
    evaluate.add_argument("--baseline", action="append", metavar="DIR|NAME=DIR", help="a baseline model")
    evaluate.add_argument("--data", required=True, help="held-out rows (any data format)")
    evaluate.add_argument("--out", default="./eval-report", help="folder for report.json/.md/.html")
    evaluate.add_argument("--generation", help="prompt/answer rows for exact-match accuracy")
    evaluate.add_argument("--metrics", help="a run's metrics.jsonl, for training curves")
    evaluate.add_argument(
        "--max-length",
        type=int,
        help="cut rows to this many tokens (default: the models' context length; a run's eval-data.jsonl stays whole)",
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    evaluate.add_argument("--max-rows", type=int, help="evaluate at most this many examples")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    evaluate.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    evaluate.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurements")
    evaluate.add_argument("--no-draft", action="store_true", help="skip measuring the models as the teacher's drafts")
    evaluate.add_argument(
        "--tasks", metavar="A,B", help="lm-eval-harness tasks (names or task .yaml files) run on every model"
    )
    evaluate.add_argument("--tasks-limit", type=int, metavar="N", help="at most N documents per lm-eval task")
    evaluate.add_argument("--quick", action="store_true", help="fewer timing runs and at most 64 examples")
    evaluate.add_argument("--speed-runs", type=int, help="timing repetitions (median is reported)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.add_argument(
        "--cross-tokenizer",
        action="store_true",
        help="models with other tokenizers than the teacher's: compared on bits per byte and where spans align",
    )

    generate = commands.add_parser("generate", help="the teacher writes completions for prompts (sequence-level KD)")
    _add_recipe_arguments(generate)
    generate.add_argument("--quiet", action="store_true", help="no progress lines")

    serve = commands.add_parser("serve", help="serve a local model with an OpenAI-compatible API (for tests/dev)")
    serve.add_argument("model_dir", help="model folder (or hub id) with its tokenizer")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    serve.add_argument("--model-name", help="name clients use in `model` (default: the folder's name)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    serve.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")

    student = commands.add_parser("student", help="build a student by pruning a teacher")
    student.add_argument("teacher", help="teacher model folder or hub id")
    student.add_argument("--out", required=True, help="folder to write the student to")
    student.add_argument("--layers", type=int, help="keep this many of the teacher's layers")
    student.add_argument("--params", help="parameter budget: a share of the teacher (0.25x) or a count (20M)")
    student.add_argument("--hidden-size", type=int, help="student hidden size")
    student.add_argument("--intermediate-size", type=int, help="student MLP intermediate size")
    student.add_argument("--heads", type=int, help="student attention heads")
    student.add_argument("--calibration", help="data file to measure importance on")
    student.add_argument(
        "--layer-selection",
        default="kl",
        metavar="kl|influence|uniform",
        help="how layers are kept: lowest KL to the teacher on --calibration (default), block influence, or uniform",
    )
    return parser


def _command_train(args) -> int:
    from distill.api import run_recipe

    run_recipe(args.recipe, args.overrides, resume=args.resume, show_progress=not args.quiet)
    return 0


def _command_cache(args) -> int:
    from distill.cache.build import build_cache
    from distill.cache.reader import verify_cache

    if args.recipe == "verify":
        if len(args.overrides) != 1:
            raise DistillError("distill cache verify: give exactly one cache folder")
        verify_cache(args.overrides[0])
        print(f"{args.overrides[0]}: every shard matches its checksum")
        return 0
    from distill.config import load_recipe

    build_cache(load_recipe(args.recipe, args.overrides), show_progress=not args.quiet)
    return 0


def _command_config(args) -> int:
    from distill.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    sys.stdout.write(recipe.to_yaml())
    return 0


def _command_eval(args) -> int:
    from distill.report.evaluate import evaluate_models, parse_model_arguments
    from distill.report.speed import SpeedSettings

    settings = None
    if args.quick:
        settings = SpeedSettings.quick()
    elif args.speed_runs is not None:
        settings = SpeedSettings(runs=args.speed_runs)
    report = evaluate_models(
        args.teacher,
        parse_model_arguments(args.student or [], args.baseline or []),
        args.data,
        args.out,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_rows=args.max_rows or (64 if args.quick else None),
        generation=args.generation,
        metrics_path=args.metrics,
        speed=not args.no_speed,
        speed_settings=settings,
        draft=not args.no_draft,
        tasks=[t.strip() for t in (args.tasks or "").split(",") if t.strip()],
        tasks_limit=args.tasks_limit,
        cross_tokenizer=args.cross_tokenizer,
        device=args.device,
        dtype=args.dtype,
        show_progress=not args.quiet,
    )
    del report
    return 0


def _command_generate(args) -> int:
    from distill.config import load_recipe
    from distill.generate.run import generate

    generate(load_recipe(args.recipe, args.overrides), show_progress=not args.quiet)
    return 0


def _command_serve(args) -> int:
    from distill.generate.server import serve

    serve(args.model_dir, args.host, args.port, args.model_name, args.dtype, args.device)
    return 0


def _command_student(args) -> int:
    from distill.student.build import build_student

    targets = (args.layers, args.params, args.hidden_size, args.intermediate_size, args.heads)
    if all(target is None for target in targets):
        raise DistillError("distill student: give --layers N or --params 0.25x (or explicit sizes)")
    build_student(
        args.teacher,
        args.out,
        layers=args.layers,
        params=args.params,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        heads=args.heads,
        calibration=args.calibration,
        layer_selection=args.layer_selection,
    )
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting key=value overrides come after flags too (`distill train r.yaml --resume a.b=1`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        raise DistillError(f"distill: unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def _quiet_libraries() -> None:
    """transformers' warnings and progress bars off, without importing it: `import transformers` alone takes 2 s,
    more than `distill --help` or `distill config show` need in all. Both settings are read when it is imported;
    one already imported (distill called from Python) is told directly."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _return_large_frees_to_the_system() -> None:
    """Serve allocations of 8 MiB and more with their own mappings, returned to the OS when freed (glibc only).

    glibc raises its mmap threshold after each large free, up to 32 MiB, so the chunk buffers of the fused loss and
    of chunked evaluation (tens of MB each) end up on the heap, where small tensors that outlive a chunk pin the
    holes: measured, a whole run's RSS grew ~100 MB per chunk (5.5 GB against training's 1.3 GB) and stayed at
    1.0 GB with a fixed threshold. A fixed threshold switches that adjustment off. DISTILL_MALLOC_MMAP_THRESHOLD
    (bytes) overrides it; 0 leaves the allocator alone. Set only by the command line: a library imported into
    someone else's process does not change its allocator.
    """
    import ctypes
    import sys

    threshold = int(os.environ.get("DISTILL_MALLOC_MMAP_THRESHOLD", 8 << 20))
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc (musl, ...): nothing to tune


def console() -> int:
    """The `distill` command (console script and `python -m distill`): `main`, then a quick exit.

    With torch and transformers imported, the interpreter's last garbage collection walks millions of objects
    that die with the process anyway: 1.5-1.6 s measured here, a tenth of a 50-step tiny job. `gc.freeze()` takes
    them out of that walk; atexit handlers, buffered output and module teardown still run as before. Not done by
    `main` itself, which is also called inside other processes (tests, notebooks) that live on after it.
    """
    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    _return_large_frees_to_the_system()
    # Quiet the libraries' own chatter; our messages say what matters.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _quiet_libraries()
    try:
        args = _parse(argv)
        if args.command == "demo":
            from distill.demo.run import run_demo

            run_demo(args.out, steps=args.steps)
            return 0
        if args.command in ("train", "run"):
            return _command_train(args)
        if args.command == "config":
            return _command_config(args)
        if args.command == "cache":
            return _command_cache(args)
        if args.command == "generate":
            return _command_generate(args)
        if args.command == "serve":
            return _command_serve(args)
        if args.command == "student":
            return _command_student(args)
        if args.command == "eval":
            return _command_eval(args)
        raise DistillError(f"unknown command {args.command}")  # pragma: no cover - argparse rejects it first
    except DistillError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130
    except Exception:  # an internal error: the traceback is for us, exit code 1 tells scripts apart
        traceback.print_exc()
        return 1
