"""lm-eval-harness tasks on the models the report has already loaded (`report.tasks`, `distill eval --tasks`).

Each model is scored through lm-eval's own Hugging Face wrapper (`HFLM`) around the model object in memory, so a
task's number is the one `lm_eval.simple_evaluate` gives for that model, and retention per task follows the report's
rule: m_model / m_teacher for a higher-is-better metric, m_teacher / m_model for a lower-is-better one (perplexity).
lm-eval is an optional dependency (`pip install 'distill[tasks]'`), imported only when tasks are asked for.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.errors import DistillError

EXTRA = "pip install 'distill[tasks]'"
DEFINITION = (
    "lm-eval-harness tasks (report.tasks / --tasks), each model wrapped in lm-eval's HFLM as loaded for this report; "
    "per task: models[name][metric] as lm_eval.simple_evaluate reports it (metric,filter keys without the default "
    "',none'), retention = model / teacher for higher-is-better metrics and teacher / model for lower-is-better "
    "ones, samples = documents scored (report.tasks_limit caps it)"
)


@dataclass
class TaskSuite:
    """The tasks to run on every model: lm-eval names or YAML files, checked and indexed once."""

    specs: list[str]
    limit: int | None  # documents per task; None = all
    batch_size: int
    manager: object  # lm_eval.tasks.TaskManager


def require_lm_eval(key: str = "report.tasks") -> None:
    """Raise the one-line error naming the extra when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DistillError(f"{key} needs lm-eval-harness, which is not installed: {EXTRA}") from None


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def prepare_tasks(
    specs: Sequence[str], limit: int | None, batch_size: int, key: str = "report.tasks"
) -> TaskSuite | None:
    """The checked task list (None when no tasks are asked for), before any model is scored.

    Every task is built once here (lm-eval reads its data set), so a misspelled name, a missing file or a task whose
    data cannot be read stops the evaluation before the first model runs, with one line naming `key`."""
    specs = [str(s) for s in specs]
    if not specs:
        return None
    require_lm_eval(key)
    if limit is not None and limit < 1:
        raise DistillError(f"{key}: the task limit must be at least 1 (got {limit})")
    for spec in specs:
        if is_task_file(spec) and not Path(spec).is_file():
            raise DistillError(f"{key}: task file {spec} does not exist")
    with _quiet():
        from lm_eval.tasks import TaskManager

        # Indexing lm-eval's own ~15k task files takes most of a minute; task files alone need none of them.
        manager = TaskManager(include_defaults=not all(is_task_file(s) for s in specs))
        unknown = [s for s in specs if not is_task_file(s) and s not in manager.all_tasks]
        if unknown:
            raise DistillError(f"{key}: unknown lm-eval task {unknown[0]!r} (a task, group or tag name, or a .yaml)")
        try:
            manager.load(specs)
        except Exception as e:  # lm-eval raises anything from a task's own code or its data set reader
            raise DistillError(f"{key}: lm-eval cannot build the tasks: {_first_line(e)}") from None
    return TaskSuite(specs, limit, batch_size, manager)


def run_tasks(model, tokenizer, suite: TaskSuite, name: str, log) -> dict[str, dict]:
    """Score one loaded model on every task: {task: {"metrics": {...}, "higher_is_better": {...}, "samples": n}}.

    The global random states are put back afterwards: `simple_evaluate` reseeds Python, NumPy and torch, and the
    rest of the report should not depend on whether tasks ran."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    log(f"lm-eval tasks on {name}: {', '.join(suite.specs)}")
    devices = [model.device] if model.device.type == "cuda" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices), _quiet():
        # lm-eval may give a tokenizer without a pad token one of its own: a copy keeps the report's tokenizer as is.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=suite.batch_size)
        out = simple_evaluate(
            model=lm, tasks=list(suite.specs), task_manager=suite.manager, limit=suite.limit, log_samples=False
        )
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    model.eval()
    return {task: _task_result(task, values, out) for task, values in out["results"].items()}


def _task_result(task: str, values: dict, out: dict) -> dict:
    """lm-eval's "metric,filter" entries of one task as {metric: value}, "N/A" stderrs as None."""
    metrics = {}
    for key, value in values.items():
        if "," not in key:
            continue  # name, alias, sample_len
        metric, _, kept = key.partition(",")
        metrics[metric if kept == "none" else key] = value if isinstance(value, int | float) else None
    samples = out.get("n-samples", {}).get(task, {}).get("effective")
    return {
        "metrics": metrics,
        "higher_is_better": dict(out.get("higher_is_better", {}).get(task, {})),
        "samples": samples,
    }


def task_report(models: dict[str, dict]) -> dict[str, dict]:
    """report.json["tasks"] from each model's `run_tasks` result (taken out of the models' entries):
    {task: {"models": {name: {metric: v}}, "retention": {name: {metric: r}}, "higher_is_better", "samples"}}."""
    per_model = {name: entry.pop("tasks") for name, entry in models.items() if "tasks" in entry}
    teacher = per_model.get("teacher", {})
    report: dict[str, dict] = {}
    for task, result in teacher.items():
        better = result["higher_is_better"]
        scores = {name: r[task]["metrics"] for name, r in per_model.items() if task in r}
        report[task] = {
            "models": scores,
            "retention": {
                name: _retention(metrics, result["metrics"], better)
                for name, metrics in scores.items()
                if name != "teacher"
            },
            "higher_is_better": better,
            "samples": result["samples"],
        }
    return report


def _retention(model: dict, teacher: dict, higher_is_better: dict) -> dict:
    """Retention of every metric whose direction lm-eval states (stderrs have none)."""
    result = {}
    for key, value in model.items():
        better = higher_is_better.get(key.partition(",")[0])
        if better is None:
            continue
        top, bottom = (value, teacher.get(key)) if better else (teacher.get(key), value)
        result[key] = top / bottom if top is not None and bottom else None
    return result


@contextlib.contextmanager
def _quiet():
    """lm-eval, datasets and transformers log every step at INFO/WARNING; the report says what matters."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def task_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per lm-eval task for report.md/.html: each model's scores and their retention."""
    tables = []
    for task, result in report.get("tasks", {}).items():
        metrics = [m for m in result["higher_is_better"] if any(m in s for s in result["models"].values())]
        header = ["model", *[f"{m} ({'↑' if result['higher_is_better'][m] else '↓'})" for m in metrics]]
        header += [f"{m} retention" for m in metrics]
        rows = []
        for name, scores in result["models"].items():
            kept = result["retention"].get(name, {})  # none for the teacher itself
            rows.append([name, *[_cell(scores.get(m)) for m in metrics], *[_percent(kept.get(m)) for m in metrics]])
        tables.append((f"lm-eval task {task} ({result['samples']} documents)", header, rows))
    return tables


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
