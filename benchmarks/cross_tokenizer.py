"""Distilling the demo teacher into a student with another tokenizer: uld and aligned vs sequence-level vs hard labels.

The demo teacher (byte-level BPE, 8192 tokens, no BOS) is distilled into a fresh Llama student whose tokenizer is a
smaller SentencePiece-style BPE (▁ spaces with a dummy prefix, <0xNN> byte fallback, a BOS before every text)
trained here on the same demo corpus. Every variant starts from the same random student, trains the same number of
optimizer steps on batches of the same size, and is scored by the cross-tokenizer report (`distill.report.cross`)
on the demo's held-out modules: bits per byte (tokenizer-free), and agreement / KL where spans align 1:1.

    python benchmarks/cross_tokenizer.py [--steps 100] [--out runs/cross-tokenizer]

Variants:
- hard labels: cross-entropy on the training text, no teacher
- sequence-level: the teacher writes continuations of prompts from the training text first (`distill generate`);
  the student is trained on them with hard labels
- uld + CE: objective.cross_tokenizer=uld, kd_weight 1 and ce_weight 1 (the ULD paper trains on both)
- aligned + CE: objective.cross_tokenizer=aligned, the same weights
- aligned: objective.cross_tokenizer=aligned, distillation only (ce_weight 0)
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

from distill.cli import main as distill_cli  # noqa: E402
from distill.config import recipe_from_dict  # noqa: E402
from distill.demo import corpus  # noqa: E402
from distill.demo.run import BATCH_SIZE, EVAL_MAX_LENGTH, EVAL_ROWS, LR, MAX_LENGTH, TEACHER_DIR  # noqa: E402
from distill.train.loop import train  # noqa: E402

STUDENT_VOCAB = 2048  # the teacher's: 8192
STUDENT_CONFIG = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
TRAIN_FILE_STRIDE = 8  # every 8th training file of the teacher's corpus, as the demo
PROMPT_LINES = 4  # sequence-level prompts: the first lines of a block of training text
PROMPTS = 192  # sequence-level: the teacher's continuations, each seen about steps x batch / 192 times
NEW_TOKENS = 96


def train_student_tokenizer(texts: list[str], folder: Path) -> Path:
    """A SentencePiece-style BPE of STUDENT_VOCAB tokens on `texts`, saved as a tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if (folder / "tokenizer.json").exists():
        return folder
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    alphabet = sorted(set(chr(c) for c in range(32, 127)) | {"▁", "\n", "\t"})  # the rest: byte fallback
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=STUDENT_VOCAB, special_tokens=specials, initial_alphabet=alphabet, limit_alphabet=len(alphabet)
    )
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if not a["content"].startswith("<0x")]  # as Llama's
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


def write_data(folder: Path) -> dict:
    """train.jsonl (24-line blocks of every 8th training file), eval.jsonl (held-out blocks, as the demo's) and
    the prompts of the sequence-level variant."""
    folder.mkdir(parents=True, exist_ok=True)
    train_files, held_out = corpus.list_files()
    blocks = [c for f in train_files[::TRAIN_FILE_STRIDE] for c in corpus.chunks(corpus.read_source(f) or "", 24)]
    corpus.write_jsonl(folder / "train.jsonl", ({"text": b} for b in blocks))
    held = [c for f in held_out for c in corpus.chunks(corpus.read_source(f) or "", 24)]
    step = max(1, len(held) // EVAL_ROWS)
    corpus.write_jsonl(folder / "eval.jsonl", ({"text": b} for b in held[::step][:EVAL_ROWS]))
    spread = blocks[:: max(1, len(blocks) // PROMPTS)][:PROMPTS]
    prompts = ["".join(b.splitlines(keepends=True)[:PROMPT_LINES]) for b in spread]
    corpus.write_jsonl(folder / "prompts.jsonl", ({"prompt": p} for p in prompts if p.strip()))
    return {"train": folder / "train.jsonl", "eval": folder / "eval.jsonl", "prompts": folder / "prompts.jsonl"}


def recipe(tokenizer: Path, data: dict, out: Path, steps: int, objective: dict, train_file: Path | None = None):
    return {
        "teacher": {"path": str(TEACHER_DIR), "dtype": "float32"},
        "student": {"config": STUDENT_CONFIG, "tokenizer": str(tokenizer)},
        "data": {"train": str(train_file or data["train"]), "eval": str(data["eval"]), "max_length": MAX_LENGTH},
        "objective": {"fused": True, **objective},
        "training": {
            "steps": steps,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "warmup_steps": min(4, steps // 4),
            "schedule": "cosine",
            "device": "cpu",
            "save_every": steps,
            "eval_every": steps,
            "eval_batches": 1,
            "log_every": max(1, min(10, steps)),
            "keep_checkpoints": 1,
            "seed": 0,
        },
        "report": {"enabled": False},
        "output": {"dir": str(out)},
    }


def run_variant(name: str, content: dict) -> tuple[str, float]:
    shutil.rmtree(content["output"]["dir"], ignore_errors=True)  # a rerun starts each variant afresh
    started = time.perf_counter()
    lines = []
    result = train(recipe_from_dict(content), log=lines.append, show_progress=False)
    seconds = time.perf_counter() - started
    shares = next((line for line in lines if line.startswith("cross-tokenizer")), "")
    print(f"  {name}: {seconds:.0f} s {shares}", flush=True)
    return str(result.student_dir), seconds


def teacher_completions(tokenizer: Path, data: dict, out: Path, steps: int) -> tuple[Path, float]:
    """The teacher's continuations of the prompts (`distill generate`), as prompt/completion text rows."""
    import yaml

    generated, rows = out / "data" / "teacher-completions.jsonl", out / "data" / "sequence-level.jsonl"
    content = recipe(tokenizer, data, out / "generate", steps, {"kd_weight": 0.0, "ce_weight": 1.0})
    content["generate"] = {
        "prompts": str(data["prompts"]),
        "output": str(generated),
        "max_new_tokens": NEW_TOKENS,
        "temperature": 0.8,
        "batch_size": 32,
    }
    recipe_file = out / "generate.yaml"
    recipe_file.write_text(yaml.safe_dump(content))
    started = time.perf_counter()
    if not generated.exists() and distill_cli(["generate", str(recipe_file), "--quiet"]) != 0:
        raise SystemExit("distill generate failed")
    seconds = time.perf_counter() - started
    # The teacher's own ids are of no use to this student: its text only (the student tokenizes it).
    text_rows = []
    for line in generated.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text_rows.append({k: row[k] for k in ("prompt", "completion", "finish_reason") if k in row})
    corpus.write_jsonl(rows, text_rows)
    print(f"  teacher completions: {len(text_rows)} in {seconds:.0f} s", flush=True)
    return rows, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/cross-tokenizer")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    data = write_data(out / "data")
    texts = [json.loads(line)["text"] for line in data["train"].read_text(encoding="utf-8").splitlines()]
    tokenizer = train_student_tokenizer(texts, out / "student-tokenizer")

    students, seconds = {}, {}
    print(f"training ({args.steps} steps x {BATCH_SIZE} sequences for every variant, one random student init)")
    hard = {"kd_weight": 0.0, "ce_weight": 1.0}
    students["hard labels"], seconds["hard labels"] = run_variant(
        "hard labels", recipe(tokenizer, data, out / "hard", args.steps, hard)
    )
    rows, generate_s = teacher_completions(tokenizer, data, out, args.steps)
    name = "sequence-level"
    students[name], seconds[name] = run_variant(name, recipe(tokenizer, data, out / "seq", args.steps, hard, rows))
    seconds[name] += generate_s
    for name, folder, objective in (
        ("uld + CE", "uld", {"cross_tokenizer": "uld", "kd_weight": 1.0, "ce_weight": 1.0}),
        ("aligned + CE", "aligned-ce", {"cross_tokenizer": "aligned", "kd_weight": 1.0, "ce_weight": 1.0}),
        ("aligned", "aligned", {"cross_tokenizer": "aligned", "kd_weight": 1.0, "ce_weight": 0.0}),
    ):
        students[name], seconds[name] = run_variant(name, recipe(tokenizer, data, out / folder, args.steps, objective))

    print("evaluating across tokenizers on the held-out modules", flush=True)
    from distill.report.evaluate import evaluate_models

    models = {name.replace(" + ", "-").replace(" ", "-"): path for name, path in students.items()}
    report = evaluate_models(
        str(TEACHER_DIR),
        models,
        str(data["eval"]),
        str(out / "report"),
        max_length=EVAL_MAX_LENGTH,
        speed=False,
        cross_tokenizer=True,
        show_progress=False,
        log=lambda _: None,
    )
    print_table(report, students, seconds, args.steps)


def print_table(report: dict, students: dict, seconds: dict, steps: int) -> None:
    results, teacher = report["models"], report["models"]["teacher"]
    hard = results["hard-labels"]["bits_per_byte"]
    print(
        f"\ndemo teacher (8192-token byte-level BPE, {teacher['params'] / 1e6:.2f} M) -> a fresh "
        f"{results['hard-labels']['params'] / 1e6:.2f} M Llama with a {STUDENT_VOCAB}-token SentencePiece-style BPE; "
        f"{steps} steps x {BATCH_SIZE} sequences of {MAX_LENGTH} student tokens; held-out: "
        f"{report['data']['sequences']} blocks, teacher {teacher['bits_per_byte']:.3f} bits/byte on its own tokens"
    )
    print(
        "| variant | wall s | bits/byte | vs hard labels | teacher bits/byte, same bytes | retention (bits/byte) "
        "| 1:1 share | agreement at 1:1 | KL at 1:1 (nats) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in students:
        m = results[name.replace(" + ", "-").replace(" ", "-")]
        r = m["teacher_bits_per_byte"] / m["bits_per_byte"]
        print(
            f"| {name} | {seconds[name]:.0f} | {m['bits_per_byte']:.3f} | {m['bits_per_byte'] / hard:.3f}x | "
            f"{m['teacher_bits_per_byte']:.3f} | {100 * r:.1f}% | {m['aligned_share']:.3f} | "
            f"{m['agreement']:.3f} | {m['kl_to_teacher']:.3f} |"
        )


if __name__ == "__main__":
    main()
