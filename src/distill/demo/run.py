"""`distill demo`: the whole value of distillation in one command, offline, in about three minutes on a CPU.

Reads top to bottom: data from the standard library -> a student pruned from the shipped teacher -> distill it ->
train the same student on hard labels with the same data and steps (the baseline) -> evaluate teacher, student
and baseline on held-out modules -> the report and a short table.

The teacher ships in `distill/demo/teacher/` (its TRAINING.md says how it was made); the data is the Python
standard library of the machine running the demo, with the modules in `corpus.HELD_OUT` used for evaluation only.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from distill import atomic
from distill.demo import corpus
from distill.demo.summary import check_targets, completion_examples, print_table, summarize, used_features
from distill.errors import DistillError

TEACHER_DIR = Path(__file__).resolve().parent / "teacher"

# The student: half the width (hidden, heads; MLP 704 -> 256) and 3 of the teacher's 6 layers. The shared embedding
# matrix (8192 x hidden) is most of a model this small, so the width has to shrink to reach 4x fewer parameters.
# Measured at 80 steps with the first (weaker) teacher: 2 layers with MLP 384 kept 80% of the teacher's accuracy,
# 3 layers with MLP 256 kept 85% (lr 2e-3) and 88% (lr 3e-3); 4 layers with MLP 128 kept 89% but decoded only 2.0x
# faster than the teacher.
STUDENT_SHAPE = {"layers": 3, "hidden_size": 128, "intermediate_size": 256, "heads": 2}

# With the retrained teacher (33% held-out accuracy, TRAINING.md) the student keeps less, and more steps buy it back
# slowly: 80 steps kept 59%, 120 steps 65% (lr 6e-3: 59%), 160 steps 69%, 200 steps 69.5% (lr 2e-3: 69.5%).
# 160 steps is the most that leaves the whole demo well inside three minutes on a 2-core CPU.
DEFAULT_STEPS = 160
MAX_LENGTH = 128  # training sequence length
BATCH_SIZE = 8
LR = 3.0e-3
EVAL_MAX_LENGTH = 192
EVAL_ROWS = 32  # held-out blocks of code, spread over every held-out module
COMPLETION_ROWS = 32  # line-completion samples, spread the same way
TRAIN_FILE_STRIDE = 8  # every 8th training file of the teacher's corpus: far more text than the steps use

COMPLETION_DEFINITION = (
    "line completion on held-out modules: greedy decoding from the preceding lines (up to the end of the previous "
    "line); the first line generated, stripped and whitespace-collapsed, equals the file's next line"
)


def run_demo(
    out_dir: str | Path = "runs/demo",
    steps: int | None = None,
    quick: bool = False,
    include_init: bool | None = None,
    teacher_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    show_table: bool = True,
) -> dict:
    """Distill the shipped teacher into a pruned student and compare it with a hard-label baseline.

    `steps`: optimizer steps of each of the two trainings (default 160, under three minutes in all on a 2-core CPU).
    `quick=True` is the test-sized version: a few steps, a few eval rows, no timing. `include_init` also evaluates
    the pruned, untrained student (default: only when quick). Writes into `out_dir`:
    data/, student-init/ (the pruned teacher), distilled/ and baseline/ (run folders, each with student/),
    report.json/.md/.html and demo.json (this function's result). Returns the demo.json dict.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    steps = steps if steps is not None else (4 if quick else DEFAULT_STEPS)
    if steps < 1:
        raise DistillError(f"--steps {steps}: need at least 1 step")
    teacher = Path(teacher_dir) if teacher_dir is not None else TEACHER_DIR
    if not (teacher / "config.json").is_file():
        raise DistillError(f"demo teacher {teacher} is missing (config.json not found); reinstall distill")
    out = _fresh_output(Path(out_dir), log)

    threads = torch.get_num_threads()
    # One thread: these models are so small that a second thread mostly waits at barriers, and on a machine
    # shared with other work it made training and decoding several times slower (measured; see benchmarks/).
    torch.set_num_threads(1)
    try:
        result = _run(out, teacher, steps, quick, include_init, log, start, cpu_start)
    finally:
        torch.set_num_threads(threads)
    if show_table:
        print_table(result)
    log(f"done in {result['time_s']:.0f} s ({result['cpu_s']:.0f} CPU s); report: {out / 'report.html'}")
    return result


def _run(out: Path, teacher: Path, steps: int, quick: bool, include_init: bool | None, log, start, cpu_start):
    eval_rows, completion_rows = (8, 4) if quick else (EVAL_ROWS, COMPLETION_ROWS)
    phases: dict[str, float] = {}
    clock = _PhaseClock(phases)
    _quiet_transformers()

    log("1/5 data: the Python standard library on this machine")
    data = write_data(out / "data", eval_rows, completion_rows, train_stride=TRAIN_FILE_STRIDE * (2 if quick else 1))
    log(
        f"    {data['train_files']} training files, {data['eval_rows']} held-out blocks of code from "
        f"{len(data['held_out_files'])} held-out modules, {data['completion_rows']} line-completion samples"
    )

    clock("data")
    log(f"2/5 student: pruning the teacher to {STUDENT_SHAPE['layers']} layers, hidden {STUDENT_SHAPE['hidden_size']}")
    from distill.student.build import build_student

    init_dir = out / "student-init"
    pruned = build_student(teacher, init_dir, **STUDENT_SHAPE, calibration=str(data["calibration"]), log=lambda _: None)
    log(
        f"    {pruned['teacher_params'] / 1e6:.2f}M -> {pruned['student_params'] / 1e6:.2f}M parameters, "
        f"layers kept: {pruned['kept_layers']}"
    )

    clock("prune")
    divergence = demo_recipe(teacher, init_dir, data, out, steps, kd=True)["objective"]["divergence"]
    log(f"3/5 distilling: {steps} steps of {BATCH_SIZE} x {MAX_LENGTH} tokens, {divergence} to the teacher")
    distilled, distill_recipe = _train(teacher, init_dir, data, out / "distilled", steps, kd=True, log=log)
    clock("distill")
    log("4/5 baseline: the same student, data and steps on hard labels only (no teacher)")
    baseline, baseline_recipe = _train(teacher, init_dir, data, out / "baseline", steps, kd=False, log=log)

    clock("baseline")
    log("5/5 evaluating teacher, student and baseline on the held-out modules")
    models = {"student": str(distilled), "baseline": str(baseline)}
    if include_init if include_init is not None else quick:
        models["pruned"] = str(init_dir)  # the starting point of both, to see what training added
    report = evaluate(teacher, models, data, out, speed=not quick)
    clock("evaluate")

    result = {
        "steps": steps,
        "quick": quick,
        "time_s": round(time.perf_counter() - start, 1),
        # CPU seconds of all threads: on a machine shared with other work, the wall time an idle machine with
        # as many cores would need is at most this (and about this divided by the cores used).
        "cpu_s": round(time.process_time() - cpu_start, 1),
        "phases_s": phases,
        "out_dir": str(out),
        "teacher": str(teacher),
        "student_shape": STUDENT_SHAPE,
        "data": {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()},
        "summary": summarize(report),
        "targets": check_targets(report),
        "completion_examples": report["completion_examples"],
        "features": used_features(pruned, distill_recipe, baseline_recipe),
    }
    atomic.write_json(out / "demo.json", result)
    return result


# ---------------------------------------------------------------- steps


class _PhaseClock:
    """Records wall seconds since the previous call under the given phase name."""

    def __init__(self, phases: dict[str, float]):
        self.phases, self.last = phases, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.last, 1)
        self.last = now


def _quiet_transformers() -> None:
    """No per-model progress bars from transformers between the demo's own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _fresh_output(out: Path, log) -> Path:
    """An empty folder; a previous demo's folder (it has demo.json or data/ from us) is replaced."""
    if out.exists() and any(out.iterdir()):
        if not ((out / "demo.json").exists() or (out / "data" / "completion.jsonl").exists()):
            raise DistillError(f"--out {out} is not empty and is not a previous demo's folder; choose another")
        log(f"replacing the previous demo in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _spread(items: Sequence, count: int) -> list:
    """`count` items evenly spaced over `items` (all of them when there are fewer): deterministic coverage."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def write_data(folder: Path, eval_rows: int, completion_rows: int, train_stride: int = TRAIN_FILE_STRIDE) -> dict:
    """train.jsonl (a deterministic subset of the teacher's training files), eval.jsonl and completion.jsonl
    (held-out modules only)."""
    train_files, held_out = corpus.list_files()
    subset = train_files[::train_stride]
    corpus.write_train(folder / "train.jsonl", subset)
    # Pruning reads at most 8192 calibration tokens; a few training files hold that many without tokenizing all.
    corpus.write_train(folder / "calibration.jsonl", subset[:: max(1, len(subset) // 8)])
    blocks = [{"text": c} for f in held_out for c in corpus.chunks(corpus.read_source(f) or "", 24)]
    corpus.write_jsonl(folder / "eval.jsonl", _spread(blocks, eval_rows))
    completions = _spread(corpus.completion_rows(held_out), completion_rows)
    corpus.write_jsonl(folder / "completion.jsonl", completions)
    return {
        "train": folder / "train.jsonl",
        "calibration": folder / "calibration.jsonl",
        "eval": folder / "eval.jsonl",
        "completion": folder / "completion.jsonl",
        "train_files": len(subset),
        "held_out_files": held_out,
        "eval_rows": min(eval_rows, len(blocks)),
        "completion_rows": len(completions),
    }


def demo_recipe(teacher: Path, init_dir: Path, data: dict, out: Path, steps: int, kd: bool) -> dict:
    """The recipe of one of the two trainings; they differ only in the objective and the output folder."""
    distill_objective = {"divergence": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0}
    objective = distill_objective if kd else {"kd_weight": 0.0, "ce_weight": 1.0}
    return {
        # auto: the teacher's forward in bfloat16 on a CPU with native bf16 (its weights are stored in bf16 anyway)
        "teacher": {"path": str(teacher), "dtype": "auto"},
        "student": {"path": str(init_dir)},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": MAX_LENGTH, "packing": True},
        "objective": {**objective, "fused": True},
        "training": {
            "steps": steps,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "warmup_steps": min(4, steps // 4),
            "schedule": "cosine",
            "device": "cpu",
            "save_every": steps,
            "eval_every": steps,
            "eval_batches": 2,
            "log_every": max(1, min(10, steps)),
            "keep_checkpoints": 1,
            "seed": 0,
        },
        "report": {"enabled": False},
        "output": {"dir": str(out)},
    }


def _train(teacher: Path, init_dir: Path, data: dict, out: Path, steps: int, kd: bool, log):
    """One training of the demo; returns the student's folder and the parsed recipe that trained it."""
    from distill.config import recipe_from_dict
    from distill.train.loop import train

    started = time.perf_counter()
    recipe = recipe_from_dict(demo_recipe(teacher, init_dir, data, out, steps, kd))
    result = train(recipe, log=lambda _: None, show_progress=False)
    last = _last_event(out / "metrics.jsonl", "train")
    loss = f"last loss {last['loss']:.3f}, " if last else ""
    log(f"    {loss}{time.perf_counter() - started:.0f} s")
    # The checkpoint only serves resuming, which a demo does not do.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result.student_dir, recipe


def _last_event(path: Path, kind: str) -> dict | None:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    events = [e for e in events if e.get("event") == kind]
    return events[-1] if events else None


# ---------------------------------------------------------------- evaluation


def line_completion(model, tokenizer, rows: Sequence[dict], extra_tokens: int = 6, keep_outputs: bool = False) -> dict:
    """Exact match of greedy line completion (see COMPLETION_DEFINITION); batch 1, like a code editor.

    `distill.report.generation.exact_match` with `next_line=True`: decoding stops at the end of the first generated
    line and only that line is compared. `keep_outputs` also returns every row's completed line ("completions")."""
    from distill.report.generation import exact_match

    return exact_match(model, tokenizer, rows, EVAL_MAX_LENGTH, extra_tokens, next_line=True, keep_outputs=keep_outputs)


def evaluate(teacher: Path, models: dict[str, str], data: dict, out: Path, speed: bool = True) -> dict:
    """The retention report (distill.report.evaluate) plus line completion for every model; writes report.*."""
    from distill.models import load_model, load_tokenizer
    from distill.report.draft import DraftSettings
    from distill.report.evaluate import DEFINITIONS, evaluate_models
    from distill.report.failures import FailureSettings
    from distill.report.render import write_report
    from distill.report.retention import retention_of
    from distill.report.speed import SpeedSettings

    report = evaluate_models(
        str(teacher),
        models,
        str(data["eval"]),
        None,
        max_length=EVAL_MAX_LENGTH,
        batch_size=8,
        speed=speed,
        draft=speed,  # the draft's speed-up is a timing too; the quick demo skips both
        # `distill eval`'s own settings (4 prompts x 32 tokens for the draft, 8 x 64 for failure modes): measured at
        # 5.3 s and 1.4 s of a 127 s demo (report.json section_time_s), so the demo needs no smaller, noisier ones.
        draft_settings=DraftSettings(),
        failure_settings=FailureSettings(),
        speed_settings=SpeedSettings(runs=3, warmup=1, prompt_tokens=64, new_tokens=32, batch_size=1),
        device="cpu",
        dtype="float32",
        show_progress=False,
        log=lambda _: None,
    )
    tokenizer = load_tokenizer(str(teacher), "teacher")
    rows = [json.loads(line) for line in Path(data["completion"]).read_text().splitlines()]
    for name, path in [("teacher", str(teacher)), *models.items()]:
        model = load_model(path, name, torch.float32).eval()
        report["models"][name].update(line_completion(model, tokenizer, rows, keep_outputs=True))
    # The completions that measured exact match, shown side by side: nothing is decoded twice.
    completions = {name: result["completions"] for name, result in report["models"].items()}
    report["completion_examples"] = completion_examples(rows, completions)
    teacher_result = report["models"]["teacher"]
    report["retention"] = {name: retention_of(report["models"][name], teacher_result) for name in models}
    report["data"]["generation"] = str(data["completion"])
    report["definitions"] = {**DEFINITIONS, "exact_match": COMPLETION_DEFINITION}
    report["demo"] = {"held_out_modules": data["held_out_files"]}
    write_report(report, out)
    return report
