"""A LoRA student against full fine-tuning of the same student: trainable parameters, step time, peak memory and
held-out KL to the teacher after the same steps; and the memory of LoRA self-distillation (one copy of the weights)
against the same run with a second copy of the teacher as its student.

The teacher is the shipped demo teacher; the student is pruned from it (`--layers`, depth only, `--layer-selection`);
data as in `distill demo` (Python's standard library via `distill.demo.corpus`, eval = held-out modules). Each run
is one `distill train` in its own process on one thread: its peak is that process's maximum resident set (ru_maxrss),
so it includes Python, torch, both models, the optimizer and the activations; its step time is the median over the
steps after the first, and its CPU time (user + system, loading and saving included) is the figure least disturbed by
other work on a shared machine.

    python benchmarks/lora.py [--steps 24] [--layers 3] [--r 16] [--batch-size 8] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

TEACHER = Path(__file__).resolve().parents[1] / "src" / "distill" / "demo" / "teacher"


def run_train(recipe: dict, folder: Path, name: str) -> dict:
    """One `distill train` in a fresh process (one thread): its peak RSS (MiB), median step time (s) and the CPU
    seconds of the whole process (less sensitive than wall time to other work on a shared machine)."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    probe = (
        "import resource, subprocess, sys; "
        f"r = subprocess.run([sys.executable, '-m', 'distill', 'train', {str(path)!r}, '--quiet']); "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(u.ru_maxrss, u.ru_utime + u.ru_stime); sys.exit(r.returncode)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    out = Path(recipe["output"]["dir"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    # log_every=1: each train event is one step; its time is the step's tokens over its tokens/s.
    times = [(b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(steps, steps[1:], strict=False)]
    summary = json.loads((out / "student" / "summary.json").read_text())
    maxrss, cpu_s = done.stdout.strip().splitlines()[-1].split()
    return {
        "peak_mib": int(maxrss) / 1024,
        "cpu_s": float(cpu_s),
        "step_s": statistics.median(times),
        "trainable": summary.get("trainable_params", summary["student_params"]),
        "student_dir": out / "student",
    }


def held_out_kl(model_dir: Path, teacher, tokenizer, eval_data: Path, max_length: int) -> float:
    from distill.data import build_examples, iter_batches, pad_id_of
    from distill.models import load_model
    from distill.report.quality import evaluate_batches

    examples, _ = build_examples(str(eval_data), tokenizer, max_length)
    model = load_model(str(model_dir), "student", torch.float32).eval()
    batches = iter_batches(examples[:64], 8, pad_id_of(tokenizer))
    return evaluate_batches(model, teacher, batches, len(tokenizer), torch.device("cpu"))["kl_to_teacher"]


def _brief(result: dict) -> str:
    """One line per finished run (stderr), so a run cut short still leaves its figures."""
    return json.dumps({k: v for k, v in result.items() if k != "student_dir"})


def base_recipe(args, data: dict, student: Path, out: Path, lr: float, lora: dict | None) -> dict:
    return {
        "teacher": {"path": str(TEACHER)},
        "student": {"path": str(student), "tokenizer": str(TEACHER), "lora": lora},
        "data": {
            "train": str(data["train"]),
            "eval": str(data["eval"]),
            "max_length": args.max_length,
            "packing": True,
        },
        "objective": {"divergence": "forward_kl"},
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": lr,
            "warmup_steps": max(1, args.steps // 10),
            "save_every": 10**6,
            "eval_every": 10**6,
            "eval_batches": 1,
            "log_every": 1,
            "device": "cpu",
        },
        "report": {"enabled": False},
        "output": {"dir": str(out)},
    }


def parameter_bytes(recipe: dict) -> int:
    """Bytes of the distinct tensors behind the student's and the teacher's parameters, as a run loads them."""
    from distill.config import recipe_from_dict
    from distill.train.setup import load_models

    models = load_models(recipe_from_dict(recipe), torch.device("cpu"), log=lambda _: None)
    storages = {}
    for model in (models.student, models.teacher):
        for p in model.parameters():
            storage = p.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning (and the first LoRA row)")
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="the second LoRA row (LoRA often wants more)")
    parser.add_argument("--self-steps", type=int, default=4)
    parser.add_argument("--layer-selection", default="uniform", help="how the student is pruned (kl costs 20 passes)")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from distill.demo.run import write_data
    from distill.models import load_model, load_tokenizer
    from distill.student.build import build_student

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(str(TEACHER), "teacher")
    teacher = load_model(str(TEACHER), "teacher", torch.float32).eval()
    lora = {"r": args.r, "alpha": 2 * args.r, "dropout": 0.0, "target_modules": "all-linear"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_data(work, eval_rows=64, completion_rows=0)
        student = work / "pruned"
        build_student(
            str(TEACHER),
            student,
            layers=args.layers,
            calibration=str(data["calibration"]),
            layer_selection=args.layer_selection,
            log=lambda line: print(line, file=sys.stderr),
        )
        kl_start = held_out_kl(student, teacher, tokenizer, data["eval"], args.max_length)
        for name, lr, spec in (
            ("full fine-tuning", args.lr, None),
            (f"LoRA r={args.r}", args.lr, lora),
            (f"LoRA r={args.r}", args.lora_lr, lora),
        ):
            out = work / f"run-{len(rows)}"
            result = run_train(base_recipe(args, data, student, out, lr, spec), work, out.name)
            result["kl"] = held_out_kl(result["student_dir"], teacher, tokenizer, data["eval"], args.max_length)
            rows.append((name, lr, result))
            print(f"{name} lr={lr:g}: {_brief(result)}", file=sys.stderr, flush=True)

        # Self-distillation: an adapter on the teacher itself, teacher pass = adapter disabled (one copy), against
        # the same run whose student is a second copy of the teacher's folder (two copies of the weights).
        copy = work / "teacher-copy"
        shutil.copytree(TEACHER, copy)
        own = {}
        for name, student_path in (("one copy (student.path = teacher.path)", TEACHER), ("two copies", copy)):
            recipe = base_recipe(args, data, student_path, work / f"self-{len(own)}", args.lr, lora)
            recipe["objective"]["ce_weight"] = 0.5  # the base alone has zero KL gradient at the start
            recipe["training"]["steps"] = args.self_steps
            result = run_train(recipe, work, f"self-{len(own)}")
            result["param_mib"] = parameter_bytes(recipe) / 2**20
            own[name] = result
            print(f"self-distillation, {name}: {_brief(result)}", file=sys.stderr, flush=True)

    full = rows[0][2]
    print(
        f"demo teacher (6 layers) -> student pruned to {args.layers} layers ({args.layer_selection}); "
        f"{args.steps} steps x {args.batch_size} x {args.max_length} tokens, forward KL, fp32 CPU; "
        f"held-out KL at the start {kl_start:.3f}"
    )
    print("| student training | lr | trainable params | step time | CPU time of the run | peak RSS | held-out KL |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, lr, r in rows:
        print(
            f"| {name} | {lr:g} | {r['trainable']:,} ({r['trainable'] / full['trainable']:.3f}x) "
            f"| {r['step_s']:.3f} s ({r['step_s'] / full['step_s']:.2f}x) "
            f"| {r['cpu_s']:.0f} s ({r['cpu_s'] / full['cpu_s']:.2f}x) "
            f"| {r['peak_mib']:.0f} MiB ({r['peak_mib'] / full['peak_mib']:.2f}x) | {r['kl']:.3f} |"
        )
    print(f"\nLoRA r={args.r} self-distillation of the demo teacher, {args.self_steps} steps")
    print("| weights held | parameter memory (student + teacher) | peak RSS | step time | CPU time of the run |")
    print("|---|---:|---:|---:|---:|")
    two = own["two copies"]
    for name, r in own.items():
        print(
            f"| {name} | {r['param_mib']:.1f} MiB ({r['param_mib'] / two['param_mib']:.2f}x) "
            f"| {r['peak_mib']:.0f} MiB ({r['peak_mib'] / two['peak_mib']:.2f}x) | {r['step_s']:.3f} s "
            f"| {r['cpu_s']:.0f} s ({r['cpu_s'] / two['cpu_s']:.2f}x) |"
        )


if __name__ == "__main__":
    main()
