"""Two domain teachers distilled into one student (recipe key `teachers`) vs a student distilled from either alone.

Two tiny teachers are trained here, in a few seconds each, on different text: `code` on the Python standard library's
source (the demo's corpus), `prose` on the licence texts in /usr/share/common-licenses (no network). One byte-level
BPE tokenizer is trained on both. Three students start from the same random weights and train the same steps on the
same rows (code and prose mixed, every row naming its domain's teacher): `both` (teachers: {code, prose}, each row
scored by its own teacher), `code only` and `prose only` (every row scored by that one teacher). Each student is
evaluated on held-out rows of each domain against that domain's teacher: KL(teacher ‖ student) and agreement.
Prints one table with each row's ratio to the `both` row, measured in this run.

    python benchmarks/two_teachers.py [--steps 60] [--teacher-steps 150] [--out runs/two-teachers]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch


def _chunks(texts: list[str], words: int) -> list[str]:
    """Pieces of about `words` whitespace-separated words (code keeps its lines: cut at line ends)."""
    out = []
    for text in texts:
        lines, piece = text.splitlines(keepends=True), []
        for line in lines:
            piece.append(line)
            if sum(len(x.split()) for x in piece) >= words:
                out.append("".join(piece).strip())
                piece = []
    return [x for x in out if len(x) > 40]


def corpora(per_domain: int, seed: int = 0) -> dict[str, list[str]]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code_files = sorted(stdlib.glob("*.py"))[:80]
    code = _chunks([p.read_text(encoding="utf-8", errors="ignore") for p in code_files], 40)
    licences = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file())
    prose = _chunks([p.read_text(encoding="utf-8", errors="ignore") for p in licences], 40)
    rng = random.Random(seed)
    rng.shuffle(code)
    rng.shuffle(prose)
    return {"code": code[:per_domain], "prose": prose[:per_domain]}


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def llama(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def train_teacher(texts: list[str], tokenizer, folder: Path, steps: int, seed: int, max_length: int) -> float:
    """A tiny causal LM trained with plain cross-entropy on `texts`; returns seconds."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama(len(tokenizer), 96, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    rng = random.Random(seed)
    start = time.perf_counter()
    for _ in range(steps):
        batch = rng.sample(encoded, 16)
        width = max(len(x) for x in batch)
        ids = torch.tensor([x + [0] * (width - len(x)) for x in batch])  # (B, T)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])  # (B, T)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return time.perf_counter() - start


def evaluate(student_dir: Path, teacher_dir: Path, rows_file: Path, tokenizer, max_length: int) -> dict:
    from transformers import AutoModelForCausalLM

    from distill.data import build_examples, iter_batches
    from distill.report.quality import evaluate_batches

    examples, _ = build_examples(rows_file, tokenizer, max_length, ignore_keys=("teacher",))
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    return evaluate_batches(student, teacher, iter_batches(examples, 8, 0), len(tokenizer), torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each student")
    parser.add_argument("--teacher-steps", type=int, default=150, help="cross-entropy steps of each teacher")
    parser.add_argument("--rows", type=int, default=240, help="rows per domain (a sixth held out)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default="runs/two-teachers")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from distill.config import recipe_from_dict
    from distill.train.loop import train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    texts = corpora(args.rows)
    tokenizer = train_tokenizer(texts["code"] + texts["prose"], 1024)
    held = args.rows // 6
    files = {}
    for split, part in (("train", slice(held, None)), ("eval", slice(None, held))):
        rows = [{"text": t, "teacher": d} for d in texts for t in texts[d][part]]
        random.Random(1).shuffle(rows)
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for d in texts:  # each domain's eval rows alone, to score against its own teacher
            if split == "eval":
                path = out / f"eval-{d}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["teacher"] == d), encoding="utf-8")
    teachers = {}
    for seed, d in enumerate(texts):
        teachers[d] = out / f"teacher-{d}"
        seconds = train_teacher(texts[d][held:], tokenizer, teachers[d], args.teacher_steps, seed, args.max_length)
        print(f"teacher {d}: {args.teacher_steps} steps in {seconds:.1f} s")

    base = {
        "student": {"config": llama(len(tokenizer), 48, 2).to_dict(), "tokenizer": str(teachers["code"])},
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": args.max_length},
        "objective": {"divergence": "forward_kl"},
        "training": {"steps": args.steps, "batch_size": 8, "lr": 3e-3, "seed": 0, "save_every": 10**6},
        "report": {"enabled": False},
    }
    runs = {
        "both": {"teachers": {d: {"path": str(p)} for d, p in teachers.items()}},
        "code only": {"teacher": {"path": str(teachers["code"])}, "data": {**base["data"], "ignore_keys": ["teacher"]}},
        "prose only": {
            "teacher": {"path": str(teachers["prose"])},
            "data": {**base["data"], "ignore_keys": ["teacher"]},
        },
    }
    results = {}
    for name, change in runs.items():
        folder = out / name.replace(" ", "-")
        recipe = {**base, **change, "output": {"dir": str(folder)}}
        start = time.perf_counter()
        train(recipe_from_dict(recipe), log=lambda _: None, show_progress=False)
        seconds = time.perf_counter() - start
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        scores = {
            d: evaluate(folder / "student", teachers[d], out / f"eval-{d}.jsonl", tokenizer, args.max_length)
            for d in teachers
        }
        results[name] = (seconds, scores)
        print(f"trained {name}: {seconds:.1f} s")

    both = results["both"][1]
    print()
    print(f"{args.steps} steps each, batch 8, max_length {args.max_length}; one thread (machine shared with others)")
    print(
        "| student | KL to code teacher (code rows) | x both | KL to prose teacher (prose rows) | x both "
        "| agreement code | agreement prose | train s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (seconds, scores) in results.items():
        kc, kp = scores["code"]["kl_to_teacher"], scores["prose"]["kl_to_teacher"]
        print(
            f"| {name} | {kc:.3f} | {kc / both['code']['kl_to_teacher']:.2f} | {kp:.3f} | "
            f"{kp / both['prose']['kl_to_teacher']:.2f} | {scores['code']['agreement']:.3f} | "
            f"{scores['prose']['agreement']:.3f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
