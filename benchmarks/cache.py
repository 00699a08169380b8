"""Offline teacher signals vs the online teacher: storage, training speed and quality, in one run on CPU.

    python benchmarks/cache.py                       # the table quoted in benchmarks/README_cache.md
    python benchmarks/cache.py --steps 40 --quick    # a smoke run

One teacher, one student, one data set (Python's standard library, via `distill.demo.corpus`, tokenized with
the quick-start tokenizer of 1024 tokens):

1. The teacher (a 4-layer Llama, about 7x the student's parameters) is trained here on hard labels first, so
   that its distributions look like a language model's (peaked), not like a random network's (flat).
2. `distill cache` builds six caches of the same training set: top-32 + sampled m (8-bit log-probs), top-32 in
   float16, top-32 in 4-bit codes with bit-packed ids, top-16 in 8-bit codes with bit-packed ids, and top-16 /
   top-32 plus 8 draws from the teacher's tail (`cache.tail_samples`), 4-bit codes, bit-packed ids.
3. The student (2-layer Qwen2) is distilled for the same steps, from the same initial weights and data order:
   online with the dense teacher, and from each cached representation (forward KL, τ = 1, fused loss); the
   top-32 float16 and int4 caches are each read twice, with the tail as one extra class (default) and
   spread uniformly over the other tokens (`cache.tail`).
4. Reported per row: stored bytes per loss token, training tokens/s (median of the log windows after the first,
   so start-up, warm-up and load spikes are left out), the process CPU seconds of the whole `train()` call
   (loading included; less sensitive to other processes than wall time), and the held-out KL(teacher ‖ student)
   and cross-entropy on files the teacher never saw, with the ratio to online distillation.

Not a test: the timings depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "examples" / "quickstart" / "tokenizer"
QUIET = {"log": lambda _: None, "show_progress": False}


def write_data(folder: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    from distill.demo.corpus import chunks, list_files, read_source, write_jsonl

    train_files, held_out = list_files()
    train = [{"text": c} for f in train_files for c in chunks(read_source(f) or "", 6)][:train_rows]
    evals = [{"text": c} for f in held_out for c in chunks(read_source(f) or "", 6)][:eval_rows]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", evals)
    return folder / "train.jsonl", folder / "eval.jsonl"


def model_config(kind: str, hidden: int, layers: int, intermediate: int) -> dict:
    return {
        "model_type": kind,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }


def base_recipe(args, work: Path, train_file: Path, eval_file: Path) -> dict:
    return {
        "teacher": {"path": str(args.teacher)},
        "student": {"path": str(work / "student-init"), "tokenizer": str(TOKENIZER)},
        "data": {"train": str(train_file), "eval": str(eval_file), "max_length": args.max_length},
        "objective": {"divergence": "forward_kl", "temperature": 1.0, "fused": True},
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": 3e-3,
            "warmup_steps": 5,
            "seed": 0,
            "save_every": args.steps,
            "eval_every": args.steps,
            "eval_batches": 1,
            "log_every": 5,
            "device": "cpu",
        },
        "cache": {"top_k": 32, "sample_m": args.sample_m, "batch_size": 16, "shard_tokens": 1 << 16},
        "report": {"enabled": False},
    }


def prepare_models(args, work: Path, train_file: Path) -> None:
    """Train the teacher on hard labels; save the student's random initial weights (shared by every run)."""
    from distill.config import recipe_from_dict
    from distill.models import load_tokenizer, new_model_from_config
    from distill.train.loop import train

    if not (work / "teacher").exists():
        recipe = recipe_from_dict(
            {
                "student": {"config": model_config("llama", 128, 4, 384), "tokenizer": str(TOKENIZER)},
                "data": {"train": str(train_file), "max_length": args.max_length},
                "objective": {"kd_weight": 0.0, "ce_weight": 1.0},
                "training": {
                    "steps": args.teacher_steps,
                    "batch_size": 16,
                    "lr": 1e-2,
                    "warmup_steps": 10,
                    "save_every": args.teacher_steps,
                    "eval_every": args.teacher_steps,
                    "eval_batches": 2,
                    "device": "cpu",
                },
                "report": {"enabled": False},
                "output": {"dir": str(work / "teacher-run")},
            }
        )
        start = time.perf_counter()
        result = train(recipe, **QUIET)
        shutil.copytree(result.student_dir, work / "teacher")
        print(f"teacher trained on hard labels in {time.perf_counter() - start:.0f} s", flush=True)
    if not (work / "student-init").exists():
        tokenizer = load_tokenizer(str(TOKENIZER), "student")
        student = new_model_from_config(model_config("qwen2", 48, 2, 128), len(tokenizer), torch.float32, seed=1)
        student.save_pretrained(work / "student-init")


def held_out_metrics(model_dir: Path, teacher_dir: Path, eval_file: Path, max_length: int) -> dict:
    from distill.data import build_examples, iter_batches, pad_id_of
    from distill.models import load_model, load_tokenizer
    from distill.report.quality import evaluate_batches

    tokenizer = load_tokenizer(str(TOKENIZER), "student")
    examples, _ = build_examples(eval_file, tokenizer, max_length)
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    model = load_model(str(model_dir), "student", torch.float32).eval()
    with torch.no_grad():
        batches = iter_batches(examples, 16, pad_id_of(tokenizer))
        return evaluate_batches(model, teacher, batches, len(tokenizer), torch.device("cpu"))


def teacher_statistics(teacher_dir: Path, eval_file: Path, max_length: int, k: int = 32) -> dict:
    """The teacher's mean entropy and mean top-k mass on the held-out loss tokens: how much a top-k cache drops."""
    from distill.data import build_examples, iter_batches, pad_id_of
    from distill.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER), "student")
    examples, _ = build_examples(eval_file, tokenizer, max_length)
    teacher = load_model(str(teacher_dir), "teacher", torch.float32).eval()
    entropy, mass, count = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(examples, 16, pad_id_of(tokenizer)):
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            lp = torch.log_softmax(logits[:, :-1, : len(tokenizer)][batch["labels"] != -100].float(), -1)  # (n, V)
            entropy += float(-(lp.exp() * lp).sum())
            mass += float(lp.exp().topk(k, -1).values.sum())
            count += lp.shape[0]
    return {"entropy": entropy / count, "top_k_mass": mass / count}


def sharpened_teacher(work: Path, scale: float) -> Path:
    """The trained teacher with its output head multiplied by `scale`: logits / (1/scale), a peakier teacher
    standing in for a better-trained one (used online and cached alike)."""
    if scale == 1.0:
        return work / "teacher"
    folder = work / f"teacher-x{scale:g}"
    if not folder.exists():
        from distill.models import load_model, load_tokenizer

        model = load_model(str(work / "teacher"), "teacher", torch.float32)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
        model.save_pretrained(folder)
        load_tokenizer(str(TOKENIZER), "student").save_pretrained(folder)
    return folder


def train_rate(out: Path) -> float:
    """Median tokens/s of the log windows after the first: a load spike from another process moves a mean, not
    a median."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in events if e.get("event") == "train"]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "distill-cache-bench")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--sample-m", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--teacher-scale", type=float, default=1.0, help="multiply the teacher's output head (sharper teacher)"
    )
    parser.add_argument("--quick", action="store_true", help="small data and teacher (smoke run)")
    parser.add_argument("--only", nargs="*", help="train only the cached runs whose label contains one of these")
    parser.add_argument("--fresh", action="store_true", help="delete --work first")
    args = parser.parse_args()
    if args.quick:
        args.teacher_steps = 20
    torch.set_num_threads(args.threads)

    from distill.cache.build import build_cache
    from distill.cache.reader import read_manifest
    from distill.config import recipe_from_dict
    from distill.models import count_parameters, load_model
    from distill.train.loop import train

    work = args.work
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    # One epoch of training rows of 6 source lines each (longer ones are truncated to max_length).
    train_file, eval_file = write_data(work, train_rows=args.steps * args.batch_size, eval_rows=64)
    prepare_models(args, work, train_file)
    args.teacher = sharpened_teacher(work, args.teacher_scale)
    tag = "" if args.teacher_scale == 1.0 else f"-x{args.teacher_scale:g}"
    base = base_recipe(args, work, train_file, eval_file)
    teacher_params = count_parameters(load_model(str(args.teacher), "teacher", torch.float32))
    teacher_stats = teacher_statistics(args.teacher, eval_file, args.max_length)
    student_params = count_parameters(load_model(str(work / "student-init"), "student", torch.float32))

    # name -> cache settings; every cache stores the same top-32 or top-16 of the same teacher on the same data.
    caches = {
        "int8": {"representation": "both", "precision": "int8"},
        "fp16": {"representation": "top_k", "precision": "float16"},
        "int4-packed": {"representation": "top_k", "precision": "int4", "pack_ids": True},
        "top16-int8-packed": {"representation": "top_k", "precision": "int8", "pack_ids": True, "top_k": 16},
        "top16-tail8-int4-packed": {"precision": "int4", "pack_ids": True, "top_k": 16, "tail_samples": 8},
        "top32-tail8-int4-packed": {"precision": "int4", "pack_ids": True, "top_k": 32, "tail_samples": 8},
    }
    build_s = {}
    for name, settings in caches.items():
        folder = work / f"cache-v2-{name}{tag}"
        recipe = recipe_from_dict(base, {"cache.dir": str(folder), **{f"cache.{k}": v for k, v in settings.items()}})
        start = time.perf_counter()
        build_cache(recipe, **QUIET)
        build_s[name] = time.perf_counter() - start
    manifests = {name: read_manifest(work / f"cache-v2-{name}{tag}") for name in caches}
    loss_tokens = manifests["int8"]["data"]["loss_tokens"]

    def cached(name: str, train_on: str, **more) -> dict:
        return {"teacher.cache": str(work / f"cache-v2-{name}{tag}"), "cache.train_on": train_on, **more}

    # (label, recipe overrides, (cache, representation) whose bytes per token the row reports)
    runs = [
        ("online dense teacher", {}, None),
        ("top-32 float16", cached("fp16", "top_k"), ("fp16", "top_k")),
        ("top-32 float16, uniform tail", cached("fp16", "top_k", **{"cache.tail": "uniform"}), ("fp16", "top_k")),
        ("top-32 int8", cached("int8", "top_k"), ("int8", "top_k")),
        ("top-32 int4, packed ids", cached("int4-packed", "top_k"), ("int4-packed", "top_k")),
        (
            "top-32 int4, packed ids, uniform tail",
            cached("int4-packed", "top_k", **{"cache.tail": "uniform"}),
            ("int4-packed", "top_k"),
        ),
        ("top-16 int8, packed ids", cached("top16-int8-packed", "top_k"), ("top16-int8-packed", "top_k")),
        (
            "top-16 + 8 tail draws, int4, packed ids",
            cached("top16-tail8-int4-packed", "top_k"),
            ("top16-tail8-int4-packed", "top_k"),
        ),
        (
            "top-32 + 8 tail draws, int4, packed ids",
            cached("top32-tail8-int4-packed", "top_k"),
            ("top32-tail8-int4-packed", "top_k"),
        ),
        (f"sampled m={args.sample_m} int8", cached("int8", "sampled"), ("int8", "sampled")),
        # The ceiling of any cache: the student's own step with no teacher signal at all.
        ("hard labels only (no teacher signal)", {"objective.kd_weight": 0.0, "objective.ce_weight": 1.0}, None),
        # Online again at the end: the machine's drift over the run shows as the gap between the two online rows.
        ("online dense teacher (again, last)", {}, None),
    ]
    if args.only:
        runs = [r for r in runs if r[0].startswith("online") or any(word in r[0] for word in args.only)]
    rows = []
    initial = held_out_metrics(work / "student-init", args.teacher, eval_file, args.max_length)
    for label, overrides, stored in runs:
        out = work / f"runs{tag}" / label.replace(" ", "-").replace("=", "").replace(",", "")
        if out.exists():
            shutil.rmtree(out)
        recipe = recipe_from_dict(base, {"output.dir": str(out), **overrides})
        start, cpu = time.perf_counter(), time.process_time()
        result = train(recipe, **QUIET)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        metrics = held_out_metrics(result.student_dir, args.teacher, eval_file, args.max_length)
        per_token = manifests[stored[0]]["bytes_per_token"][stored[1]] if stored else None
        rate = train_rate(out)
        rows.append(
            {"run": label, "bytes_per_token": per_token, "tokens_per_s": rate, "wall_s": wall, "cpu_s": cpu, **metrics}
        )
        print(f"{label}: done in {wall:.0f} s", flush=True)

    online = dict(rows[0])
    # Speeds are compared with the mean of the first and last online runs, which brackets the cached ones.
    online["tokens_per_s"] = statistics.mean([rows[0]["tokens_per_s"], rows[-1]["tokens_per_s"]])
    print()
    print(
        f"teacher {teacher_params / 1e6:.2f}M params ({teacher_params / student_params:.1f}x the student's "
        f"{student_params / 1e6:.2f}M); vocabulary 1024; {loss_tokens} training loss tokens; {args.steps} steps × "
        f"{args.batch_size} sequences of ≤ {args.max_length} tokens; CPU threads {args.threads}; {platform.processor()}"
    )
    built = ", ".join(
        f"{name} {build_s[name]:.0f} s / {manifests[name]['bytes_per_token']['files']:.1f} B per token"
        for name in caches
    )
    print(f"cache builds (time / file bytes per loss token with offsets and headers): {built}")
    print(
        f"teacher head scale {args.teacher_scale:g}: held-out entropy {teacher_stats['entropy']:.2f} nats, "
        f"top-32 mass {teacher_stats['top_k_mass']:.1%}; "
        f"held-out KL(teacher ‖ student) before training: {initial['kl_to_teacher']:.4f}"
    )
    print()
    header = (
        "| run | bytes/token | train tokens/s | speed vs online (mean of both) | CPU s of train() | held-out KL(t‖s) "
        "| KL vs online | held-out CE |"
    )
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        stored = f"{r['bytes_per_token']}" if r["bytes_per_token"] is not None else "(teacher run)"
        stored = "none" if r["run"].startswith("hard labels") else stored
        print(
            f"| {r['run']} | {stored} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / online['tokens_per_s']:.2f}x "
            f"| {r['cpu_s']:.1f} | {r['kl_to_teacher']:.4f} | {r['kl_to_teacher'] / online['kl_to_teacher'] - 1:+.1%} "
            f"| {r['cross_entropy']:.4f} |"
        )
    results = {"rows": rows, "initial": initial, "build_s": build_s, "teacher": teacher_stats}
    (work / f"results{tag}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
