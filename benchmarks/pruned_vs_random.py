"""A student pruned from the teacher against a randomly initialized student of the same shape.

Both start from the same config; both are distilled for the same steps on the same data; held-out KL to the
teacher, cross-entropy and agreement are measured before and after. Prints one table.

    python benchmarks/pruned_vs_random.py --teacher DIR --train DATA --eval DATA [--params 0.25x] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def held_out_metrics(model_dir: Path, teacher, tokenizer, eval_data: str, max_length: int) -> dict:
    from distill.data import build_examples, iter_batches, pad_id_of
    from distill.models import load_model
    from distill.report.quality import evaluate_batches

    examples, _ = build_examples(eval_data, tokenizer, max_length)
    model = load_model(str(model_dir), "student", torch.float32).eval()
    batches = iter_batches(examples[:64], 8, pad_id_of(tokenizer))
    return evaluate_batches(model, teacher, batches, len(tokenizer), torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--params", default="0.25x")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from distill.config import recipe_from_dict
    from distill.models import count_parameters, load_model, load_tokenizer
    from distill.student.build import build_student
    from distill.train.loop import train

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.teacher, "teacher")
    teacher = load_model(args.teacher, "teacher", torch.float32).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pruned = work / "pruned"
        build_student(args.teacher, pruned, params=args.params, calibration=args.train, log=lambda _: None)
        # The same architecture, freshly initialized.
        random_init = work / "random"
        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(pruned).config)
        fresh.save_pretrained(random_init)
        for name, start in (("pruned from teacher", pruned), ("random init", random_init)):
            before = held_out_metrics(start, teacher, tokenizer, args.eval, args.max_length)
            recipe = recipe_from_dict(
                {
                    "teacher": {"path": args.teacher},
                    "student": {"path": str(start), "tokenizer": args.teacher},
                    "data": {"train": args.train, "eval": args.eval, "max_length": args.max_length, "packing": True},
                    "objective": {"divergence": "forward_kl"},
                    "training": {
                        "steps": args.steps,
                        "batch_size": args.batch_size,
                        "lr": args.lr,
                        "warmup_steps": max(1, args.steps // 10),
                        "save_every": 10**6,
                        "eval_every": 10**6,
                        "eval_batches": 1,
                    },
                    "report": {"enabled": False},
                    "output": {"dir": str(work / f"run-{start.name}")},
                }
            )
            result = train(recipe, show_progress=False, log=lambda _: None)
            after = held_out_metrics(result.student_dir, teacher, tokenizer, args.eval, args.max_length)
            params = count_parameters(load_model(str(start), "student", torch.float32))
            rows.append((name, params, before, after))

    print(f"teacher {args.teacher}: {count_parameters(teacher):,} parameters; {args.steps} distillation steps")
    print(
        f"{'student':<20} {'params':>10} | {'KL before':>9} {'CE before':>9} {'agree before':>12} |"
        f" {'KL after':>9} {'CE after':>9} {'agree after':>11}"
    )
    for name, params, before, after in rows:
        print(
            f"{name:<20} {params:>10,} | {before['kl_to_teacher']:9.3f} {before['cross_entropy']:9.3f}"
            f" {before['agreement']:12.3f} | {after['kl_to_teacher']:9.3f} {after['cross_entropy']:9.3f}"
            f" {after['agreement']:11.3f}"
        )
    print(json.dumps({name: {"before": b, "after": a} for name, _, b, a in rows}))


if __name__ == "__main__":
    main()
