"""The GPU check: one script, at most 8 minutes on one GPU, one table per part, every figure measured in this run.

    python benchmarks/gpu_check.py                       # on the GPU (cuda): the table for the README
    python benchmarks/gpu_check.py --device cpu --quick  # the same code on CPU, tiny sizes (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --parts loss,liger    # only some parts

Parts:
  loss   fused vs dense loss for every objective (τ = 2, CE weight 0.1), float32 and bfloat16 inputs: the loss value
         and the gradients of hidden states and output weight, relative to the dense path of the same dtype; peak
         device memory and time of each (float32 on GPU with TF32 off, so float32 means float32).
  liger  Liger-Kernel's LigerFusedLinearJSD beside distill's fused jsd (β = 0.5, τ = 1) on the same inputs, when
         liger_kernel is installed: value, time and memory side by side.
  train  short `distill train` runs (bf16 autocast, teacher.dtype auto) of a SmolLM2-135M-shaped Llama teacher
         (V = 49152) and a 15-layer student of the same shape, 8 × 512 tokens per step (--quick: a 4-layer teacher,
         V = 2048, 8 × 32 tokens): fused loss on and off, gradient checkpointing, sdpa / eager / flash_attention_2
         (when flash_attn is installed), torch.compile, the teacher on CPU (teacher.device=cpu, GPU only) and FSDP2
         on one device (`torchrun --nproc_per_node 1`, training.distributed=fsdp, with and without checkpointing).
         Per run: tokens/s (median step after the first), peak device memory (torch.cuda.max_memory_allocated
         of the process), peak RSS, the first step's loss against the first run's.
  cpu    the teacher's forward on this machine's CPU, float32 vs bfloat16 (8 × 256 tokens; --quick: the tiny
         teacher), and whether the CPU has native bf16 (AMX / AVX512-BF16): the measurement behind
         teacher.dtype=auto (bfloat16 on GPUs and on CPUs with native bf16).

Each `distill train` run is its own process (peak memory is per process). Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
MIB = 2**20
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative, fused vs dense of the same dtype
# How each `distill train` run reports back: its peak device memory, its peak RSS, its exit code.
PROBE = """import json, resource, sys
import torch
from distill.cli import main
rc = main(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("GPU_CHECK " + json.dumps({"rc": rc, "peak_device": peak, "peak_rss": rss}))
sys.exit(rc)
"""


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> int:
    import torch

    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_above(device, base: int) -> float:
    import torch

    return (torch.cuda.max_memory_allocated(device) - base) / MIB if device.type == "cuda" else float("nan")


def rel(a, b) -> float:
    """Relative difference of two tensors (norm-wise), in float32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- loss: fused vs dense


def loss_inputs(n: int, v: int, h: int, dtype, device, seed: int = 0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) / h**0.5).to(device, dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=g).to(device, dtype).requires_grad_(True)
    teacher_hidden = (torch.randn(n, h, generator=g) / h**0.5).to(device, dtype)
    teacher_weight = (torch.randn(v, h, generator=g) * 1.5).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100  # some positions do not count, as prompt and padding tokens
    return hidden, weight, teacher_hidden, teacher_weight, labels.to(device)


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def one_loss(method: str, objective, inputs, device):
    """(loss, d hidden, d weight, seconds, peak MiB) of one forward + backward of the dense or fused loss."""
    import torch

    from distill.losses.dense import loss_sums
    from distill.losses.fused import fused_loss_sums
    from distill.losses.heads import OutputHead

    hidden, weight, teacher_hidden, teacher_weight, labels = inputs
    count = float((labels != -100).sum())
    base = reset_peak(device)

    def run():
        if method == "dense":
            logits = hidden @ weight.t()  # (N, V)
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.t()  # (N, V)
            kd, ce = loss_sums(logits, teacher_logits, labels, objective)
            loss = (objective.kd_weight * kd + objective.ce_weight * ce) / count
        else:
            loss = fused_loss_sums(
                hidden,
                OutputHead(weight),
                labels,
                objective=objective,
                teacher_hidden=teacher_hidden,
                teacher_head=OutputHead(teacher_weight),
                normalizer=count,
            )[0]
        grads = torch.autograd.grad(loss, [hidden, weight])
        return loss.detach(), grads

    run()  # warm-up: kernels, allocator
    base = reset_peak(device)
    (loss, grads), seconds = timed(device, run)
    return loss, grads[0], grads[1], seconds, peak_above(device, base)


def part_loss(device, quick: bool) -> tuple[list[dict], bool]:
    import torch

    from distill.losses.objective import DIVERGENCES, Objective

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 rows compare float32 arithmetic
    n, v, h = (96, 512, 32) if quick else (4096, 151936, 896)
    rows, ok = [], True
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        inputs = loss_inputs(n, v, h, dtype, device)
        for divergence in DIVERGENCES:
            objective = Objective(divergence, beta=0.5, skew=0.1, temperature=2.0, ce_weight=0.1)
            dense = one_loss("dense", objective, inputs, device)
            fused = one_loss("fused", objective, inputs, device)
            errors = (rel(fused[0], dense[0]), rel(fused[1], dense[1]), rel(fused[2], dense[2]))
            passed = max(errors) <= TOLERANCE[dtype_name]
            ok &= passed
            rows.append(
                {
                    "dtype": dtype_name,
                    "objective": divergence,
                    "loss": float(dense[0]),
                    "loss rel": errors[0],
                    "d hidden rel": errors[1],
                    "d weight rel": errors[2],
                    "dense MiB": dense[4],
                    "fused MiB": fused[4],
                    "dense s": dense[3],
                    "fused s": fused[3],
                    "check": "PASS" if passed else "FAIL",
                }
            )
        del inputs
    print_table(f"fused vs dense loss, N={n} tokens, V={v}, H={h}, {device}", rows)
    return rows, ok


# ---------------------------------------------------------------- liger: LigerFusedLinearJSD beside distill's jsd


def part_liger(device, quick: bool) -> tuple[list[dict], bool]:
    import torch

    from distill.losses.objective import Objective

    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except ImportError as e:
        print(f"\nliger: not run ({e.__class__.__name__}: {e}; `pip install liger-kernel` on a GPU machine)")
        return [], True
    n, v, h = (96, 512, 32) if quick else (4096, 151936, 896)
    rows = []
    for dtype_name in ("float32", "bfloat16"):
        inputs = loss_inputs(n, v, h, getattr(torch, dtype_name), device)
        hidden, weight, teacher_hidden, teacher_weight, labels = inputs
        objective = Objective("jsd", beta=0.5, temperature=1.0)
        loss, _, _, seconds, peak = one_loss("fused", objective, inputs, device)
        liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)

        def run(liger=liger, hidden=hidden, weight=weight, th=teacher_hidden, tw=teacher_weight, labels=labels):
            value = liger(hidden, weight, th, tw, labels)
            torch.autograd.grad(value, [hidden, weight])
            return value.detach()

        run()
        base = reset_peak(device)
        value, liger_s = timed(device, run)
        rows.append(
            {
                "dtype": dtype_name,
                "distill jsd": float(loss),
                "liger jsd": float(value),
                "rel": rel(value, loss),
                "distill s": seconds,
                "liger s": liger_s,
                "distill MiB": peak,
                "liger MiB": peak_above(device, base),
            }
        )
    print_table(f"distill fused jsd vs Liger-Kernel LigerFusedLinearJSD, N={n}, V={v}, H={h}, {device}", rows)
    return rows, True


# ---------------------------------------------------------------- train: short `distill train` runs


def build_pair(folder: Path, quick: bool) -> tuple[Path, Path, int]:
    """A random teacher and a half-depth random student of the same shape, one word-level tokenizer (not timed)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    sys.path.insert(0, str(HERE.parent))
    from peer_trl import PAIRS

    spec = {k: val for k, val in PAIRS["tiny" if quick else "smollm"].items() if k not in ("steps", "model_type")}
    layers = spec.pop("student_layers")
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, spec["vocab_size"])}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )
    paths = []
    for name, depth in (("teacher", spec["num_hidden_layers"]), ("student", layers)):
        torch.manual_seed(len(name))
        config = LlamaConfig(**{**spec, "num_hidden_layers": depth}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths.append(folder / name)
    return paths[0], paths[1], spec["vocab_size"]


def train_runs(device, quick: bool) -> list[tuple[str, list[str], bool]]:
    """(name, overrides, torchrun) of each run; the first is the reference of the loss column."""
    import importlib.util

    cuda = device.type == "cuda"
    runs = [
        ("bf16, fused loss", [], False),
        ("bf16, dense loss", ["objective.fused=false"], False),
        ("+ gradient checkpointing", ["training.gradient_checkpointing=true"], False),
        ("attention eager", ["teacher.attn_implementation=eager", "student.attn_implementation=eager"], False),
    ]
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        flash = ["teacher.attn_implementation=flash_attention_2", "student.attn_implementation=flash_attention_2"]
        runs.append(("attention flash_attention_2", flash, False))
    if not quick:  # compiling costs minutes on a CPU: the CPU path leaves it to tests/test_train_settings.py
        runs.append(("+ torch.compile", ["training.compile=true"], False))
    if cuda:
        runs.append(("teacher on CPU", ["teacher.device=cpu"], False))
    runs.append(("FSDP2, 1 process", ["training.distributed=fsdp"], True))
    runs.append(("FSDP2 + checkpointing", ["training.distributed=fsdp", "training.gradient_checkpointing=true"], True))
    return runs


def write_recipe(folder: Path, teacher: Path, student: Path, vocab: int, device, quick: bool) -> Path:
    import random

    import yaml

    tokens, steps = (32, 3) if quick else (512, 8)
    rng = random.Random(0)
    rows = [{"input_ids": [rng.randrange(3, vocab) for _ in range(tokens)]} for _ in range(8 * steps)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval.jsonl").write_text(json.dumps(rows[0]) + "\n")
    recipe = {
        "teacher": {"path": str(teacher)},
        "student": {"path": str(student)},
        "data": {"train": str(folder / "rows.jsonl"), "eval": str(folder / "eval.jsonl"), "max_length": tokens},
        "objective": {"divergence": "forward_kl", "ce_weight": 0.1},
        "training": {
            "steps": steps,
            "batch_size": 8,
            "lr": 1e-4,
            "mixed_precision": "bf16",
            "device": device.type,
            "log_every": 1,
            "save_every": 1000,
            "eval_every": 1000,
            "eval_batches": 1,
        },
        "report": {"enabled": False},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_train(folder: Path, recipe: Path, name: str, overrides: list[str], torchrun: bool) -> dict:
    out = folder / name.replace(" ", "-").replace(",", "").replace("+", "plus")
    probe = folder / "probe.py"
    probe.write_text(PROBE)
    args = ["train", str(recipe), "--quiet", f"output.dir={out}", *overrides]
    if torchrun:
        # A free port of our own: with --master_port 0 the worker's rendezvous can wait forever.
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", free_port()]
        command += [str(probe), *args]
    else:
        command = [sys.executable, str(probe), *args]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p),
    }
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("GPU_CHECK ")]
    if done.returncode != 0 or not lines:
        return {"run": name, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    report = json.loads(lines[-1].removeprefix("GPU_CHECK "))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [e for e in events if e.get("event") == "train"]
    rates = [e["tokens_per_s"] for e in train[1:]] or [train[0]["tokens_per_s"]]
    return {
        "run": name,
        "tokens/s": statistics.median(rates),
        "peak device MiB": report["peak_device"] / MIB if report["peak_device"] else None,  # None on CPU
        "peak RSS MiB": report["peak_rss"] / MIB,
        "first loss": train[0]["loss"],
        "last loss": train[-1]["loss"],
        "wall s": wall,
    }


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def part_train(device, quick: bool, keep: str | None) -> tuple[list[dict], bool]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        teacher, student, vocab = build_pair(folder, quick)
        recipe = write_recipe(folder, teacher, student, vocab, device, quick)
        rows, ok = [], True
        for name, overrides, torchrun in train_runs(device, quick):
            row = run_train(folder, recipe, name, overrides, torchrun)
            if "error" not in row and rows and "first loss" in rows[0]:
                # Same weights and batch: every setting starts from the same loss (bf16 autocast noise aside).
                row["loss vs first run"] = rel_scalar(row["first loss"], rows[0]["first loss"])
                row["check"] = "PASS" if row["loss vs first run"] <= TOLERANCE["bfloat16"] else "FAIL"
            elif "error" in row:
                row["check"] = "FAIL"
            ok &= row.get("check", "PASS") == "PASS"
            rows.append(row)
            print(f"  {name}: {row.get('error') or 'done'}", flush=True)
    size = "tiny pair, 8 x 32 tokens" if quick else "SmolLM2-135M-shaped pair, 8 x 512 tokens"
    print_table(f"distill train, {size} a step, bf16 autocast, {device}", rows)
    return rows, ok


def rel_scalar(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# ---------------------------------------------------------------- cpu: the teacher's forward, float32 vs bfloat16


def part_cpu(device, quick: bool) -> tuple[list[dict], bool]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(HERE.parent))
    from peer_trl import PAIRS

    from distill.losses.heads import backbone_hidden_states
    from distill.models import cpu_has_native_bf16

    spec = {k: v for k, v in PAIRS["tiny" if quick else "smollm"].items() if k not in ("steps", "student_layers")}
    spec.pop("model_type")
    tokens = 32 if quick else 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**spec)).eval()
    ids = torch.randint(3, spec["vocab_size"], (8, tokens))
    rows, reference = [], None
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad():
            hidden = backbone_hidden_states(model, ids)  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                backbone_hidden_states(model, ids)
                times.append(time.perf_counter() - start)
        reference = hidden.float() if reference is None else reference
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "forward s": statistics.median(times),
                "vs float32": statistics.median(times) / rows[0]["forward s"] if rows else 1.0,
                "hidden rel err": rel(hidden, reference),
            }
        )
    flags = "yes" if cpu_has_native_bf16() else "no"  # the probe teacher.dtype=auto asks
    capability = torch.backends.cpu.get_cpu_capability()
    print_table(
        f"teacher forward on CPU, 8 x {tokens} tokens, {torch.get_num_threads()} threads; native bf16: {flags} "
        f"(torch CPU capability {capability})",
        rows,
    )
    return rows, True


# ---------------------------------------------------------------- output


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.2e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e5) else f"{value:.3f}"
        return "-" if value is None else str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    sys.stdout.flush()


def machine_line(device) -> str:
    import torch

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"device: {where}; torch {torch.__version__}; {os.cpu_count()} CPU cores; load {os.getloadavg()[0]:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the CPU path of the test suite")
    parser.add_argument("--parts", default="loss,liger,train,cpu", help="comma-separated: loss, liger, train, cpu")
    parser.add_argument("--keep", help="folder to keep the models and runs in (default: a temporary one)")
    parser.add_argument("--json", help="also write every table's rows to this file")
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no GPU is visible here; run with --device cpu (--quick) to check the code path", file=sys.stderr
        )
        return 2
    print(machine_line(device), flush=True)
    start = time.perf_counter()
    results, ok = {}, True
    parts = {"loss": part_loss, "liger": part_liger, "cpu": part_cpu}
    for part in args.parts.split(","):
        if part == "train":
            rows, passed = part_train(device, args.quick, args.keep)
        elif part in parts:
            rows, passed = parts[part](device, args.quick)
        else:
            parser.error(f"unknown part {part!r}")
        results[part] = rows
        ok &= passed
    print(f"\ngpu_check: {'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
