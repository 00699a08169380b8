"""Off-policy, on-policy and sequence-level distillation of the demo teacher, compared in one table.

Every variant starts from the same pruned student (the demo's), trains for the same number of optimizer steps
on batches of the same size, and is evaluated with the retention report's metrics on the demo's held-out
modules. Wall times are measured in this run, so they compare the variants' full cost: on-policy steps include
the student's sampling, sequence-level includes the teacher writing its completions first.

    python benchmarks/policy_comparison.py [--steps 80] [--out runs/policy-comparison]

Variants:
- hard labels: no teacher (the baseline every distillation should beat)
- off-policy KD: forward KL to the teacher on the training text (what `distill demo` does)
- on-policy KD (GKD): the same, but on a share λ of the steps the student samples continuations of the first
  tokens of each sequence and the teacher scores them; with forward KL (only the data differs from off-policy)
  and with reverse KL (on-policy-rkl, the usual on-policy choice)
- sequence-level KD: the teacher writes continuations of the same prompts first (`distill generate`); the student
  is trained on them with hard labels (as the DeepSeek-R1 distilled models were made)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.cli import main as distill_cli  # noqa: E402
from distill.config import recipe_from_dict  # noqa: E402
from distill.demo import corpus  # noqa: E402
from distill.demo.run import (  # noqa: E402
    BATCH_SIZE,
    COMPLETION_ROWS,
    EVAL_ROWS,
    STUDENT_SHAPE,
    TEACHER_DIR,
    demo_recipe,
    evaluate,
    write_data,
)
from distill.train.loop import train  # noqa: E402

PROMPT_TOKENS = 16  # prompt length of on-policy and sequence-level samples
NEW_TOKENS = 96  # completion length of both


def write_prompts(data: dict, folder: Path, count: int) -> Path:
    """One prompt per training sequence: the first PROMPT_TOKENS tokens of blocks of the training text."""
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(str(TEACHER_DIR), "teacher")
    rows = []
    for line in Path(data["train"]).read_text().splitlines():
        text = json.loads(line)["text"]
        for chunk in corpus.chunks(text, 24):
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            if len(ids) > PROMPT_TOKENS + 8:
                rows.append({"prompt": tokenizer.decode(ids[:PROMPT_TOKENS])})
        if len(rows) >= count:
            break
    corpus.write_jsonl(folder / "prompts.jsonl", rows[:count])
    return folder / "prompts.jsonl"


def run_variant(name: str, recipe: dict, out: Path) -> tuple[str, float]:
    shutil.rmtree(recipe["output"]["dir"], ignore_errors=True)  # a rerun of the benchmark starts each run afresh
    started = time.perf_counter()
    result = train(recipe_from_dict(recipe), log=lambda _: None, show_progress=False)
    seconds = time.perf_counter() - started
    print(f"  {name}: {seconds:.0f} s", flush=True)
    return str(result.student_dir), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--on-policy-lambda", type=float, default=0.5)
    parser.add_argument("--out", default="runs/policy-comparison")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from distill.student.build import build_student

    data = write_data(out / "data", EVAL_ROWS, COMPLETION_ROWS)
    init_dir = out / "student-init"
    if not init_dir.exists():
        build_student(TEACHER_DIR, init_dir, **STUDENT_SHAPE, calibration=str(data["calibration"]), log=lambda _: None)

    def recipe(name: str, kd: bool) -> dict:
        return demo_recipe(TEACHER_DIR, init_dir, data, out / name, args.steps, kd=kd)

    students, seconds = {}, {}

    print("training (same steps, batch and student init for every variant)", flush=True)
    students["hard-labels"], seconds["hard-labels"] = run_variant("hard-labels", recipe("hard-labels", kd=False), out)
    students["off-policy"], seconds["off-policy"] = run_variant("off-policy", recipe("off-policy", kd=True), out)

    # On-policy twice: with the off-policy run's objective (isolates what sampling changes) and with reverse KL.
    for name, divergence in (("on-policy", "forward_kl"), ("on-policy-rkl", "reverse_kl")):
        on_policy = copy.deepcopy(recipe(name, kd=True))
        on_policy["objective"].update(
            {
                "divergence": divergence,
                "on_policy": {
                    "lambda": args.on_policy_lambda,
                    "temperature": 1.0,
                    "max_new_tokens": NEW_TOKENS,
                    "prefix_tokens": PROMPT_TOKENS,
                },
            }
        )
        students[name], seconds[name] = run_variant(name, on_policy, out)

    # Sequence-level: the teacher writes one continuation per training sequence of the run.
    prompts = write_prompts(data, out / "data", args.steps * BATCH_SIZE)
    generated = out / "data" / "teacher-completions.jsonl"
    generate_recipe = recipe("sequence-level", kd=False)
    generate_recipe["generate"] = {
        "prompts": str(prompts),
        "output": str(generated),
        "max_new_tokens": NEW_TOKENS,
        "temperature": 0.8,
        "batch_size": 32,
    }
    recipe_file = out / "generate.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump(generate_recipe))
    started = time.perf_counter()
    if not generated.exists() and distill_cli(["generate", str(recipe_file), "--quiet"]) != 0:
        raise SystemExit("distill generate failed")
    generate_s = time.perf_counter() - started
    print(f"  teacher completions: {generate_s:.0f} s", flush=True)
    sequence_level = recipe("sequence-level", kd=False)
    sequence_level["data"].update({"train": str(generated), "packing": False})
    students["sequence-level"], train_s = run_variant("sequence-level", sequence_level, out)
    seconds["sequence-level"] = generate_s + train_s

    print("evaluating on the held-out modules", flush=True)
    report = evaluate(TEACHER_DIR, students, data, out, speed=False)
    models, retention = report["models"], report["retention"]
    teacher = models["teacher"]
    print(
        f"\ndemo teacher, {args.steps} steps x {BATCH_SIZE} sequences, student {STUDENT_SHAPE}, "
        f"on-policy λ={args.on_policy_lambda:g} (forward KL, and reverse KL for on-policy-rkl), "
        "sequence-level: teacher text at temperature 0.8, hard labels"
    )
    header = "| variant | wall s | top-1 acc. (retention) | CE nats (retention) | agreement | KL to teacher |"
    print(header)
    print("|---|---|---|---|---|---|")
    print(f"| teacher | – | {teacher['top1_accuracy']:.3f} | {teacher['cross_entropy']:.3f} | 1.000 | 0.000 |")
    for name in students:
        m, r = models[name], retention[name]
        print(
            f"| {name} | {seconds[name]:.0f} | {m['top1_accuracy']:.3f} ({100 * r['top1_accuracy']:.1f}%) | "
            f"{m['cross_entropy']:.3f} ({100 * r['cross_entropy']:.1f}%) | {m['agreement']:.3f} | "
            f"{m['kl_to_teacher']:.3f} |"
        )


if __name__ == "__main__":
    main()
