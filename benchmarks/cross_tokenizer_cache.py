"""How far a cross-tokenizer cache's top-k loss is from the online one: uld and aligned, per k.

The pair of benchmarks/cross_tokenizer.py (the demo teacher, byte-level BPE of 8192 tokens -> a Llama student with a
2048-token SentencePiece-style BPE trained on the same corpus). `distill cache` is run per (k, precision) on the
first `--examples` training blocks (int4 log-probs, the recipe's default, and float32 at k = 32; packed ids); then,
over the same micro-batches, the divergence summed over the anchors and its gradient with respect to the student's
weights are computed with the online teacher and from each cache, for two students: a fresh random init and the
same after `--hard-steps` hard-label steps. Printed: the loss from the cache over the online loss, and the cosine
between the two gradients. Last, uld + CE is trained `--train-steps` steps online and from the top-32 cache, and
both students are scored by the cross-tokenizer report on the held-out blocks.

    python benchmarks/cross_tokenizer_cache.py [--examples 64] [--hard-steps 40] [--train-steps 60]

uld from a top-k is a lower bound of the exact ULD (the tails meet in one term |rest_s − rest_t|), so its ratio is
at most 1; aligned from a top-k pools the buckets outside the teacher's top-k into the tail on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cross_tokenizer import STUDENT_CONFIG, train_student_tokenizer, write_data  # noqa: E402

from distill.cache.build import build_cache  # noqa: E402
from distill.cache.cross import CrossCacheReader  # noqa: E402
from distill.cache.reader import read_manifest  # noqa: E402
from distill.config import recipe_from_dict  # noqa: E402
from distill.data import collate, load_data, pad_id_of  # noqa: E402
from distill.data.alignment import TokenizerPair  # noqa: E402
from distill.demo.run import BATCH_SIZE, LR, MAX_LENGTH, TEACHER_DIR  # noqa: E402
from distill.losses.cross_tokenizer import TopKCrossTargets  # noqa: E402
from distill.models import load_model, load_tokenizer, max_context, new_model_from_config  # noqa: E402
from distill.train.cross import cross_objective, teacher_targets  # noqa: E402
from distill.train.loop import train  # noqa: E402
from distill.train.step import StudentLoss  # noqa: E402

# (top_k, cache.precision): the recipe's default storage (int4 log-probs) per k, and float32 at k = 32 to tell the
# truncation to a top-k apart from the quantization of its log-probs.
CACHES = ((8, "int4"), (32, "int4"), (32, "float32"), (128, "int4"))


def recipe(tokenizer: Path, train_file: Path, eval_file: Path, out: Path, objective: dict, **sections) -> dict:
    content = {
        "teacher": {"path": str(TEACHER_DIR), "dtype": "float32"},
        "student": {"config": STUDENT_CONFIG, "tokenizer": str(tokenizer)},
        "data": {"train": str(train_file), "eval": str(eval_file), "max_length": MAX_LENGTH},
        "objective": {"fused": False, **objective},
        "training": {"batch_size": BATCH_SIZE, "lr": LR, "device": "cpu", "seed": 0},
        "report": {"enabled": False},
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        content.setdefault(section, {}).update(values)
    return content


def students(tokenizer: Path, train_file: Path, eval_file: Path, out: Path, hard_steps: int) -> dict[str, Path]:
    """A fresh random init (the one `distill train` starts from, seed 0) and the same after `hard_steps` hard-label
    steps, saved as model folders."""
    fresh = out / "student-0"
    if not (fresh / "model.safetensors").exists():
        tok = load_tokenizer(str(tokenizer), "student")
        new_model_from_config(STUDENT_CONFIG, len(tok), torch.float32, 0, tok).save_pretrained(fresh)
        tok.save_pretrained(fresh)
    trained = out / f"student-{hard_steps}"
    if not (trained / "student" / "model.safetensors").exists():
        hard = {"kd_weight": 0.0, "ce_weight": 1.0}
        training = {"steps": hard_steps, "save_every": hard_steps, "eval_every": hard_steps}
        content = recipe(tokenizer, train_file, eval_file, trained, hard, training=training)
        train(recipe_from_dict(content), log=lambda _: None, show_progress=False)
    return {"random init": fresh, f"{hard_steps} hard-label steps": trained / "student"}


def loss_and_gradient(student_dir: Path, batches, targets, mode: str, pair, objective) -> tuple[float, torch.Tensor]:
    """Σ over the micro-batches of the divergence at the anchors, and its gradient (flattened) in the student."""
    student = load_model(str(student_dir), "student", torch.float32)
    module = StudentLoss(
        student, objective, len(pair.student.pieces), cross=cross_objective(pair, mode, torch.device("cpu"))
    )
    total = 0.0
    for batch, t in zip(batches, targets, strict=True):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        loss, kd_sum, _, _ = module(inputs, batch["labels"], 1.0, cross=t)
        loss.backward()
        total += float(kd_sum)
    grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return total, grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--hard-steps", type=int, default=40)
    parser.add_argument(
        "--train-steps", type=int, default=60, help="uld + CE online vs from the top-32 cache (0: skip)"
    )
    parser.add_argument("--out", default="runs/cross-tokenizer-cache")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    data = write_data(out / "data")
    lines = data["train"].read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    tokenizer = train_student_tokenizer(texts, out / "student-tokenizer")
    subset = out / "data" / "subset.jsonl"
    subset.write_text("".join(line + "\n" for line in lines[: args.examples]), encoding="utf-8")

    started = time.perf_counter()
    models = students(tokenizer, subset, data["eval"], out, args.hard_steps)
    print(f"students ready in {time.perf_counter() - started:.0f} s", flush=True)
    objective = {"cross_tokenizer": "uld", "kd_weight": 1.0, "ce_weight": 0.0}
    caches = {}
    for k, precision in CACHES:
        content = recipe(
            tokenizer,
            subset,
            data["eval"],
            out / "unused",
            objective,
            cache={"dir": str(out / f"cache-{k}-{precision}"), "top_k": k, "precision": precision},
        )
        started = time.perf_counter()
        caches[k, precision] = build_cache(recipe_from_dict(content), log=lambda _: None, show_progress=False)
        manifest = read_manifest(caches[k, precision])
        print(
            f"cache top-{k} {precision}: {time.perf_counter() - started:.0f} s, {manifest['bytes'] / 2**20:.2f} MiB, "
            f"{manifest['bytes'] / manifest['cross_tokenizer']['teacher_tokens']:.1f} bytes per teacher position",
            flush=True,
        )

    base = recipe_from_dict(recipe(tokenizer, subset, data["eval"], out / "unused", objective))
    s_tok, t_tok = load_tokenizer(str(tokenizer), "student"), load_tokenizer(str(TEACHER_DIR), "teacher")
    teacher = load_model(str(TEACHER_DIR), "teacher", torch.float32).eval()
    pair = TokenizerPair(s_tok, t_tok, max_context(teacher.config))
    examples = load_data(base, s_tok, lambda _: None)[0]
    batches, online, cached = [], [], {c: [] for c in CACHES}
    readers = {c: CrossCacheReader(caches[c], read_manifest(caches[c])) for c in CACHES}
    for first in range(0, len(examples), BATCH_SIZE):
        indices = list(range(first, min(first + BATCH_SIZE, len(examples))))
        chosen = [examples[i] for i in indices]
        batch = collate(chosen, pad_id_of(s_tok))
        batch.update(pair.batch(chosen, batch["input_ids"].shape[1]))
        batches.append(batch)
        online.append(teacher_targets(teacher, batch, False, torch.device("cpu")))
        for c in CACHES:
            rows = readers[c].anchor_rows(indices, batch)
            cached[c].append(TopKCrossTargets(batch["anchor_student"], batch["anchor_exact"], *rows.values()))
    anchors = sum(len(b["anchor_student"]) for b in batches)
    exact = sum(int(b["anchor_exact"].sum()) for b in batches)
    print(
        f"\n{len(examples)} training blocks of up to {MAX_LENGTH} student tokens, {anchors} anchors ({exact} 1:1); "
        "forward KL, τ = 1; packed ids"
    )
    print(
        "| student | mode | online loss / anchor | "
        + " | ".join(f"top-{k} {precision}: loss ratio, grad cosine" for k, precision in CACHES)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(CACHES))
    for name, folder in models.items():
        for mode in ("uld", "aligned"):
            value, grad = loss_and_gradient(folder, batches, online, mode, pair, base.objective)
            cells = []
            for c in CACHES:
                v, g = loss_and_gradient(folder, batches, cached[c], mode, pair, base.objective)
                cosine = float(torch.nn.functional.cosine_similarity(g, grad, dim=0))
                cells.append(f"{v / value:.3f}, {cosine:.3f}")
            print(f"| {name} | {mode} | {value / anchors:.4f} | " + " | ".join(cells) + " |", flush=True)
    if args.train_steps:
        train_online_and_cached(tokenizer, subset, data["eval"], out, caches[32, "int4"], args.train_steps)


def train_online_and_cached(tokenizer: Path, train_file: Path, eval_file: Path, out: Path, cache: Path, steps: int):
    """uld + CE from the same random init for `steps` steps, with the teacher online and from the cache; both
    scored by the cross-tokenizer report on the held-out blocks."""
    from distill.demo.run import EVAL_MAX_LENGTH
    from distill.report.evaluate import evaluate_models

    objective = {"cross_tokenizer": "uld", "kd_weight": 1.0, "ce_weight": 1.0}
    training = {"steps": steps, "save_every": steps, "eval_every": steps, "warmup_steps": min(4, steps // 4)}
    trained, seconds = {}, {}
    for name, teacher in (
        ("online", {"path": str(TEACHER_DIR), "dtype": "float32"}),
        ("cache-top-32", {"path": str(TEACHER_DIR), "cache": str(cache)}),
    ):
        folder = out / f"train-{name}-{steps}"
        timing = folder / "wall_s.txt"  # written last: a finished run is reused by a rerun
        if not timing.exists():
            shutil.rmtree(folder, ignore_errors=True)
            content = recipe(tokenizer, train_file, eval_file, folder, objective, training=training)
            content["teacher"] = teacher
            started = time.perf_counter()
            train(recipe_from_dict(content), log=lambda _: None, show_progress=False)
            timing.write_text(f"{time.perf_counter() - started:.1f}")
        trained[name], seconds[name] = str(folder / "student"), float(timing.read_text())
    report = evaluate_models(
        str(TEACHER_DIR),
        trained,
        str(eval_file),
        None,
        max_length=EVAL_MAX_LENGTH,
        speed=False,
        cross_tokenizer=True,
        show_progress=False,
        log=lambda _: None,
    )
    print(f"\nuld + CE, {steps} steps x {BATCH_SIZE} sequences from the same random init; held-out blocks")
    print(
        "| teacher signal | wall s | bits/byte | teacher bits/byte, same bytes | agreement at 1:1 | KL at 1:1 (nats) |"
    )
    print("|---|---|---|---|---|---|")
    for name in trained:
        m = report["models"][name]
        print(
            f"| {name} | {seconds[name]:.0f} | {m['bits_per_byte']:.4f} | {m['teacher_bits_per_byte']:.3f} | "
            f"{m['agreement']:.3f} | {m['kl_to_teacher']:.4f} |"
        )


if __name__ == "__main__":
    main()
