"""Train the teacher that `distill demo` ships: a small Llama on the Python standard library's source code.

    python scripts/train_demo_teacher.py prepare --work runs/demo-teacher      # corpus + tokenizer + recipe
    python scripts/train_demo_teacher.py train   --work runs/demo-teacher --steps 5000 --threads 1 \
        --mixed-precision bf16                                                  # the shipped teacher (TRAINING.md)
    python scripts/train_demo_teacher.py export  --work runs/demo-teacher      # 16-bit copy into the package
    python scripts/train_demo_teacher.py evaluate --work runs/demo-teacher     # held-out metrics of that copy

`export --source runs/demo-teacher/run/checkpoints/step-N` exports a checkpoint instead of the final model.
Without --mixed-precision training is fp32 (the first teacher's recipe: `--steps 600`); `--resume` continues a
stopped run with the same flags (the loop refuses a changed step count: it would change the lr schedule).

Everything comes from the machine's own Python: the corpus is `distill.demo.corpus` (held-out modules never
trained on), the tokenizer is byte-level BPE trained here on the training files only, and training is the
project's own loop (`distill.train.loop.train`) on hard labels (there is no teacher for the teacher).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from distill.demo import corpus

PACKAGE_TEACHER = Path(__file__).resolve().parents[1] / "src" / "distill" / "demo" / "teacher"
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]

MODEL = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}


def train_tokenizer(train_file: Path, out: Path) -> int:
    """Byte-level BPE on the training rows only; saved as a transformers fast tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with train_file.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.save_pretrained(out)
    return len(fast)


def recipe(work: Path, steps: int, options: dict | None = None) -> dict:
    """The training recipe; `options` override the first teacher's settings (lr, warm-up, batch, precision)."""
    o = {"lr": 2.0e-3, "warmup": None, "batch_size": 8, "mixed_precision": None, "eval_every": 250, **(options or {})}
    warmup = o["warmup"] if o["warmup"] is not None else min(50, steps // 10)
    training = {
        "steps": steps,
        "batch_size": o["batch_size"],
        "lr": o["lr"],
        "weight_decay": 0.1,
        "warmup_steps": warmup,
        "schedule": "cosine",
        "min_lr_ratio": 0.05,
        "device": "cpu",
        "save_every": 50,
        "eval_every": o["eval_every"],
        "eval_batches": 8,
        "log_every": 25,
        "seed": 0,
    }
    if o["mixed_precision"]:
        # bf16 autocast on CPU: about 2.2x the fp32 tokens/s on a CPU with AMX/AVX512-BF16 (TRAINING.md).
        training["mixed_precision"] = o["mixed_precision"]
    return {
        "student": {"config": MODEL, "tokenizer": str(work / "tokenizer")},
        "data": {
            "train": str(work / "train.jsonl"),
            "eval": str(work / "eval.jsonl"),
            "max_length": 256,
            "packing": True,
        },
        "objective": {"kd_weight": 0.0, "ce_weight": 1.0, "fused": True},
        "training": training,
        "report": {"enabled": False},
        "output": {"dir": str(work / "run")},
    }


def prepare(work: Path) -> None:
    train_files, held_out = corpus.list_files()
    work.mkdir(parents=True, exist_ok=True)
    rows = corpus.write_train(work / "train.jsonl", train_files)
    eval_rows = corpus.write_eval(work / "eval.jsonl", held_out)
    completion = corpus.write_completion(work / "completion.jsonl", held_out)
    start = time.perf_counter()
    vocab = train_tokenizer(work / "train.jsonl", work / "tokenizer")
    info = {
        "python": sys.version.split()[0],
        "stdlib": str(corpus.stdlib_root()),
        "train_files": len(train_files),
        "train_rows": rows,
        "train_chars": sum(len(corpus.read_source(f) or "") for f in train_files),
        "held_out_files": held_out,
        "eval_rows": eval_rows,
        "completion_rows": completion,
        "vocab_size": vocab,
        "tokenizer_s": round(time.perf_counter() - start, 1),
    }
    (work / "corpus.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


def train(work: Path, steps: int, resume: bool, threads: int | None, options: dict | None = None) -> None:
    from distill.config import recipe_from_dict
    from distill.train.loop import train as run_training

    if threads:
        # On a shared 2-core machine one thread was faster than two (7 s vs 10 s per 4096-token step).
        torch.set_num_threads(threads)
    result = run_training(recipe_from_dict(recipe(work, steps, options)), resume=resume, show_progress=False)
    print(json.dumps(result.summary, indent=2, default=str))


def _load_trained(work: Path, source: Path, dtype: torch.dtype):
    """The model of a run's student folder, or of a checkpoint folder (model.safetensors + state.json)."""
    from transformers import AutoModelForCausalLM

    from distill.models import new_model_from_config

    if not (source / "state.json").exists():
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    from safetensors.torch import load_file

    # A checkpoint holds the trainable weights of the training loss module, whose student is `student`.
    state = {k.removeprefix("student."): v for k, v in load_file(str(source / "model.safetensors")).items()}
    model = new_model_from_config(MODEL, VOCAB_SIZE, torch.float32, seed=0)
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def export(work: Path, source: Path | None, dtype: str, dest: Path = PACKAGE_TEACHER) -> None:
    """Write the trained model in 16 bits, its tokenizer and generation config into the package."""
    from transformers import AutoTokenizer, GenerationConfig

    source = source or work / "run" / "student"
    model = _load_trained(work, source, getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(**ids)
    for key, value in ids.items():
        setattr(model.config, key, value)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    for f in dest.iterdir():
        f.chmod(0o644)  # save_pretrained writes the weights owner-only; a package is read by everyone
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    print(f"exported {source} as {dtype} to {dest} ({size / 1e6:.1f} MB)")


def evaluate(work: Path, teacher: Path, completion_rows: int) -> None:
    """Held-out metrics of the exported teacher: every held-out block, and line completion on a spread of rows."""
    from distill.demo.run import _spread, line_completion
    from distill.models import load_model, load_tokenizer
    from distill.report.evaluate import evaluate_models

    torch.set_num_threads(1)  # batch-1 decoding of a tiny model: a second thread only adds waiting
    start = time.perf_counter()
    report = evaluate_models(
        str(teacher),
        {},
        str(work / "eval.jsonl"),
        None,
        max_length=256,
        speed=False,
        device="cpu",
        dtype="float32",
        show_progress=False,
        log=lambda _: None,
    )
    metrics = {
        k: report["models"]["teacher"][k]
        for k in ("cross_entropy", "perplexity", "bits_per_byte", "top1_accuracy", "tokens", "params")
    }
    rows = [json.loads(line) for line in (work / "completion.jsonl").read_text().splitlines()]
    rows = _spread(rows, completion_rows)
    model = load_model(str(teacher), "teacher", torch.float32).eval()
    completion = line_completion(model, load_tokenizer(str(teacher), "teacher"), rows)
    metrics.update(
        eval_sequences=report["data"]["sequences"],
        line_exact_match=completion["exact_match"],
        line_completion_rows=len(rows),
        samples=completion["generation_samples"],
        time_s=round(time.perf_counter() - start, 1),
    )
    (work / "heldout-metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "train", "export", "evaluate", "all"])
    parser.add_argument("--work", type=Path, default=Path("runs/demo-teacher"))
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--lr", type=float, default=2.0e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: min(50, steps / 10))")
    parser.add_argument("--batch-size", type=int, default=8, help="256-token sequences per step (default 8)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], help="autocast (default: fp32 on CPU)")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between held-out evaluations")
    parser.add_argument("--source", type=Path, help="export this model folder instead of the final student")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--completion-rows", type=int, default=200, help="line-completion samples to evaluate")
    parser.add_argument("--dest", type=Path, default=PACKAGE_TEACHER, help="where export writes the teacher")
    args = parser.parse_args()
    print(f"{platform.platform()}; {platform.processor() or platform.machine()}; torch {torch.__version__}")
    if args.stage in ("prepare", "all"):
        prepare(args.work)
    if args.stage in ("train", "all"):
        options = {"lr": args.lr, "warmup": args.warmup, "batch_size": args.batch_size}
        options.update(mixed_precision=args.mixed_precision, eval_every=args.eval_every)
        train(args.work, args.steps, args.resume, args.threads, options)
    if args.stage in ("export", "all"):
        export(args.work, args.source, args.dtype, args.dest)
    if args.stage in ("evaluate", "all"):
        evaluate(args.work, args.dest, args.completion_rows)


if __name__ == "__main__":
    main()
