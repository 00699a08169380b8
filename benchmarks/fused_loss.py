"""Plain vs fused distillation loss on CPU: extra peak memory and wall time of forward + backward.

    python benchmarks/fused_loss.py                      # the table quoted in the README
    python benchmarks/fused_loss.py --sizes 8192x32768x256 --divergence jsd --reps 3
    python benchmarks/fused_loss.py --budget-check       # chunk memory vs memory_budget_bytes, per divergence
    python benchmarks/fused_loss.py --sizes 2048x151936x256 --dtypes float32,bfloat16   # Qwen's vocabulary, bf16

"plain" is what a training step does without the fused path: full student logits (N, V) from the hidden states,
teacher logits without gradient, `losses.loss_sums`, autograd. "fused" is `fused.fused_loss_sums` on the same
hidden states and heads. Inputs (hidden states and heads) in float32 or, with --dtypes bfloat16, in bf16 (the matmuls
then run in bf16 and the loss in float32, as in a bf16 run); all tokens counted, teacher and student hidden size H.

Each (method, size) runs in its own subprocess so that one measurement's allocations cannot hide in another's.
Memory is the resident-set peak of that process (getrusage ru_maxrss) minus the resident set right after the
inputs are allocated: the extra memory the loss needs, its parameter gradients included. Time is the median of
`--reps` forward + backward passes after one warm-up. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MIB = 2**20


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> dict:
    import torch

    from distill.losses.dense import loss_sums
    from distill.losses.fused import chunk_rows_for, fused_loss_sums
    from distill.losses.heads import OutputHead
    from distill.losses.objective import Objective

    torch.manual_seed(0)
    n, v, h = args.n, args.v, args.h
    dtype = getattr(torch, args.dtype)
    hidden = (torch.randn(n, h) / h**0.5).to(dtype).requires_grad_(True)
    weight = torch.randn(v, h).to(dtype).requires_grad_(True)
    teacher_hidden = (torch.randn(n, h) / h**0.5).to(dtype)
    teacher_weight = (torch.randn(v, h) * 1.5).to(dtype)
    labels = torch.randint(0, v, (n,))
    sparse = None
    if args.targets == "sparse":
        from distill.losses.sparse import SparseTargets, top_k_targets

        # Built a few rows at a time so that no (N, V) tensor raises the resident-set peak before measuring.
        with torch.no_grad():
            parts = [top_k_targets(rows @ teacher_weight.t(), 32) for rows in teacher_hidden.split(64)]
        sparse = SparseTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "log_probs", "log_rest")))
    objective = Objective(args.divergence, beta=0.5, skew=0.1, temperature=args.temperature, ce_weight=args.ce_weight)

    def step() -> None:
        hidden.grad = None
        weight.grad = None
        if args.method == "plain":
            logits = hidden @ weight.t()  # (N, V)
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.t()  # (N, V)
            if sparse is not None:
                from distill.losses.sparse import sparse_loss_sums

                kd, ce = sparse_loss_sums(logits, sparse, labels, objective)
            else:
                kd, ce = loss_sums(logits, teacher_logits, labels, objective)
            loss = (objective.kd_weight * kd + objective.ce_weight * ce) / n
        else:
            teacher = (
                {}
                if sparse is not None
                else {"teacher_hidden": teacher_hidden, "teacher_head": OutputHead(teacher_weight)}
            )
            loss, _, _ = fused_loss_sums(
                hidden,
                OutputHead(weight),
                labels,
                objective=objective,
                sparse=sparse,
                **teacher,
                normalizer=n,
                memory_budget_bytes=args.budget_mib * MIB,
            )
        loss.backward()

    baseline = _rss_peak_bytes()
    times = []
    for rep in range(args.reps + 1):
        start = time.perf_counter()
        step()
        if rep:  # the first pass is a warm-up
            times.append(time.perf_counter() - start)
    return {
        "method": args.method,
        "dtype": args.dtype,
        "n": n,
        "v": v,
        "h": h,
        "extra_peak_mib": (_rss_peak_bytes() - baseline) / MIB,
        "median_s": statistics.median(times),
        "times_s": times,
        "chunk_rows": chunk_rows_for(v, args.budget_mib * MIB, args.divergence if sparse is None else "sparse")
        if args.method == "fused"
        else None,
        "threads": torch.get_num_threads(),
    }


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def run_worker(args: argparse.Namespace, method: str, n: int, v: int, h: int, dtype: str = "float32") -> dict:
    # The plain path holds about nine float32 (N, V) tensors at its peak (measured: 9.0 GiB at N·V = 2^28).
    # Skip it rather than let the OOM killer pick a victim on a shared machine.
    need = 9 * 4 * n * v
    if method == "plain" and need > 0.8 * _available_bytes():
        return {"method": method, "n": n, "v": v, "h": h, "error": f"skipped: needs ~{need / 2**30:.0f} GiB"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"--method={method}",
        f"--n={n}",
        f"--v={v}",
        f"--h={h}",
        f"--reps={args.reps}",
        f"--divergence={args.divergence}",
        f"--temperature={args.temperature}",
        f"--ce-weight={args.ce_weight}",
        f"--budget-mib={args.budget_mib}",
        f"--targets={args.targets}",
        f"--dtype={dtype}",
    ]
    env = dict(os.environ)
    if args.exact_allocator:
        # glibc serves blocks under its mmap threshold from heaps it seldom returns to the OS, so the resident set
        # can stay well above what is live; mapping every large block separately makes RSS track live memory.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"method": method, "n": n, "v": v, "h": h, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def budget_check(args: argparse.Namespace) -> None:
    """Chunk memory of the fused loss alone, per objective, against the budget it was given.

    "V-buffers per row" is the chunk's share of the extra peak divided by rows × V × 4 bytes: the number of
    float32 (n, V) tensors alive at once, which `fused._LIVE_BUFFERS` should not underestimate.
    """
    print("| objective | N | V | budget MiB | chunk rows | extra peak MiB | grads MiB | V-buffers per row |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    n, v, h = 2048, 32768, 64
    cases = [(d, "dense") for d in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")]
    for divergence, targets in cases + [("forward_kl", "sparse"), ("jsd", "sparse")]:
        args.divergence, args.targets = divergence, targets
        r = run_worker(args, "fused", n, v, h)
        # float32 accumulators, the stored copies and .grad of weight and hidden states.
        grads = 3 * (v * h * 4 + n * h * 4) / MIB
        extra = r.get("extra_peak_mib", float("nan"))
        per_row = (extra - grads) * MIB / (r.get("chunk_rows") or 1) / (v * 4)
        name = divergence if targets == "dense" else f"{divergence} (sparse k=32)"
        print(
            f"| {name} | {n} | {v} | {args.budget_mib} | {r.get('chunk_rows')} | {extra:.0f} | {grads:.0f} "
            f"| {per_row:.1f} |"
        )
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default="8192x32768x256,16384x32768x256,2048x131072x256,2048x151936x256", help="NxVxH,..."
    )
    parser.add_argument("--methods", default="plain,fused")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget-mib", type=int, default=256, help="fused memory_budget_bytes, in MiB")
    parser.add_argument("--targets", choices=["dense", "sparse"], default="dense", help="teacher logits or top-32")
    parser.add_argument("--dtypes", default="float32", help="input dtypes, comma-separated: float32,bfloat16")
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--budget-check", action="store_true", help="chunk memory vs budget, per objective")
    parser.add_argument(
        "--exact-allocator", action="store_true", help="MALLOC_MMAP_THRESHOLD_=65536 so RSS tracks live memory"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--v", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--h", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.budget_check:
        budget_check(args)
        return

    print(
        f"divergence={args.divergence} temperature={args.temperature} ce_weight={args.ce_weight} "
        f"budget={args.budget_mib} MiB reps={args.reps} (median after 1 warm-up), CPU, {load_line()}"
    )
    print(
        "| N | V | H | dtype | plain extra peak MiB | fused extra peak MiB | memory plain/fused "
        "| plain s | fused s | time fused/plain |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    cases = [(size, dtype) for size in args.sizes.split(",") for dtype in args.dtypes.split(",")]
    for size, dtype in cases:
        n, v, h = (int(x) for x in size.split("x"))
        results = {m: run_worker(args, m, n, v, h, dtype) for m in args.methods.split(",")}
        plain, fused = results.get("plain", {}), results.get("fused", {})

        def cell(value, fmt):
            return "—" if value is None else format(value, fmt)

        pm, fm = plain.get("extra_peak_mib"), fused.get("extra_peak_mib")
        pt, ft = plain.get("median_s"), fused.get("median_s")
        ratio_m = pm / fm if pm and fm else None
        ratio_t = ft / pt if pt and ft else None
        print(
            f"| {n} | {v} | {h} | {dtype} | {cell(pm, '.0f')} | {cell(fm, '.0f')} "
            f"| {cell(ratio_m, '.1f')}{'x' if ratio_m else ''} "
            f"| {cell(pt, '.2f')} | {cell(ft, '.2f')} | {cell(ratio_t, '.2f')} |"
        )
        for r in results.values():
            if "error" in r:
                print(f"  {r['method']} failed: {r['error']}", file=sys.stderr)
        sys.stdout.flush()
    print(f"after: {load_line()} (times depend on what else runs on the machine; memory does not)")


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f}"


if __name__ == "__main__":
    main()
