"""Hidden-state distillation on the demo pair: the same pruned student and steps with and without `objective.hidden`.

The demo's teacher (src/distill/demo/teacher: 6 layers, width 256) and its student (pruned as `distill demo` prunes
it: 3 layers, width 128, so learned projections 128 -> 256), the demo's data, recipe and steps (forward KL, fused
loss); the only change between rows is `objective.hidden`. Every model is evaluated on the demo's held-out modules
(KL(teacher ‖ model), next-token accuracy and its retention = accuracy / the teacher's, agreement). One thread, as the
demo runs; prints one table with each row's ratio to the logit-only row, measured in this run.

    python benchmarks/hidden_states.py [--steps 80] [--out runs/hidden-bench] [--rows cosine,kept,mse]

Rows: `logits` (always), `cosine` = cosine on the `auto` pairs (weight --cosine-weight), `kept` = cosine on the pairs
that follow the layers pruning kept (student layer k with the teacher layer it was copied from), `mse` = MSE on the
auto pairs (weight --mse-weight; the teacher's intermediate states have a mean square of about 100-190, so MSE at
weight 1 would drown the logit loss).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def _train(recipe_dict: dict) -> tuple[float, dict]:
    from distill.config import recipe_from_dict
    from distill.train.loop import train

    start = time.perf_counter()
    train(recipe_from_dict(recipe_dict), log=lambda _: None, show_progress=False)
    seconds = time.perf_counter() - start
    out = Path(recipe_dict["output"]["dir"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return seconds, [e for e in events if e["event"] == "train"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of each training (the demo's 80)")
    parser.add_argument("--out", default="runs/hidden-bench")
    parser.add_argument("--rows", default="cosine,kept,mse", help="rows besides `logits`: cosine, kept, mse")
    parser.add_argument("--cosine-weight", type=float, default=1.0)
    parser.add_argument("--mse-weight", type=float, default=0.01)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from distill.demo.run import (
        COMPLETION_ROWS,
        EVAL_MAX_LENGTH,
        EVAL_ROWS,
        STUDENT_SHAPE,
        TEACHER_DIR,
        demo_recipe,
        write_data,
    )
    from distill.report.evaluate import evaluate_models
    from distill.report.retention import retention_of
    from distill.student.build import build_student

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # as the demo: these models are too small for a second thread to help
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = write_data(out / "data", EVAL_ROWS, COMPLETION_ROWS)
    init = out / "student-init"
    pruned = build_student(TEACHER_DIR, init, **STUDENT_SHAPE, calibration=str(data["calibration"]), log=lambda _: None)
    kept = pruned["kept_layers"]  # 0-based teacher layers; student layer k (1-based state index) is teacher kept[k-1]
    hidden = {
        "cosine": {"weight": args.cosine_weight, "loss": "cosine", "layers": "auto"},
        "kept": {
            "weight": args.cosine_weight,
            "loss": "cosine",
            "layers": [[k + 1, t + 1] for k, t in enumerate(kept)],
        },
        "mse": {"weight": args.mse_weight, "loss": "mse", "layers": "auto"},
    }
    rows = ["logits", *[r for r in args.rows.split(",") if r]]
    print(f"teacher 6 layers x 256 -> student {STUDENT_SHAPE}; layers kept by pruning: {kept}; {args.steps} steps each")

    runs, students = {}, {}
    for row in rows:
        recipe = demo_recipe(TEACHER_DIR, init, data, out / row, args.steps, kd=True)
        if row != "logits":
            recipe["objective"]["hidden"] = hidden[row]
        seconds, last = _train(recipe)
        runs[row] = {"train_s": seconds, "last": last, "hidden": recipe["objective"].get("hidden")}
        students[row] = str(out / row / "student")
        print(f"  {row}: {seconds:.0f} s, last train loss {last['loss']:.3f}, hidden_loss {last.get('hidden_loss')}")

    report = evaluate_models(
        str(TEACHER_DIR),
        students,
        str(data["eval"]),
        None,
        max_length=EVAL_MAX_LENGTH,
        batch_size=8,
        speed=False,
        draft=False,
        device="cpu",
        dtype="float32",
        show_progress=False,
        log=lambda _: None,
    )
    models, teacher = report["models"], report["models"]["teacher"]
    base = models["logits"]
    header = (
        f"| objective.hidden | held-out KL | KL / logits-only | top-1 acc | top-1 retention | agreement "
        f"| train s ({args.steps} steps) |"
    )
    print()
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| (teacher) | 0 | - | {teacher['top1_accuracy']:.2%} | 100% | 100% | - |")
    for row in rows:
        m = models[row]
        spec = runs[row]["hidden"]
        label = (
            "off (logits only)" if spec is None else f"{spec['loss']}, w={spec['weight']:g}, layers {spec['layers']}"
        )
        print(
            f"| {label} | {m['kl_to_teacher']:.4f} | {m['kl_to_teacher'] / base['kl_to_teacher']:.3f}x "
            f"| {m['top1_accuracy']:.2%} | {retention_of(m, teacher)['top1_accuracy']:.1%} | {m['agreement']:.1%} "
            f"| {runs[row]['train_s']:.0f} |"
        )
    (out / "hidden_states.json").write_text(json.dumps({"runs": runs, "report": report}, indent=2, default=str))


if __name__ == "__main__":
    main()
