"""distill train vs TRL's GKDTrainer on the same teacher, student and data, each tool a whole separate process.

What both runs share, so the two tools do the same work:
  * models: random weights from real configurations (no hub). `smollm`: a SmolLM2-135M-shaped Llama teacher (30
    layers, hidden 576, MLP 1536, 9/3 heads, V=49152, tied) and its student pruned to 15 layers by `distill student`;
    `qwen`: a Qwen2.5-0.5B-shaped pair (24 -> 12 layers, hidden 896, MLP 4864, 14/2 heads, V=151936, tied); `tiny`:
    a 4-layer Llama teacher (V=2048) and a 2-layer pruned student, for the 50-step whole-process job. Both tools load
    the same saved folders, in float32.
  * tokenizer: a word-level tokenizer with exactly V entries, so len(tokenizer) == the models' vocabulary and both
    tools take the softmax over all V columns (a smaller BPE would make distill ignore the padding rows TRL computes).
  * data: `--batch` rows of random token ids (lengths spread from --tokens/2 to --tokens), the same rows every step:
    one epoch is one step in both tools, so every step pads to the same width and the per-step losses of the two
    tools can be compared (they start equal and track each other: same weights, same batch, same update).
  * objective: forward KL(teacher || student) at temperature 1 on every next-token position. TRL: GKDTrainer with
    lmbda=0 (never on-policy), beta=0 (its generalized_jsd_loss is then F.kl_div(student_logp, teacher_logp),
    i.e. forward KL), seq_kd off. distill: objective.divergence=forward_kl, fused loss (its default).
  * optimization: AdamW, lr 1e-4 constant, betas (0.9, 0.95), eps 1e-8, no weight decay, gradient clipping at 1.0,
    batch 8, no accumulation, students in fp32 (TRL's own defaults bf16=True and gradient_checkpointing=True are
    switched off). The teacher: distill's `teacher.dtype` (--teacher-dtype, default auto = bfloat16 on a CPU with
    native bf16, AMX/AVX512-BF16) and TRL's teacher loaded in the dtype that resolves to, so both teachers do the
    same work; --trl-fp32-teacher adds TRL with a float32 teacher (what this benchmark ran before auto existed).
  * bookkeeping: each tool evaluates once at the last step on the same rows (distill always does; TRL is given the
    rows as eval_dataset) and saves one checkpoint with optimizer state plus the final model. distill's report is
    off except in the `tiny` job, which runs distill once with its report and once without.
  * threads: OMP_NUM_THREADS = --threads (default 2) for both.

Measured per process: whole wall time; start-up = launch until the first training step begins; per-step time =
median of step-end to step-end intervals after --warmup steps; tokens/s = real (unpadded) tokens per step / that
median; peak RSS = the kernel's high-water mark of the process (ru_maxrss from wait4) and, as a check, the largest
sum of RSS over the process tree polled every 50 ms. Import time is measured in separate interpreters.

Install TRL for this benchmark only (never a distill dependency), in its own venv outside the repo:
    python -m venv /work/venv-trl
    /work/venv-trl/bin/pip install torch==2.13.0      # first, the CPU build; a bare `torch` pulls a CUDA build
    /work/venv-trl/bin/pip install -e .                # distill, with the same transformers
    /work/venv-trl/bin/pip install trl==1.16.0         # then check `pip list | grep torch` still says 2.13.0+cpu

Run (distill runs under this interpreter, TRL under --trl-python):
    python benchmarks/peer_trl.py --quick                      # smoke test, seconds
    python benchmarks/peer_trl.py --pair tiny                  # 50 steps, whole process incl. distill's report
    python benchmarks/peer_trl.py --pair smollm --steps 8      # the 135M pair
    python benchmarks/peer_trl.py --pair qwen --steps 4        # the 152k vocabulary
    python benchmarks/peer_trl.py --pair smollm --profile      # where a step's time goes, both tools, in-process

TRL 1.16's DistillationTrainer is on-policy only (the student generates every completion from a `prompt` column),
so it does not apply to this fixed-data comparison; GKDTrainer with lmbda=0 is TRL's off-policy logit distillation.
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
DEFAULT_TRL_PYTHON = os.environ.get("PEER_TRL_PYTHON", "/work/venv-trl/bin/python")

# Real configurations (from the models' config.json), random weights.
PAIRS = {
    "smollm": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "student_layers": 15,
        "steps": 8,
    },
    "qwen": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "student_layers": 12,
        "steps": 4,
    },
    "tiny": {
        "model_type": "llama",
        "vocab_size": 2048,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "student_layers": 2,
        "steps": 50,
    },
}
LR = 1e-4
BETAS = (0.9, 0.95)


# ---------------------------------------------------------------- set-up (parent process)


def build_pair(folder: Path, pair: str, log) -> tuple[Path, Path]:
    """Save the random teacher and its tokenizer, then prune the student with `distill student` (not timed)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = {k: v for k, v in PAIRS[pair].items() if k not in ("student_layers", "steps")}
    vocab_size = spec["vocab_size"]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<pad>",  # named, or a Qwen2 folder loads with Qwen2Tokenizer's own <|endoftext|> added: V + 1
    )
    config = AutoConfig.for_model(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    teacher_dir, student_dir = folder / "teacher", folder / "student"
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    layers = str(PAIRS[pair]["student_layers"])
    log(f"pruning the {pair} teacher to {layers} layers with `distill student`")
    run = subprocess.run(
        [sys.executable, "-m", "distill", "student", str(teacher_dir), "--out", str(student_dir), "--layers", layers],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"distill student failed:\n{run.stderr[-3000:]}")
    return teacher_dir, student_dir


def write_rows(folder: Path, vocab_size: int, tokens: int, batch: int) -> tuple[Path, int]:
    """`batch` rows of random ids, lengths spread from tokens/2 to tokens (so padding exists, the same in both)."""
    import random

    rng = random.Random(0)
    lengths = [tokens - (i * (tokens // 2)) // max(batch - 1, 1) for i in range(batch)]
    rows = [{"input_ids": [rng.randrange(3, vocab_size) for _ in range(n)]} for n in lengths]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, sum(lengths)


def distill_recipe(folder: Path, name: str, teacher: Path, student: Path, rows: Path, args, report: bool) -> Path:
    import yaml

    recipe = {
        "teacher": {"path": str(teacher), "dtype": args.distill_teacher_dtype},
        "student": {"path": str(student)},
        "data": {"train": str(rows), "eval": str(rows), "max_length": args.tokens},
        "objective": {"divergence": "forward_kl", "temperature": 1.0, "ce_weight": 0.0},
        "training": {
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": LR,
            "betas": list(BETAS),
            "weight_decay": 0.0,
            "schedule": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "mixed_precision": "no",
            "device": "cpu",
            "log_every": 1,
            "save_every": args.steps,
            "eval_every": args.steps,
            "eval_batches": 1,
        },
        "report": {"enabled": report},
        "output": {"dir": str(folder / name)},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------- measuring a whole process


def measure_process(command: list[str], env: dict, log_path: Path, first_step_time) -> dict:
    """Run `command` to its end; wall time, peak RSS (kernel high-water mark and polled tree sum), start-up.

    `first_step_time()` returns the absolute time the first training step began, or None while unknown."""
    import psutil

    start = time.time()
    with log_path.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    handle = psutil.Process(proc.pid)
    tree_peak, first = 0, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            members = [handle, *handle.children(recursive=True)]
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in members))
        except psutil.Error:
            pass  # a member exited between listing and reading
        if first is None:
            first = first_step_time()
        time.sleep(0.05)
    wall = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
    first = first or first_step_time()
    return {
        "wall_s": wall,
        # CPU seconds the process used (user + system): on a machine shared with other jobs, the work done, where
        # wall time also counts the waiting for a core.
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "startup_s": (first - start) if first else float("nan"),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "tree_rss_mib": tree_peak / 2**20,
    }


def distill_first_step(metrics: Path):
    """Begin of distill's first step: when metrics.jsonl got its step-1 line, less that step's elapsed time."""

    def probe():
        try:
            lines = metrics.read_text().splitlines()
            stat = metrics.stat()
        except OSError:
            return None
        events = [json.loads(line) for line in lines if line.strip()]
        train = [e for e in events if e.get("event") == "train"]
        if len(train) != 1:  # with more lines the mtime is a later step's; the caller polls often enough
            return None
        return stat.st_mtime - train[0]["elapsed_s"]

    return probe


def distill_steps(metrics: Path) -> tuple[list[float], list[float]]:
    """(step durations, losses) from metrics.jsonl: elapsed_s runs from the loop's start, one line per step."""
    events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [e for e in events if e.get("event") == "train"]
    ends = [e["elapsed_s"] for e in train]
    return [b - a for a, b in zip([0.0, *ends], ends, strict=False)], [e["loss"] for e in train]


def run_distill(recipe: Path, args, tokens_per_step: int, env: dict, overrides: tuple[str, ...] = ()) -> dict:
    import yaml

    out = Path(yaml.safe_load(recipe.read_text())["output"]["dir"])
    metrics = out / "metrics.jsonl"
    command = [sys.executable, "-m", "distill", "train", str(recipe), "--quiet", *overrides]
    result = measure_process(command, env, recipe.with_suffix(".log"), distill_first_step(metrics))
    steps, losses = distill_steps(metrics)
    return {**result, **step_stats(steps, args.warmup, tokens_per_step), "losses": losses}


def run_trl(
    folder: Path,
    teacher: Path,
    student: Path,
    rows: Path,
    args,
    tokens_per_step: int,
    env: dict,
    tag: str = "",
    teacher_dtype: str = "float32",
) -> dict:
    spec = {
        "teacher": str(teacher),
        "student": str(student),
        "rows": str(rows),
        "steps": args.steps,
        "batch": args.batch,
        "tokens": args.tokens,
        "out": str(folder / f"trl{tag}"),
        "timeline": str(folder / f"trl{tag}-timeline.jsonl"),
        "teacher_dtype": teacher_dtype,
    }
    spec_path = folder / f"trl{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    timeline = Path(spec["timeline"])

    def events():
        try:
            return [json.loads(line) for line in timeline.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError):
            return []

    def first_step():
        begins = [e["t"] for e in events() if e["event"] == "step_begin"]
        return begins[0] if begins else None

    command = [args.trl_python, str(HERE), "--trl-worker", str(spec_path)]
    result = measure_process(command, env, folder / f"trl{tag}.log", first_step)
    timeline_events = events()
    begin = next(e["t"] for e in timeline_events if e["event"] == "step_begin")
    ends = [e["t"] for e in timeline_events if e["event"] == "step_end"]
    steps = [b - a for a, b in zip([begin, *ends], ends, strict=False)]
    losses = [e["loss"] for e in timeline_events if e["event"] == "loss"]
    return {**result, **step_stats(steps, args.warmup, tokens_per_step), "losses": losses}


def teacher_dtypes(requested: str) -> tuple[str, str]:
    """(distill's teacher.dtype, TRL's teacher dtype): TRL gets the dtype distill's value resolves to on this
    machine (`auto`: bfloat16 on a CPU with native bf16), so both tools' teachers do the same work."""
    import torch

    from distill.models import teacher_dtype

    resolved = teacher_dtype(requested, torch.device("cpu"))
    return requested, str(resolved).removeprefix("torch.")


def parse_variants(variants: list[str] | None) -> list[tuple[str, tuple[str, ...]]]:
    """--variant "LABEL:key=value,key=value" -> (LABEL, overrides) for extra distill runs (other settings)."""
    parsed = []
    for text in variants or []:
        label, _, overrides = text.partition(":")
        parsed.append((label.strip(), tuple(o.strip() for o in overrides.split(",") if o.strip())))
    return parsed


def median_run(results: list[dict]) -> dict:
    """Each number the median over the rounds; the losses of the first round."""
    merged = {key: statistics.median(r[key] for r in results) for key in results[0] if key != "losses"}
    return {**merged, "losses": results[0]["losses"], "rounds": len(results)}


def step_stats(steps: list[float], warmup: int, tokens_per_step: int) -> dict:
    timed = steps[warmup:] or steps
    median = statistics.median(timed)
    return {"step_s": median, "tokens_per_s": tokens_per_step / median, "steps_timed": len(timed)}


def import_time(python: str, statement: str, env: dict, repeats: int = 3) -> float:
    """Median seconds of `statement` in a fresh interpreter (page cache warm after the first)."""
    probe = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    times = []
    for _ in range(repeats):
        out = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:  # e.g. a module mid-edit in a shared working tree: say so, keep the table
            print(f"import probe failed under {python}: {out.stderr.strip().splitlines()[-1:]}")
            return float("nan")
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


# ---------------------------------------------------------------- the TRL side (runs under --trl-python)


def trl_worker(spec_path: str) -> None:
    """GKDTrainer (lmbda=0, beta=0: off-policy forward KL) on the spec's models and rows; a timeline of steps."""
    spec = json.loads(Path(spec_path).read_text())
    timeline = open(spec["timeline"], "a")  # noqa: SIM115 - kept open for the whole run

    def note(**event):
        timeline.write(json.dumps({**event, "t": time.time()}) + "\n")
        timeline.flush()

    note(event="start")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    note(event="imported")
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["teacher"])
    pad_id = tokenizer.pad_token_id

    def collate(examples):
        """Pad to the batch's longest row; labels = ids, -100 on padding (GKD shifts them itself)."""
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
        for row, e in enumerate(examples):
            ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[row, : len(e["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)  # (B, T)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            note(event="step_begin", step=state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            note(event="step_end", step=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                note(event="loss", step=state.global_step, loss=logs["loss"])

    steps = spec["steps"]
    config = GKDConfig(
        output_dir=spec["out"],
        lmbda=0.0,  # never sample from the student: the fixed rows only
        beta=0.0,  # generalized_jsd_loss at beta=0 is KL(teacher || student), distill's forward_kl
        seq_kd=False,
        max_length=spec["tokens"],
        per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,  # TRL's default is bf16 autocast; distill trains in fp32 here
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; distill's is off
        use_cpu=True,
        logging_steps=1,
        eval_strategy="steps",  # one evaluation at the end, like distill's final eval
        eval_steps=steps,
        save_strategy="steps",  # one checkpoint with optimizer state at the end, like distill's
        save_steps=steps,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        model_init_kwargs={"dtype": "float32"},
        teacher_model_init_kwargs={"dtype": spec.get("teacher_dtype", "float32")},
    )
    trainer = GKDTrainer(
        model=spec["student"],
        teacher_model=spec["teacher"],
        args=config,
        data_collator=collate,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "student"))
    note(event="done")


# ---------------------------------------------------------------- where a step's time goes (in-process)


def profile_worker(spec_path: str) -> None:
    """Median seconds of each phase of one training step, distill's fused path and TRL's GKD path, same batch."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDTrainer

    from distill.config import ObjectiveConfig
    from distill.data import build_examples, collate
    from distill.losses.fused import fused_loss_sums
    from distill.losses.heads import backbone_hidden_states, output_head
    from distill.losses.objective import Objective
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(spec["teacher"], "teacher", False)
    examples, _ = build_examples(spec["rows"], tokenizer, spec["tokens"], False, False, "train")
    batch = collate(examples[: spec["batch"]], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]  # (B, T-1)
    vocab = len(tokenizer)
    normalizer = float((labels != -100).sum())
    objective = Objective.from_config(ObjectiveConfig(divergence="forward_kl"))

    def load(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model

    teacher = load(spec["teacher"]).eval().requires_grad_(False)
    teacher_head = output_head(teacher)
    full_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (B, T): TRL shifts itself

    def distill_step(student, timed):
        """distill's fused path (distill.train.step.step_loss + StudentLoss._fused), phase by phase."""
        with torch.no_grad():
            t_hidden = timed("teacher forward", lambda: backbone_hidden_states(teacher, **inputs)[:, :-1])
        s_hidden = timed("student forward", lambda: backbone_hidden_states(student, **inputs)[:, :-1])
        return timed(
            "loss",
            lambda: fused_loss_sums(
                s_hidden,
                output_head(student),
                labels,
                objective=objective,
                teacher_hidden=t_hidden,
                teacher_head=teacher_head,
                vocab_size=vocab,
                normalizer=normalizer,
            )[0],
        )

    def trl_step(student, timed):
        """GKDTrainer.compute_loss, phase by phase: both models' full logits, then generalized_jsd_loss."""
        with torch.no_grad():
            t_logits = timed("teacher forward", lambda: teacher(**inputs).logits)  # (B, T, V)
        s_logits = timed("student forward", lambda: student(**inputs).logits)  # (B, T, V)
        return timed(
            "loss",
            lambda: GKDTrainer.generalized_jsd_loss(
                s_logits[:, :-1], t_logits[:, :-1], labels=full_labels[:, 1:], beta=0.0
            ),
        )

    results = {}
    for tool, forward in (("distill", distill_step), ("trl", trl_step)):
        torch.manual_seed(0)
        student = load(spec["student"]).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=LR, betas=BETAS, foreach=False)
        phases: dict[str, list[float]] = {}

        def timed(name, fn, phases=phases):
            start = time.perf_counter()
            value = fn()
            phases.setdefault(name, []).append(time.perf_counter() - start)
            return value

        for _ in range(spec["repeats"] + 1):  # the first step warms up allocator and kernels
            loss = forward(student, timed)
            timed("backward", loss.backward)
            timed("clip + AdamW", lambda s=student, opt=optimizer: _clip_and_step(s, opt))
        results[tool] = {name: statistics.median(ts[1:]) for name, ts in phases.items()}
        results[tool]["loss value"] = float(loss.detach())
        del student, optimizer, loss
    Path(spec["result"]).write_text(json.dumps(results))


def _clip_and_step(model, optimizer) -> None:
    import torch

    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_table(title: str, runs: dict[str, dict], reference: str) -> None:
    print(title)
    header = (
        f"{'tool':<24} | {'wall s':>7} | {'CPU s':>7} | {'start-up s':>10} | {'step s':>7} | {'tokens/s':>9} | "
        f"{'peak RSS MiB':>12} | {'tree RSS MiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, r in runs.items():
        print(
            f"{name:<24} | {r['wall_s']:7.2f} | {r['cpu_s']:7.2f} | {r['startup_s']:10.2f} | {r['step_s']:7.3f} | "
            f"{r['tokens_per_s']:9.0f} | {r['peak_rss_mib']:12.0f} | {r['tree_rss_mib']:12.0f}"
        )
    ref = runs[reference]
    for name, r in runs.items():
        if name == reference:
            continue
        print(
            f"{name} / {reference}: wall {ratio(r['wall_s'], ref['wall_s'])}, CPU {ratio(r['cpu_s'], ref['cpu_s'])}, "
            f"start-up {ratio(r['startup_s'], ref['startup_s'])}, step time {ratio(r['step_s'], ref['step_s'])}, "
            f"tokens/s {ratio(r['tokens_per_s'], ref['tokens_per_s'])}, "
            f"peak RSS {ratio(r['peak_rss_mib'], ref['peak_rss_mib'])}"
        )


def print_losses(runs: dict[str, dict]) -> None:
    """The same weights, batch and update: the tools' per-step losses must agree to float noise."""
    names = list(runs)
    shown = sorted({0, 1, len(runs[names[0]]["losses"]) - 1})
    print("per-step loss (same weights, same batch, same update: equal up to float noise)")
    for i in shown:
        values = ", ".join(f"{n} {runs[n]['losses'][i]:.5g}" for n in names if i < len(runs[n]["losses"]))
        print(f"  step {i + 1}: {values}")


def machine_line(threads: int) -> str:
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {threads} thread(s) per tool; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; distill at {commit.stdout.strip() or '?'} (working tree)"
    )


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f}"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", choices=sorted(PAIRS), default="smollm", help="model pair (default smollm)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 8 smollm, 4 qwen, 50 tiny)")
    parser.add_argument("--tokens", type=int, default=256, help="longest row; rows span tokens/2..tokens")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (and rows in the data)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both tools")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the step-time median")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each tool, taking turns; medians reported")
    parser.add_argument(
        "--variant",
        action="append",
        metavar="LABEL:key=value,...",
        help="also run distill with these recipe overrides, e.g. 'distill + checkpointing:training."
        "gradient_checkpointing=true' (repeatable)",
    )
    parser.add_argument(
        "--teacher-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="distill's teacher.dtype (default auto: bf16 on a CPU with native bf16); TRL's teacher gets the same",
    )
    parser.add_argument(
        "--trl-fp32-teacher", action="store_true", help="also run TRL with its teacher in float32 (an extra row)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny pair, 4 steps, 32 tokens")
    parser.add_argument("--report", action="store_true", help="also run distill with its report (on for tiny)")
    parser.add_argument("--profile", action="store_true", help="per-phase step times of both tools instead")
    parser.add_argument("--repeats", type=int, default=3, help="--profile: timed steps per tool")
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help="interpreter with trl installed")
    parser.add_argument("--keep", help="folder to keep models, recipes and logs in (default: a temporary one)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if args.profile_worker:
        return profile_worker(args.profile_worker)
    if args.quick:
        args.pair, args.steps, args.tokens = "tiny", args.steps or 4, 32
    args.steps = args.steps or PAIRS[args.pair]["steps"]
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup}")
    if not Path(args.trl_python).exists():
        parser.error(f"--trl-python {args.trl_python} does not exist; see the install lines in --help")
    args.distill_teacher_dtype, args.trl_teacher_dtype = teacher_dtypes(args.teacher_dtype)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        log = print
        teacher, student = build_pair(folder, args.pair, log)
        rows, tokens_per_step = write_rows(folder, PAIRS[args.pair]["vocab_size"], args.tokens, args.batch)
        print(machine_line(args.threads))
        if args.profile:
            return run_profile(folder, teacher, student, rows, args, env)

        print(f"{load_line()} (before)")
        rounds: dict[str, list[dict]] = {}
        for i in range(args.rounds):  # the tools take turns, so a change of load falls on both
            tag = f"-r{i + 1}" if args.rounds > 1 else ""
            if args.report or args.pair == "tiny":
                recipe = distill_recipe(folder, f"distill-report{tag}", teacher, student, rows, args, report=True)
                rounds.setdefault("distill (with report)", []).append(run_distill(recipe, args, tokens_per_step, env))
                print(f"{load_line()} (after distill with report{tag})")
            recipe = distill_recipe(folder, f"distill{tag}", teacher, student, rows, args, report=False)
            rounds.setdefault("distill", []).append(run_distill(recipe, args, tokens_per_step, env))
            print(f"{load_line()} (after distill{tag})")
            for j, (label, overrides) in enumerate(parse_variants(args.variant)):
                recipe = distill_recipe(folder, f"distill-v{j + 1}{tag}", teacher, student, rows, args, report=False)
                result = run_distill(recipe, args, tokens_per_step, env, overrides)
                rounds.setdefault(label, []).append(result)
                print(f"{load_line()} (after {label}{tag})")
            trl = run_trl(folder, teacher, student, rows, args, tokens_per_step, env, tag, args.trl_teacher_dtype)
            rounds.setdefault("TRL GKDTrainer", []).append(trl)
            print(f"{load_line()} (after TRL{tag})")
            if args.trl_fp32_teacher and args.trl_teacher_dtype != "float32":
                trl = run_trl(folder, teacher, student, rows, args, tokens_per_step, env, f"-fp32{tag}")
                rounds.setdefault("TRL, fp32 teacher", []).append(trl)
                print(f"{load_line()} (after TRL fp32 teacher{tag})")
        runs = {name: median_run(results) for name, results in rounds.items()}
        imports = {
            "distill": import_time(sys.executable, "import distill.train.loop", env),
            "TRL GKDTrainer": import_time(args.trl_python, "from trl.experimental.gkd import GKDTrainer", env),
        }

    print()
    print_table(
        f"{args.pair} pair, {args.batch} x up to {args.tokens} tokens ({tokens_per_step} real tokens) per step, "
        f"{args.steps} steps, CPU, students fp32, teachers {args.trl_teacher_dtype} (distill's teacher.dtype: "
        f"{args.distill_teacher_dtype}); step time = median of {runs['distill']['steps_timed']} steps after "
        f"{args.warmup} warm-up; {args.rounds} round(s), the tools taking turns (medians)",
        runs,
        reference="TRL GKDTrainer",
    )
    print(
        f"import time (fresh interpreter, median of 3): distill.train.loop {imports['distill']:.2f} s, "
        f"trl GKDTrainer {imports['TRL GKDTrainer']:.2f} s"
    )
    print_losses(runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "imports": imports}, indent=1))


def run_profile(folder: Path, teacher: Path, student: Path, rows: Path, args, env: dict) -> None:
    spec = {
        "teacher": str(teacher),
        "student": str(student),
        "rows": str(rows),
        "batch": args.batch,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "result": str(folder / "profile.json"),
    }
    spec_path = folder / "profile-spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"{load_line()} (before)")
    # One interpreter holds both tools (TRL's venv also has distill): same process, same batch, same threads.
    subprocess.run([args.trl_python, str(HERE), "--profile-worker", str(spec_path)], env=env, check=True, cwd=REPO)
    print(f"{load_line()} (after)")
    results = json.loads(Path(spec["result"]).read_text())
    phases = [name for name in results["distill"] if name != "loss value"]
    print(
        f"\n{args.pair} pair, one step's phases, {args.batch} x up to {args.tokens} tokens, fp32, "
        f"{args.threads} thread(s), median of {args.repeats} steps after one warm-up step"
    )
    print(f"{'phase':<18} | {'distill s':>9} | {'TRL s':>7} | {'distill/TRL':>11}")
    for name in [*phases, "total"]:
        if name == "total":
            d, t = (sum(results[tool][p] for p in phases) for tool in ("distill", "trl"))
        else:
            d, t = results["distill"][name], results["trl"][name]
        print(f"{name:<18} | {d:9.3f} | {t:7.3f} | {ratio(d, t):>11}")
    print(
        f"loss of the last timed step: distill {results['distill']['loss value']:.6g}, "
        f"TRL {results['trl']['loss value']:.6g} (the same weights, batch and updates)"
    )


if __name__ == "__main__":
    main()
