"""lm-eval-harness tasks in the report (report.tasks, `distill eval --tasks`): the scores are lm-eval's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distill.cli import main
from helpers import recipe_dict, write_recipe

REPO = Path(__file__).resolve().parents[1]
# Local tasks on local rows (no hub): a multiple-choice one (higher is better) and a perplexity one (lower is better).
# Their `data_files` are relative to the repository root, lm-eval's rule being the working directory.
TASKS = ["tests/data/tasks/tiny_task.yaml", "tests/data/tasks/tiny_text.yaml"]


@pytest.fixture()
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def _eval(teacher_dir, student_dir, eval_file, out, *extra) -> int:
    args = ["eval", "--teacher", str(teacher_dir), "--student", str(student_dir), "--data", str(eval_file)]
    return main([*args, "--out", str(out), "--no-speed", "--no-draft", "--quiet", *extra])


def test_the_teachers_task_scores_equal_lm_eval_run_directly(
    tmp_path, teacher_dir, student_dir, eval_file, at_repo_root
):
    pytest.importorskip("lm_eval", reason="the [tasks] extra (in `test`) is not installed")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from distill.report.evaluate import evaluate_models
    from distill.report.failures import FailureSettings

    out = tmp_path / "report"
    quick = {"speed": False, "draft": False, "failure_settings": FailureSettings(prompts=0), "show_progress": False}
    evaluate_models(teacher_dir, {"student": student_dir}, eval_file, out, tasks=TASKS, log=lambda _: None, **quick)
    tasks = json.loads((out / "report.json").read_text())["tasks"]
    assert set(tasks) == {"tiny_task", "tiny_text"}

    # lm-eval on its own: it loads the teacher folder itself (HFLM from the path), same batch size as the report's.
    direct = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(teacher_dir), "device": "cpu", "dtype": "float32"},
        tasks=TASKS,
        batch_size=8,
        task_manager=TaskManager(include_defaults=False),
        log_samples=False,
    )["results"]
    teacher = {task: tasks[task]["models"]["teacher"] for task in tasks}
    assert teacher["tiny_task"]["acc"] == direct["tiny_task"]["acc,none"]
    assert teacher["tiny_task"]["acc_norm"] == direct["tiny_task"]["acc_norm,none"]
    assert teacher["tiny_task"]["acc_stderr"] == pytest.approx(direct["tiny_task"]["acc_stderr,none"])
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert teacher["tiny_text"][metric] == pytest.approx(direct["tiny_text"][f"{metric},none"], rel=1e-6)
    assert tasks["tiny_task"]["samples"] == 8 and tasks["tiny_text"]["samples"] == 5

    # Retention per task follows each metric's direction; stderrs have none.
    student = {task: tasks[task]["models"]["student"] for task in tasks}
    retention = {task: tasks[task]["retention"]["student"] for task in tasks}
    assert tasks["tiny_task"]["higher_is_better"] == {"acc": True, "acc_norm": True}
    acc = student["tiny_task"]["acc"] / teacher["tiny_task"]["acc"] if teacher["tiny_task"]["acc"] else None
    assert retention["tiny_task"]["acc"] == pytest.approx(acc)
    assert retention["tiny_text"]["word_perplexity"] == pytest.approx(
        teacher["tiny_text"]["word_perplexity"] / student["tiny_text"]["word_perplexity"]
    )
    assert "acc_stderr" not in retention["tiny_task"]
    assert "tasks" not in json.loads((out / "report.json").read_text())["models"]["teacher"]


@pytest.mark.slow  # a run and its report (about 30 s on a quiet machine)
def test_a_runs_report_scores_the_recipes_tasks(tmp_path, teacher_dir, student_dir, train_file, at_repo_root):
    pytest.importorskip("lm_eval", reason="the [tasks] extra (in `test`) is not installed")
    out = tmp_path / "run"
    content = recipe_dict(
        teacher_dir,
        student_dir,
        train_file,
        out,
        training={"steps": 2},
        report={"enabled": True, "speed": False, "draft": False, "tasks": [TASKS[0]], "tasks_limit": 3},
    )
    assert main(["train", str(write_recipe(tmp_path / "recipe.yaml", content)), "--quiet"]) == 0
    task = json.loads((out / "report.json").read_text())["tasks"]["tiny_task"]
    assert set(task["models"]) == {"teacher", "student"} and task["samples"] == 3
    assert set(task["retention"]) == {"student"}


def test_tasks_without_lm_eval_are_one_line_naming_the_extra(
    tmp_path, teacher_dir, student_dir, eval_file, train_file, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert _eval(teacher_dir, student_dir, eval_file, tmp_path / "report", "--tasks", "tiny_task") == 2
    err = capsys.readouterr().err.strip()
    assert "distill[tasks]" in err and "\n" not in err

    # A run asking for tasks in its report stops before training, not after it.
    out = tmp_path / "run"
    content = recipe_dict(teacher_dir, student_dir, train_file, out, report={"enabled": True, "tasks": ["tiny_task"]})
    assert main(["train", str(write_recipe(tmp_path / "recipe.yaml", content)), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "report.tasks" in err and "distill[tasks]" in err and not (out / "checkpoints").exists()


def test_a_missing_task_file_names_the_key(tmp_path, teacher_dir, student_dir, eval_file, capsys):
    pytest.importorskip("lm_eval", reason="the [tasks] extra (in `test`) is not installed")
    missing = str(tmp_path / "nope.yaml")
    assert _eval(teacher_dir, student_dir, eval_file, tmp_path / "report", "--tasks", missing) == 2
    err = capsys.readouterr().err.strip()
    assert "tasks" in err and "nope.yaml does not exist" in err and "\n" not in err


def test_recipe_task_files_are_relative_to_the_recipe(tmp_path):
    from distill.config import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("report:\n  tasks: [./tasks/mine.yaml, hellaswag]\n", encoding="utf-8")
    assert load_recipe(recipe).report.tasks == [str(tmp_path / "tasks" / "mine.yaml"), "hellaswag"]
    assert load_recipe(recipe, ["report.tasks=arc_easy,piqa"]).report.tasks == ["arc_easy", "piqa"]
