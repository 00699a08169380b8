"""Share of step time spent generating in on-policy distillation, and its cost against off-policy steps.

The shipped demo teacher (6.5M parameters) and a student pruned from it as `distill demo` builds it (3 layers,
hidden 128). Rows are pre-tokenized Python standard-library code: a `--prompt` token prompt and a `--new` token
reference completion, so an off-policy step (λ = 0) trains on sequences as long as the ones an on-policy step
(λ = 1, completions of up to `--new` tokens sampled by the student) can produce. Both runs use the same recipe
otherwise (fused loss, float32) and are measured in the same process; the first step of each is left out (warm-up).

    OMP_NUM_THREADS=1 python benchmarks/onpolicy.py [--steps 8] [--batch 8] [--prompt 32] [--new 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch


def write_rows(path: Path, tokenizer, prompt: int, new: int, rows: int) -> Path:
    from distill.demo import corpus

    files, _ = corpus.list_files()
    stream: list[int] = []
    for f in files[::7]:
        stream.extend(tokenizer(corpus.read_source(f) or "", add_special_tokens=False)["input_ids"])
        if len(stream) > rows * (prompt + new):
            break
    width = prompt + new
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            ids = stream[i * width : (i + 1) * width]
            out.write(json.dumps({"input_ids": ids, "loss_mask": [False] * prompt + [True] * new}) + "\n")
    return path


def run(folder: Path, teacher: Path, student: Path, data: Path, share: float, args) -> dict:
    from distill.config import recipe_from_dict
    from distill.train.loop import train

    out = folder / f"run-{share}"
    recipe = recipe_from_dict(
        {
            "teacher": {"path": str(teacher), "dtype": "float32"},
            "student": {"path": str(student)},
            "data": {"train": str(data), "max_length": args.prompt + args.new},
            "objective": {
                "divergence": "reverse_kl",
                "on_policy": {"lambda": share, "max_new_tokens": args.new, "temperature": 1.0},
            },
            "training": {
                "steps": args.steps,
                "batch_size": args.batch,
                "lr": 1e-3,
                "log_every": 1,
                "save_every": 10_000,
                "eval_every": 10_000,
                "eval_batches": 1,
                "device": "cpu",
            },
            "report": {"enabled": False},
            "output": {"dir": str(out)},
        }
    )
    train(recipe, show_progress=False, log=lambda _: None)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    step_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:], strict=False)]  # warm-up left out
    generate_s = [e.get("generate_s", 0.0) for e in steps[1:]]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(steps, steps[1:], strict=False)]
    return {
        "step_s": sum(step_s) / len(step_s),
        "generate_s": sum(generate_s) / len(generate_s),
        "tokens": sum(tokens) / len(tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=64, help="completion tokens: reference length and max_new_tokens")
    args = parser.parse_args()

    from distill.demo.run import STUDENT_SHAPE, TEACHER_DIR
    from distill.models import load_tokenizer
    from distill.student.build import build_student

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = load_tokenizer(str(TEACHER_DIR), "teacher")
        data = write_rows(folder / "train.jsonl", tokenizer, args.prompt, args.new, rows=args.batch * args.steps)
        student = folder / "student"
        build_student(TEACHER_DIR, student, **STUDENT_SHAPE, calibration=str(data), log=lambda _: None)
        results = {share: run(folder, TEACHER_DIR, student, data, share, args) for share in (0.0, 1.0)}

    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}; "
        f"demo teacher -> pruned student {STUDENT_SHAPE}; batch {args.batch}, prompt {args.prompt} tokens, "
        f"max_new_tokens {args.new}; mean over steps 2..{args.steps}"
    )
    header = ("lambda", "s/step", "generate s/step", "generate share", "tokens/step", "vs λ=0")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 8, 16, 15, 12, 7), strict=True)))
    base = results[0.0]["step_s"]
    for share, r in results.items():
        print(
            f"{share:>6.1f} {r['step_s']:>8.3f} {r['generate_s']:>16.3f} {r['generate_s'] / r['step_s']:>15.1%} "
            f"{r['tokens']:>12.0f} {r['step_s'] / base:>6.2f}x"
        )


if __name__ == "__main__":
    main()
