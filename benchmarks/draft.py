"""Which objective makes the best speculative-decoding draft? Drafts distilled from the demo teacher, same steps.

The shipped demo teacher (6.5M parameters) and the student `distill demo` prunes from it (3 layers, hidden 128),
trained for the same steps on the same data as the demo does with four objectives: forward KL, TVD, on-policy JSD
(objective.on_policy.lambda = 1, divergence jsd, β = 0.5) and hard labels (kd_weight 0, ce_weight 1). Each draft
and the pruned, untrained student are then measured by the report's draft check (`distill.report.draft`): greedy
assisted generation with the teacher on eval prompts from the held-out modules, acceptance = accepted ÷ proposed
draft tokens as counted by transformers, speed-up = tokens/s of teacher + draft ÷ teacher alone (batch 1), and
whether the output equals the teacher's own greedy output. The teacher as its own draft is the reference row
(acceptance 1 by construction; its speed-up is the cost of the assisted-generation machinery itself).
DistillSpec (Zhou et al. 2024) argues on-policy data and TVD-like objectives raise acceptance: measured here.

    python benchmarks/draft.py [--steps 40] [--prompts 8] [--new 32] [--gamma 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

OBJECTIVES = {  # report model name -> the objective section of its training recipe
    "forward_kl": {"divergence": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
    "tvd": {"divergence": "tvd", "kd_weight": 1.0, "ce_weight": 0.0},
    "on_policy_jsd": {
        "divergence": "jsd",
        "beta": 0.5,
        "kd_weight": 1.0,
        "ce_weight": 0.0,
        "on_policy": {"lambda": 1.0},
    },
    "hard_labels": {"kd_weight": 0.0, "ce_weight": 1.0},
}


def train_draft(
    teacher: Path, init_dir: Path, data: dict, out: Path, steps: int, objective: dict
) -> tuple[Path, float]:
    """One draft trained as the demo trains its student, with `objective` in place of the demo's."""
    from distill.config import recipe_from_dict
    from distill.demo.run import demo_recipe
    from distill.train.loop import train

    recipe = demo_recipe(teacher, init_dir, data, out, steps, kd=True)
    recipe["objective"] = {**objective, "fused": True}
    started = time.perf_counter()
    result = train(recipe_from_dict(recipe), log=lambda _: None, show_progress=False)
    return result.student_dir, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every draft (8 x 128 tokens each)")
    parser.add_argument("--prompts", type=int, default=8, help="eval prompts decoded with each draft")
    parser.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--gamma", type=int, default=5, help="tokens the draft proposes per round")
    parser.add_argument("--eval-rows", type=int, default=32, help="held-out blocks (quality metrics, prompts)")
    parser.add_argument("--out", help="keep the drafts and the report here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="measure the drafts already trained in --out again")
    args = parser.parse_args()

    from distill.demo.run import STUDENT_SHAPE, TEACHER_DIR, write_data
    from distill.report.draft import DraftSettings
    from distill.report.evaluate import evaluate_models
    from distill.report.failures import FailureSettings
    from distill.report.speed import SpeedSettings
    from distill.student.build import build_student

    torch.set_num_threads(1)  # as the demo: these models are too small for a second thread to help
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out) if args.out else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        reuse = args.reuse and args.out is not None
        data = write_data(folder / "data", args.eval_rows, 4) if not reuse else {"eval": folder / "data" / "eval.jsonl"}
        init_dir = folder / "student-init"
        if not reuse:
            calibration = str(data["calibration"])
            build_student(TEACHER_DIR, init_dir, **STUDENT_SHAPE, calibration=calibration, log=lambda _: None)
        models = {"teacher_itself": str(TEACHER_DIR), "pruned_untrained": str(init_dir)}
        for name, objective in OBJECTIVES.items():
            if reuse:
                models[name] = folder / name / "student"
                continue
            models[name], seconds = train_draft(TEACHER_DIR, init_dir, data, folder / name, args.steps, objective)
            print(f"trained {name}: {seconds:.0f} s", flush=True)
        started = time.perf_counter()
        report = evaluate_models(
            str(TEACHER_DIR),
            {k: str(v) for k, v in models.items()},
            str(data["eval"]),
            None,  # the table below is the result; report.json/.html are written after it, with --out
            speed_settings=SpeedSettings(runs=1, warmup=0, prompt_tokens=32, new_tokens=8, batch_size=1),  # the least
            draft_settings=DraftSettings(prompts=args.prompts, new_tokens=args.new, draft_tokens=args.gamma),
            failure_settings=FailureSettings(prompts=0),
            device="cpu",
            dtype="float32",
            show_progress=False,
            log=lambda _: None,
        )
        eval_s = time.perf_counter() - started
        print_table(report, args, STUDENT_SHAPE, eval_s)
        if args.out:
            from distill.report.render import write_report

            (folder / "draft-benchmark.json").write_text(json.dumps(report["models"], indent=2, default=str))
            write_report(report, folder / "report")


def print_table(report: dict, args, shape: dict, eval_s: float) -> None:
    print(
        f"\n{platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}; demo teacher -> "
        f"{shape}, {args.steps} steps x 8 x 128 tokens each; {args.prompts} held-out prompts x {args.new} "
        f"new tokens, {args.gamma} drafted per round, greedy, batch 1; evaluation {eval_s:.0f} s"
    )
    header = ["draft", "acceptance", "tokens/teacher fwd", "speed-up", "agreement", "KL(t‖d)", "= teacher's"]
    widths = [18, 10, 18, 8, 9, 8, 11]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for name, r in report["models"].items():
        if name == "teacher":
            continue
        d = r.get("draft") or {}
        cells = [
            name,
            f"{r['draft_acceptance_rate']:.1%}",
            f"{d['tokens_per_teacher_forward']:.2f}",
            f"{r['speculative_decode_speedup']:.2f}x",
            f"{r['agreement']:.1%}",
            f"{r['kl_to_teacher']:.3f}",
            "yes" if d["outputs_equal_teacher"] else f"{d['prompts_equal_teacher']}/{d['prompts']}",
        ]
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))


if __name__ == "__main__":
    main()
