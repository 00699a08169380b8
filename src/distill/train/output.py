"""What a run leaves: the saved student (in the dtype it is meant to be stored in) and the run's report.

The student folder is written whole or not at all (a temporary folder moved into place); under FSDP its weights are
gathered from the shards first (`student_state`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distill import atomic
from distill.config import Recipe
from distill.models import DTYPES, load_config, stored_dtype
from distill.train.lora import is_lora, merged_state
from distill.train.parallel import full_state_dicts


@dataclass
class TrainResult:
    output_dir: Path
    student_dir: Path
    summary: dict


def save_student(
    model,
    tokenizer,
    recipe: Recipe,
    summary: dict,
    folder: Path,
    state_dict: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """The final student: save_pretrained + tokenizer + recipe.yaml + summary.json, moved into place whole.

    `state_dict` replaces the model's own weights (gathered FSDP shards); weights are written in `dtype`, and
    config.json says so (save_pretrained would record the in-memory float32). A LoRA student (a PeftModel) is saved
    with its adapter merged in, as a plain transformers model."""
    if is_lora(model):
        model, state_dict = merged_state(model, state_dict)
    tmp = atomic.fresh_tmp_folder(folder)
    state = _cast_state(state_dict if state_dict is not None else model.state_dict(), dtype)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    atomic.write_json(tmp / "config.json", config)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    atomic.write_json(tmp / "summary.json", summary)
    atomic.replace_folder(tmp, folder)


def saved_dtype(recipe: Recipe) -> torch.dtype:
    """output.dtype, with auto = the stored dtype of what the student started from (float32 when unknown).

    Training keeps float32 master weights; saving a student that began as a bfloat16 checkpoint in float32 would
    double its folder and understate the report's size-on-disk ratio.
    """
    name = recipe.output.dtype
    if name != "auto":
        return DTYPES[name]
    s, t = recipe.student, recipe.teacher
    if s.path is not None:
        stored = stored_dtype(load_config(s.path, "student", s.trust_remote_code, s.revision))
    elif s.from_teacher is not None:
        stored = stored_dtype(load_config(t.path, "teacher", t.trust_remote_code, t.revision))
    else:
        config = s.config or {}
        stored = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch."))
    return stored or torch.float32


def _cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype`; tensors that shared storage (tied embeddings) still share it."""
    cast_of: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, value in state.items():
        if not value.is_floating_point():
            out[name] = value
            continue
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()))  # the same view, not just storage
        if key not in cast_of:
            cast_of[key] = value.to(dtype)
        out[name] = cast_of[key]
    return out


def student_state(loss_module) -> dict[str, torch.Tensor] | None:
    """The student's whole weights keyed as the Hugging Face model names them (rank 0; None elsewhere)."""
    model_state, _ = full_state_dicts(loss_module, None)
    prefix = "student."
    return {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)} or None


def write_run_report(recipe: Recipe, result: TrainResult, eval_examples, device, show_progress: bool, log) -> None:
    """Evaluate teacher and student on the held-out examples and write report.json/.md/.html.

    The held-out examples are saved as `eval-data.jsonl` (token ids + loss masks) so `distill eval` can
    reproduce the report, or add other students to it, on exactly the same tokens.
    """
    from distill.report.evaluate import evaluate_models

    if recipe.teachers:  # several teachers: each against the student on its own rows (report.json by_teacher)
        from distill.train.teachers import write_teachers_report

        write_teachers_report(recipe, result, eval_examples, device, show_progress, log)
        return
    eval_file = result.output_dir / "eval-data.jsonl"
    rows = "".join(json.dumps({"input_ids": e.input_ids, "loss_mask": e.loss_mask}) + "\n" for e in eval_examples)
    atomic.write_text(eval_file, rows)
    r = recipe.report
    models = {"student": str(result.student_dir)}
    if r.baseline is not None:
        models["baseline"] = r.baseline
    evaluate_models(
        recipe.teacher.path,
        models,
        str(eval_file),
        str(result.output_dir),
        max_length=recipe.data.max_length,
        batch_size=max(1, recipe.training.batch_size // recipe.training.grad_accum),
        max_rows=r.max_rows,
        generation=r.generation,
        speed=r.speed,
        draft=r.draft,
        tasks=r.tasks,
        tasks_limit=r.tasks_limit,
        cross_tokenizer=recipe.objective.cross_tokenizer != "off",  # the student's tokens vs the teacher's own
        device=str(device),
        dtype=recipe.teacher.dtype,
        show_progress=show_progress,
        log=log,
    )
