"""Peak resident memory of whole `distill train` runs (training, periodic and final evaluation, report) against the
training steps alone, with the fused loss on and off.

Models with a 32768-token vocabulary (teacher 256 wide × 4 layers, student 128 × 2, as in
`train_step_memory.py`), 8 sequences × 1024 tokens per optimizer step, float32 on CPU. Each configuration runs
`distill train` in its own process; its peak is that process's maximum resident set (ru_maxrss from wait4), so it
counts the models, the optimizer, the activations and everything evaluation and the report allocate.

- "training": the report off and a one-row, 16-token eval set: the training steps set the peak.
- "whole run": 64 eval rows of 1024 tokens, evaluated every step (periodic + the final evaluation), then the report
  (teacher and student evaluated again from disk, speed timing included).

The "before report" column is the highest RSS sampled (every 50 ms) before the report's first log line, so a run
whose peak comes from the report shows it.

    python benchmarks/whole_run_memory.py [--steps 2] [--vocab 32768] [--tokens 1024] [--batch 8] [--eval-rows 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from train_step_memory import build_models  # noqa: E402  (a sibling script, not a package)


def write_rows(path: Path, vocab_size: int, tokens: int, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps({"input_ids": [rng.randrange(3, vocab_size) for _ in range(tokens)]}) for _ in range(rows)]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(recipe: Path, fused: bool) -> dict:
    """Peak RSS (MiB, whole process), the highest sample before the report began, wall seconds, last tokens/s."""
    fused_key = f"objective.fused={str(fused).lower()}"
    command = [sys.executable, "-m", "distill", "train", str(recipe), "--quiet", fused_key]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report_started = threading.Event()
    output: list[str] = []

    def read() -> None:
        for line in process.stdout:
            output.append(line)
            if line.startswith("eval data:"):  # evaluate_models' first line: the report has begun
                report_started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    before_report = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal before_report
        while not done.is_set():
            rss = _rss_mib(process.pid)
            if rss is not None and not report_started.is_set():
                before_report = max(before_report, rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not the max over all children
    done.set()
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"distill train failed ({process.returncode}):\n{''.join(output[-30:])}")
    run_dir = Path(yaml.safe_load(recipe.read_text())["output"]["dir"])
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in events if e.get("event") == "train"]
    return {
        "peak": usage.ru_maxrss / 1024,
        "before_report": before_report if report_started.is_set() else None,
        "seconds": time.perf_counter() - start,
        "tokens_per_s": rates[-1],
        "evals": sum(e.get("event") == "eval" for e in events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--fused-only", action="store_true", help="skip the plain-loss runs (the slow half)")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher, student = build_models(folder, args.vocab, args.tokens)
        train = write_rows(folder / "train.jsonl", args.vocab, args.tokens, args.batch * args.steps, seed=0)
        tiny_eval = write_rows(folder / "tiny-eval.jsonl", args.vocab, 16, 1, seed=1)
        full_eval = write_rows(folder / "eval.jsonl", args.vocab, args.tokens, args.eval_rows, seed=2)
        for kind, eval_file, report, eval_every in (
            ("training", tiny_eval, False, 1000),
            ("whole run", full_eval, True, 1),
        ):
            for fused in (True,) if args.fused_only else (False, True):
                recipe = folder / f"recipe-{kind.replace(' ', '-')}-{fused}.yaml"
                content = {
                    "teacher": {"path": str(teacher)},
                    "student": {"path": str(student)},
                    "data": {"train": str(train), "eval": str(eval_file), "max_length": args.tokens},
                    "objective": {"divergence": "forward_kl", "ce_weight": 0.1},
                    "training": {
                        "steps": args.steps,
                        "batch_size": args.batch,
                        "save_every": 1000,
                        "log_every": 1,
                        "eval_every": eval_every,
                    },
                    "report": {"enabled": report},
                    "output": {"dir": str(folder / f"run-{kind.replace(' ', '-')}-{fused}")},
                }
                recipe.write_text(yaml.safe_dump(content))
                results[kind, fused] = run(recipe, fused)
                print(f"  {kind}, fused={fused}: {results[kind, fused]}", file=sys.stderr, flush=True)

    print(
        f"distill train, V={args.vocab}, {args.batch} x {args.tokens} tokens per step, {args.steps} steps, fp32 CPU; "
        f"whole run: {args.eval_rows} eval rows x {args.tokens} tokens, eval every step, report with speed timing"
    )
    header = f"{'run':>10} | {'fused':>5} | {'peak RSS MiB':>12} | {'before report':>13} | {'evals':>5} | {'wall s':>6}"
    print(header)
    print("-" * len(header))
    for (kind, fused), r in results.items():
        before = f"{r['before_report']:13.0f}" if r["before_report"] is not None else f"{'-':>13}"
        flag = str(fused).lower()
        print(f"{kind:>10} | {flag:>5} | {r['peak']:12.0f} | {before} | {r['evals']:5d} | {r['seconds']:6.0f}")
    for fused in (True,) if args.fused_only else (False, True):
        whole, alone = results["whole run", fused]["peak"], results["training", fused]["peak"]
        print(f"fused={str(fused).lower()}: whole run / training peak = {whole / alone:.2f} (target <= 1.15)")
    for kind in () if args.fused_only else ("training", "whole run"):
        plain, lean = results[kind, False]["peak"], results[kind, True]["peak"]
        print(f"{kind}: peak plain / fused = {plain / lean:.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
