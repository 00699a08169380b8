"""Builders the test files share: recipes as dicts, quiet runs, the trained student's weights.

Importable as `from helpers import ...` (pytest puts tests/ on sys.path, as for conftest). Fixtures stay in
conftest.py; this module holds plain functions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

# Keyword arguments of train/build_cache that print nothing: tests read results, not logs.
QUIET = {"log": lambda _: None, "show_progress": False}


def merge_sections(base: dict, sections: dict, deep: bool = False) -> dict:
    """`base` with each section of `sections` merged into it (key by key); returns `base`.

    `deep`: a dict value is merged into the dict already there (objective={"on_policy": {"lambda": 0.5}} keeps the
    other on_policy keys) instead of replacing it.
    """
    for section, values in sections.items():
        target = base.setdefault(section, {})
        for key, value in values.items():
            if deep and isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    return base


def recipe_dict(
    teacher_dir, student_dir, train_file, out, defaults: dict | None = None, deep: bool = False, **sections
) -> dict:
    """A small training recipe: the tiny teacher and student, forward KL, 4 steps, checkpoints every 2, no report.

    `defaults`: a test file's own settings, merged over these first; `sections` (per test) are merged last.
    `deep`: see `merge_sections`.
    """
    base = {
        "teacher": {"path": str(teacher_dir)},
        "student": {"path": str(student_dir)},
        "data": {"train": str(train_file), "max_length": 48},
        "objective": {"divergence": "forward_kl", "fused": False},
        "training": {"steps": 4, "batch_size": 4, "lr": 5e-3, "save_every": 2, "eval_every": 2, "log_every": 1},
        "report": {"enabled": False},
        "output": {"dir": str(out)},
    }
    return merge_sections(merge_sections(base, defaults or {}, deep), sections, deep)


def write_recipe(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The trained student's tensors of the run with output folder `out`."""
    return load_file(str(out / "student" / "model.safetensors"))
