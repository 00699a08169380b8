"""Peak resident memory of whole `distill train` steps: the fused loss on and off, or gradient checkpointing on and
off (fused loss on).

Models: `--pair small` (default) a Llama teacher 4×256 and student 2×128 with a `--vocab` (32768) vocabulary;
`--pair smollm` the SmolLM2-135M-shaped teacher and its 15-layer pruned student of benchmarks/peer_trl.py (V=49152).
8 sequences × 1024 tokens per optimizer step, float32 on CPU. Each configuration runs `distill train` in its own
process; the peak is that process's maximum resident set (ru_maxrss of the child), so it includes the models, the
optimizer and the activations, not only the loss.

    python benchmarks/train_step_memory.py [--steps 2] [--vocab 32768] [--tokens 1024] [--batch 8]
    python benchmarks/train_step_memory.py --pair smollm --compare checkpointing --steps 1
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def word_level_tokenizer(vocab_size: int):
    """A tokenizer with exactly `vocab_size` tokens; the benchmark feeds pre-tokenized ids anyway."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def build_models(folder: Path, vocab_size: int, tokens: int) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = word_level_tokenizer(vocab_size)
    paths = []
    for name, hidden, layers in (("teacher", 256, 4), ("student", 128, 2)):
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=tokens,
        )
        torch.manual_seed(len(name))
        path = folder / name
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def write_data(folder: Path, vocab_size: int, tokens: int, rows: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    train = folder / "train.jsonl"
    rows_text = [json.dumps({"input_ids": [rng.randrange(3, vocab_size) for _ in range(tokens)]}) for _ in range(rows)]
    train.write_text("".join(line + "\n" for line in rows_text))
    # A tiny eval set, so the end-of-run evaluation does not decide the peak.
    held_out = folder / "eval.jsonl"
    held_out.write_text(json.dumps({"input_ids": [rng.randrange(3, vocab_size) for _ in range(16)]}) + "\n")
    return train, held_out


def peak_of_run(recipe: Path, overrides: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, training tokens/s) of one `distill train` in a fresh process."""
    probe = (
        "import resource, subprocess, sys; "
        f"r = subprocess.run([sys.executable, '-m', 'distill', 'train', {str(recipe)!r}, '--quiet', *{overrides!r}]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    peak_mib = int(out.stdout.strip().splitlines()[-1]) / 1024
    run_dir = Path(yaml.safe_load(recipe.read_text())["output"]["dir"])
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in events if e.get("event") == "train"]
    return peak_mib, rates[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pair", choices=["small", "smollm"], default="small", help="models (see the docstring)")
    parser.add_argument(
        "--compare",
        choices=["fused", "checkpointing"],
        default="fused",
        help="objective.fused off/on, or training.gradient_checkpointing off/on with the fused loss",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.pair == "smollm":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from peer_trl import PAIRS, build_pair

            args.vocab = PAIRS["smollm"]["vocab_size"]
            teacher, student = build_pair(folder, "smollm", print)
        else:
            teacher, student = build_models(folder, args.vocab, args.tokens)
        train, held_out = write_data(folder, args.vocab, args.tokens, rows=args.batch * args.steps)
        key = "objective.fused" if args.compare == "fused" else "training.gradient_checkpointing"
        results = {}
        for on in (False, True):
            recipe = folder / f"recipe-{on}.yaml"
            content = {
                "teacher": {"path": str(teacher), "dtype": "float32"},
                "student": {"path": str(student)},
                "data": {"train": str(train), "eval": str(held_out), "max_length": args.tokens},
                "objective": {"divergence": "forward_kl", "ce_weight": 0.1},
                "training": {"steps": args.steps, "batch_size": args.batch, "save_every": 1000, "log_every": 1},
                "report": {"enabled": False},
                "output": {"dir": str(folder / f"run-{on}")},
            }
            recipe.write_text(yaml.safe_dump(content))
            results[on] = peak_of_run(recipe, [f"{key}={str(on).lower()}"])

    off, on = results[False], results[True]
    print(
        f"distill train, {args.pair} pair, V={args.vocab}, {args.batch} x {args.tokens} tokens per step, "
        f"{args.steps} steps, fp32 CPU"
    )
    print(f"{key:>31} | {'peak RSS MiB':>12} | {'tokens/s':>9}")
    print(f"{'false':>31} | {off[0]:12.0f} | {off[1]:9.0f}")
    print(f"{'true':>31} | {on[0]:12.0f} | {on[1]:9.0f}")
    print(f"peak memory false/true: {off[0] / on[0]:.2f}x; tokens/s true/false: {on[1] / off[1]:.2f}")


if __name__ == "__main__":
    main()
