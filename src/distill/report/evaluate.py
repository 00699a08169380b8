"""Token-level quality metrics of a model against labels and against the teacher.

The same tokens count here as in training: outputs whose label is not -100 (prompt tokens and padding are
excluded by the data pipeline's loss mask).
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.data import Example, build_examples, collate, forward_inputs, pad_id_of, read_rows
from distill.errors import DistillError
from distill.losses.fused import DEFAULT_MEMORY_BUDGET_BYTES
from distill.losses.heads import OutputHead, backbone_hidden_states, output_head, verify_output_head
from distill.losses.token_metrics import LogitRows, chunked_token_metrics, dense_rows, head_rows
from distill.models import (
    DTYPES,
    check_vocabulary,
    compare_tokenizers,
    count_parameters,
    embedding_rows,
    has_tokenizer,
    load_config,
    load_model,
    load_tokenizer,
    max_context,
    resolve_dtype,
)
from distill.report.speed import SpeedSettings, measure_speed, model_device, size_on_disk
from distill.sampling import decode, eos_ids


@dataclass
class TokenSums:
    """Sums over counted tokens; divide by `tokens` for means. Kept as sums so batches and ranks add up."""

    tokens: float = 0.0
    cross_entropy: float = 0.0
    correct: float = 0.0
    kl_to_teacher: float = 0.0
    agreement: float = 0.0

    def add(self, other: TokenSums) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def means(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        return {
            "tokens": int(self.tokens),
            "cross_entropy": self.cross_entropy / n,
            "top1_accuracy": self.correct / n,
            "kl_to_teacher": self.kl_to_teacher / n,
            "agreement": self.agreement / n,
        }


def _sums(metrics: dict[str, torch.Tensor]) -> TokenSums:
    """TokenSums of `chunked_token_metrics` results."""
    sums = TokenSums(
        tokens=float(metrics["index"].numel()),
        cross_entropy=float(metrics["cross_entropy"].double().sum()),
        correct=float(metrics["correct"].sum()),
    )
    if "kl_to_teacher" in metrics:
        sums.kl_to_teacher = float(metrics["kl_to_teacher"].double().sum())
        sums.agreement = float(metrics["agreement"].sum())
    return sums


def token_sums(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None) -> TokenSums:
    """Metric sums of one batch from full logits. logits (B, T, V) aligned with labels (B, T); teacher_logits like
    logits. The dense counterpart of what `evaluate_batches` computes from hidden states."""
    vocab = logits.shape[-1]
    teacher = None if teacher_logits is None else dense_rows(teacher_logits.reshape(-1, vocab), vocab)
    metrics = chunked_token_metrics(
        dense_rows(logits.reshape(-1, vocab), vocab), labels.reshape(-1), teacher, vocab_size=vocab
    )
    return _sums(metrics)


def checked_head(model, input_ids: torch.Tensor) -> OutputHead | None:
    """The model's output head if applying it to the backbone's hidden states reproduces the model's own logits
    on `input_ids` (B, T) (a few tokens); None otherwise: that model is then evaluated on its full logits, which
    costs memory but is never wrong."""
    try:
        head = output_head(model)
        verify_output_head(model, input_ids.to(model_device(model)), head=head)
    except ValueError:
        return None
    return head


def logit_rows(model, head: OutputHead | None, inputs: dict[str, torch.Tensor], vocab_size: int) -> LogitRows:
    """One batch's logits of `model`, served a chunk of positions at a time, aligned with the (B, T-1) labels.

    With a head: from the backbone's hidden states (B, T, H), never forming (B, T, V). Without (an architecture the
    head cannot reproduce): from the forward's full logits. Rows are flat (B, T-1) positions; output position t of
    row b sits at b·T + t of the (B·T) flattening, i.e. at index + index // (T-1).
    """
    width = inputs["input_ids"].shape[1] - 1
    if head is not None:
        hidden = backbone_hidden_states(model, **inputs)  # (B, T, H)
        rows = head_rows(hidden.reshape(-1, hidden.shape[-1]), head, vocab_size)  # a view: no copy
    else:
        logits = model(**inputs).logits  # (B, T, V_model)
        rows = dense_rows(logits.reshape(-1, logits.shape[-1]), vocab_size)
    return lambda index: rows(index + torch.div(index, width, rounding_mode="floor"))


@torch.no_grad()
def evaluate_batches(
    student,
    teacher,
    batches: Iterable[dict[str, torch.Tensor]],
    vocab_size: int,
    device: torch.device,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> dict[str, float]:
    """Mean cross-entropy, top-1 accuracy and, with a teacher, KL(teacher ‖ student) and agreement.

    Logits are formed from hidden states a chunk of counted tokens at a time (`distill.losses.token_metrics`), both
    sides, so evaluation needs no more memory than `memory_budget_bytes` of float32 logits beyond the forwards.
    """
    total = TokenSums()
    heads = None
    for batch in batches:
        inputs = forward_inputs(batch, device)
        labels = batch["labels"].to(device).reshape(-1)  # (B·(T-1),)
        if heads is None:  # checked once per evaluation, on a few tokens of the first batch
            probe = inputs["input_ids"][:1, :16]
            heads = (checked_head(student, probe), checked_head(teacher, probe) if teacher is not None else None)
        student_rows = logit_rows(student, heads[0], inputs, vocab_size)
        teacher_rows = logit_rows(teacher, heads[1], inputs, vocab_size) if teacher is not None else None
        metrics = chunked_token_metrics(
            student_rows, labels, teacher_rows, vocab_size=vocab_size, memory_budget_bytes=memory_budget_bytes
        )
        total.add(_sums(metrics))
        del student_rows, teacher_rows, metrics  # this batch's hidden states (or fallback logits)
    means = total.means()
    if teacher is None:  # nothing to compare with: leave the teacher metrics out rather than report zeros
        del means["kl_to_teacher"], means["agreement"]
    return means


# ---------------------------------------------------------------- per-token metrics (the report's evaluation)


def token_metrics(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, chunk_tokens: int = 1024
) -> dict[str, torch.Tensor]:
    """Per-token metrics of the counted tokens (labels != -100), in row-major order of (B, T), from full logits.

    logits, teacher_logits (B, T, V) over the same vocabulary, on the same device (dtypes may differ; all
    arithmetic is float32); labels (B, T). Returns 1-D tensors of length N = number of counted tokens:
    `index` (flat position in B*T), `cross_entropy` (nats), `kl_to_teacher` (KL(teacher ‖ model), T=1, nats),
    `prediction`, `teacher_prediction` (argmax ids), `correct`, `agreement` (bool), `teacher_cross_entropy`.
    Float32 work happens `chunk_tokens` tokens at a time. The dense counterpart of the report's chunked path.
    """
    vocab = logits.shape[-1]
    return chunked_token_metrics(
        dense_rows(logits.reshape(-1, vocab), vocab),
        labels.reshape(-1),
        dense_rows(teacher_logits.reshape(-1, teacher_logits.shape[-1]), vocab),
        vocab_size=vocab,
        chunk_rows=chunk_tokens,
    )


@dataclass
class _Collected:
    """Per-token results of one model over the whole eval set (CPU tensors, concatenated at the end)."""

    parts: dict[str, list[torch.Tensor]]

    @classmethod
    def empty(cls) -> _Collected:
        names = ("example", "position", "cross_entropy", "kl_to_teacher", "prediction", "teacher_prediction")
        return cls({name: [] for name in (*names, "correct", "agreement")})

    def add(self, metrics: dict[str, torch.Tensor], first_example: int, width: int) -> None:
        index = metrics["index"].cpu()
        # Output position i predicts input token i+1: report the target token's own position.
        self.parts["example"].append(first_example + index // width)
        self.parts["position"].append(index % width + 1)
        for name in ("cross_entropy", "kl_to_teacher", "prediction", "teacher_prediction", "correct", "agreement"):
            self.parts[name].append(metrics[name].cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(values) if values else torch.zeros(0) for name, values in self.parts.items()}


def counted_bytes(examples: Sequence[Example], tokenizer) -> int:
    """UTF-8 bytes of the text of the counted target tokens (the denominator of bits per byte).

    Definition: for each maximal run of consecutive counted targets ids[a:b] of a sequence `ids`, the bytes it
    adds to the decoded document, len(utf8(decode(ids[:b]))) − len(utf8(decode(ids[:a]))), with special tokens
    (EOS, chat markers) decoded to nothing. Decoding the prefix rather than the run alone keeps byte-level BPE
    pieces of one character and SentencePiece's leading spaces whole. Summed over the eval set.
    """
    total = 0
    for example in examples:
        ids, mask = example.input_ids, example.loss_mask
        position = 1  # token 0 is never a target
        while position < len(ids):
            if not mask[position]:
                position += 1
                continue
            end = position
            while end < len(ids) and mask[end]:
                end += 1
            before = tokenizer.decode(ids[:position], skip_special_tokens=True).encode("utf-8")
            after = tokenizer.decode(ids[:end], skip_special_tokens=True).encode("utf-8")
            total += max(0, len(after) - len(before))
            position = end
    return total


def _own_metrics(
    index: torch.Tensor, cross_entropy: torch.Tensor, prediction: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The teacher's own per-token results, KL 0 and agreement 1 by construction. All (M,) over counted tokens."""
    return {
        "index": index,
        "cross_entropy": cross_entropy,
        "kl_to_teacher": torch.zeros_like(cross_entropy),
        "prediction": prediction,
        "teacher_prediction": prediction,
        "correct": prediction == targets,
        "agreement": torch.ones_like(prediction, dtype=torch.bool),
    }


@torch.no_grad()
def _score_pass(
    teacher,
    model,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    vocab_size: int,
    progress=None,
    description: str = "eval",
    teacher_metrics: bool = True,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> tuple[_Collected, _Collected]:
    """One pass over the eval set: per-token results of `model` against the teacher, and of the teacher itself.

    With `teacher_metrics`, the teacher's own results (KL 0, agreement 1 by construction) come from the same
    forward, so the teacher runs once per pass. `model` may be None (teacher only). Each model stays on its own
    device and dtype; logits are formed a chunk of counted tokens at a time from each model's hidden states
    (`distill.losses.token_metrics`), the teacher's chunk moving to the model's device for the comparison.
    """
    teacher_device = model_device(teacher)
    model_dev = model_device(model) if model is not None else teacher_device
    teacher_out, model_out = _Collected.empty(), _Collected.empty()
    task = progress.add_task(description, total=math.ceil(len(examples) / batch_size)) if progress else None
    probe = torch.tensor([examples[0].input_ids[:16]]) if examples else None
    teacher_head = checked_head(teacher, probe) if probe is not None else None
    model_head = checked_head(model, probe) if probe is not None and model is not None else None
    for first in range(0, len(examples), batch_size):
        batch = collate(examples[first : first + batch_size], pad_id)
        labels = batch["labels"]  # (B, T-1)
        width = labels.shape[1]
        flat_labels = labels.reshape(-1).to(model_dev)  # (B·(T-1),)
        teacher_rows = logit_rows(teacher, teacher_head, forward_inputs(batch, teacher_device), vocab_size)
        if model is not None:
            model_rows = logit_rows(model, model_head, forward_inputs(batch, model_dev), vocab_size)
            metrics = chunked_token_metrics(
                model_rows, flat_labels, teacher_rows, vocab_size=vocab_size, memory_budget_bytes=memory_budget_bytes
            )
            model_out.add(metrics, first, width)
            if teacher_metrics:
                targets = flat_labels.index_select(0, metrics["index"])  # (M,)
                own = _own_metrics(
                    metrics["index"], metrics["teacher_cross_entropy"], metrics["teacher_prediction"], targets
                )
                teacher_out.add(own, first, width)
        elif teacher_metrics:
            metrics = chunked_token_metrics(
                teacher_rows, flat_labels, vocab_size=vocab_size, memory_budget_bytes=memory_budget_bytes
            )
            targets = flat_labels.index_select(0, metrics["index"])  # (M,)
            own = _own_metrics(metrics["index"], metrics["cross_entropy"], metrics["prediction"], targets)
            teacher_out.add(own, first, width)
        teacher_rows = model_rows = None  # free this batch's hidden states (or fallback logits) before the next
        if progress:
            progress.advance(task)
    return teacher_out, model_out


def _percentile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return 0.0
    return float(np.percentile(values.double().numpy(), q))


def summarize(
    collected: _Collected, total_bytes: int, examples: Sequence[Example], tokenizer, worst: int = 10, context: int = 12
) -> dict:
    """Means over counted tokens, KL spread and the tokens where the model diverges most from the teacher."""
    t = collected.tensors()
    n = t["cross_entropy"].numel()
    denominator = max(n, 1)
    ce_sum = float(t["cross_entropy"].double().sum())
    cross_entropy = ce_sum / denominator
    kl = t["kl_to_teacher"]
    result = {
        "tokens": n,
        "cross_entropy": cross_entropy,
        "perplexity": math.exp(min(cross_entropy, 700.0)),
        "bits_per_byte": ce_sum / math.log(2) / total_bytes if total_bytes > 0 else None,
        "top1_accuracy": float(t["correct"].double().sum()) / denominator,
        "agreement": float(t["agreement"].double().sum()) / denominator,
        "kl_to_teacher": float(kl.double().sum()) / denominator,
        "kl_to_teacher_percentiles": {f"p{q}": _percentile(kl, q) for q in (50, 90, 99)},
        "kl_to_teacher_max": float(kl.max()) if n else 0.0,
    }
    rows = []
    if n and float(kl.max()) > 0.0:
        top = torch.topk(kl, min(worst, n))
        for value, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            example, position = int(t["example"][i]), int(t["position"][i])
            ids = examples[example].input_ids
            rows.append(
                {
                    "kl": value,
                    "example": example,
                    "position": position,
                    "context": tokenizer.decode(ids[max(0, position - context) : position]),
                    "token": tokenizer.decode([ids[position]]),
                    "teacher_top1": tokenizer.decode([int(t["teacher_prediction"][i])]),
                    "model_top1": tokenizer.decode([int(t["prediction"][i])]),
                }
            )
    result["most_divergent_tokens"] = rows
    return result


# ---------------------------------------------------------------- generation task


def normalize_answer(text: str) -> str:
    """Exact-match normalization: strip the ends and collapse every whitespace run to one space."""
    return " ".join(text.split())


def read_generation_rows(source: str) -> list[dict]:
    """Rows of a generation task: {"prompt": str, "answer": str} ("completion" is accepted for "answer")."""
    rows = []
    for where, row in read_rows(source):
        if isinstance(row, Exception):
            raise DistillError(f"bad generation row at {where}: {row}")
        answer = row.get("answer", row.get("completion")) if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(answer, str):
            raise DistillError(f'bad generation row at {where}: needs "prompt" and "answer" strings')
        rows.append({"prompt": row["prompt"], "answer": answer})
    if not rows:
        raise DistillError(f"generation file {source} has no rows")
    return rows


@torch.no_grad()
def exact_match(model, tokenizer, rows: Sequence[dict], max_length: int, extra_tokens: int = 16) -> dict:
    """Greedy-decode each prompt (batch 1, stops at EOS or after the answer's token count + `extra_tokens`)
    and compare the normalized continuation with the normalized answer.

    Through `distill.sampling.decode`: greedy is plain greedy whatever the model folder's generation_config.json
    says (a checkpoint's repetition penalty or min_new_tokens would change the answer), and no padded embedding
    row past the tokenizer is ever chosen."""
    device = model_device(model)
    pad_id = pad_id_of(tokenizer)
    eos = eos_ids(model, tokenizer)
    hits, samples = 0, []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"][-max_length:]
        answer_tokens = len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"])
        output = decode(
            model,
            [prompt],
            max_new_tokens=answer_tokens + extra_tokens,
            eos_ids=eos,
            pad_id=pad_id,
            vocab_size=len(tokenizer),
            device=device,
        )
        text = tokenizer.decode(output.new_ids[0].tolist(), skip_special_tokens=True)
        hit = normalize_answer(text) == normalize_answer(row["answer"])
        hits += hit
        if len(samples) < 5:
            samples.append({"prompt": row["prompt"], "answer": row["answer"], "output": text, "match": bool(hit)})
    return {"exact_match": hits / max(len(rows), 1), "generation_rows": len(rows), "generation_samples": samples}


# ---------------------------------------------------------------- the whole evaluation


@dataclass
class ModelSpec:
    """Where a model comes from and where it runs. `dtype`: auto | float32 | bfloat16 | float16."""

    name: str
    path: str
    dtype: str = "auto"
    device: str | None = None


def _spec(name: str, value, dtype: str, device: str | None) -> ModelSpec:
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, dict):
        if "path" not in value:
            raise DistillError(f"model {name}: needs a path")
        return ModelSpec(name, str(value["path"]), value.get("dtype", dtype), value.get("device", device))
    return ModelSpec(name, str(value), dtype, device)


def parse_model_arguments(students: Sequence[str] = (), baselines: Sequence[str] = ()) -> dict[str, str]:
    """`--student DIR` / `--student NAME=DIR` / `--baseline DIR` values -> {name: path}, in the order given.

    A value is NAME=DIR when it holds "=", is not itself an existing path, and NAME is a plain name; a bare DIR
    is named "student" (or "baseline"). Names must be unique and not "teacher"."""
    models: dict[str, str] = {}
    for default, values in (("student", students), ("baseline", baselines)):
        for value in values:
            name, path = default, value
            head, sep, tail = value.partition("=")
            if sep and not Path(value).exists() and head.replace("-", "_").replace(".", "_").isidentifier():
                name, path = head, tail
            if not path:
                raise DistillError(f"--{default} {value}: give a model folder")
            if name in models or name == "teacher":
                raise DistillError(f"model name {name!r} given twice or reserved; use --student NAME=DIR")
            models[name] = path
    if not models:
        raise DistillError("distill eval: give at least one --student DIR")
    return models


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def retention_of(model: dict, teacher: dict) -> dict:
    """Share of the teacher's quality kept: m_model / m_teacher for higher-is-better metrics and
    CE_teacher / CE_model for lower-is-better ones (1.0 = as good as the teacher)."""
    result = {
        "top1_accuracy": _ratio(model["top1_accuracy"], teacher["top1_accuracy"]),
        "cross_entropy": _ratio(teacher["cross_entropy"], model["cross_entropy"]),
        "agreement": _ratio(model["agreement"], teacher["agreement"]),
        "bits_per_byte": _ratio(teacher.get("bits_per_byte"), model.get("bits_per_byte")),
    }
    if "exact_match" in model and "exact_match" in teacher:
        result["exact_match"] = _ratio(model["exact_match"], teacher["exact_match"])
    return result


def speedup_of(model: dict, teacher: dict) -> dict:
    """decode = model decode tok/s / teacher decode tok/s (batch 1); params = teacher params / model params."""
    result = {
        "decode": _ratio(model.get("decode_tokens_per_s"), teacher.get("decode_tokens_per_s")),
        "params": _ratio(teacher["params"], model["params"]),
        "prefill": _ratio(model.get("prefill_tokens_per_s"), teacher.get("prefill_tokens_per_s")),
        "size_on_disk": _ratio(teacher.get("size_on_disk_bytes"), model.get("size_on_disk_bytes")),
        "peak_memory": _ratio(teacher.get("peak_memory_bytes"), model.get("peak_memory_bytes")),
    }
    model_batches = {b["batch_size"]: b for b in model.get("speed", {}).get("batches", [])}
    for b in teacher.get("speed", {}).get("batches", []):
        if b["batch_size"] != 1 and b["batch_size"] in model_batches:
            mine = model_batches[b["batch_size"]]
            result[f"decode_batch_{b['batch_size']}"] = _ratio(mine["decode_tokens_per_s"], b["decode_tokens_per_s"])
    return result


DEFINITIONS = {
    "cross_entropy": "mean over counted target tokens of −log p_model(target), nats per token",
    "perplexity": "exp(cross_entropy)",
    "bits_per_byte": "total cross-entropy in bits (sum of nats / ln 2) divided by the UTF-8 bytes of the counted "
    "target tokens' text; each run of consecutive targets ids[a:b] contributes "
    "len(utf8(decode(ids[:b]))) − len(utf8(decode(ids[:a]))), special tokens decoded to nothing",
    "top1_accuracy": "share of counted tokens where the model's argmax equals the target token",
    "agreement": "share of counted tokens where the model's argmax equals the teacher's argmax",
    "kl_to_teacher": "mean over counted tokens of KL(teacher ‖ model) at temperature 1, nats",
    "counted_tokens": "targets whose label is not -100, exactly as in training: prompt tokens and padding excluded; "
    "output position i predicts input token i+1",
    "retention": "higher-is-better metric m: m_model / m_teacher; cross_entropy and bits_per_byte: "
    "teacher / model (1.0 = 100% = as good as the teacher)",
    "speedup": "decode: model decode tok/s ÷ teacher decode tok/s at batch 1; params: teacher params ÷ model params",
    "prefill_tokens_per_s": "batch 1: prompt tokens ÷ seconds of one forward over a random prompt with the KV "
    "cache on; median of the timed runs after warm-up",
    "decode_tokens_per_s": "batch 1: generated tokens ÷ seconds of a fixed-length greedy loop feeding "
    "past_key_values back (no early stop); median of the timed runs after warm-up",
    "peak_memory_bytes": "weights in memory (exact) + peak extra memory of the largest-batch timing run: "
    "CUDA max_memory_allocated above the start, or on CPU sampled RSS above the start (approximate)",
    "size_on_disk_bytes": "sum of the weight files (.safetensors, .bin, ...) in the model folder",
    "exact_match": "greedy decoding from the prompt; stripped, whitespace-collapsed output equals the answer",
}


def _free_memory(device: torch.device, large: bool) -> None:
    """Return a dropped model's memory before the next one loads. A full garbage collection (modules hold
    reference cycles) costs about a second in a big process, so small CPU models skip it."""
    if large or device.type == "cuda":
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def evaluate_models(
    teacher_dir: str | dict,
    models: dict[str, str | dict],
    data: str,
    out_dir: str | None,
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    max_rows: int | None = None,
    generation: str | None = None,
    generation_extra_tokens: int = 16,
    metrics_path: str | None = None,
    speed: bool = True,
    speed_settings: SpeedSettings | None = None,
    device: str | None = None,
    dtype: str = "auto",
    show_progress: bool = True,
    log=print,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> dict:
    """Evaluate the teacher and every model on the same held-out data; write the report into `out_dir`.

    `teacher_dir` is a folder or hub id (or {"path", "dtype", "device"}); `models` maps a name ("student",
    "baseline", or any NAME) to a folder or hub id, or to {"path", "dtype", "device"} to run that model in
    another dtype or on another device than the teacher. Models are loaded one at a time beside the teacher
    (memory: teacher + one model); the teacher's logits are recomputed for each.

    `data` is read and tokenized exactly as training reads eval data (`build_examples`, truncation to
    `max_length`; None, the default: to the shortest context length of the models, so pre-tokenized rows such as
    a run's `eval-data.jsonl` are evaluated whole); `max_rows` keeps the first that many examples. `generation`
    is an optional prompt/answer file for exact match. `metrics_path` (or `out_dir/metrics.jsonl`) gives training
    curves. `speed=False` skips timing (its keys are then null); `speed_settings` sets runs and tokens
    (`SpeedSettings.quick()`). `device` defaults to cuda when available; `dtype` (auto | float32 | bfloat16 |
    float16) applies to every model without its own. Returns the report dict (the report.json contract plus
    extra keys) and writes report.json/.md/.html and PNGs into `out_dir` (None: writes nothing). User mistakes
    raise DistillError. Metrics come from hidden states, `memory_budget_bytes` of float32 logits at a time.
    """
    default_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher_spec = _spec("teacher", teacher_dir, dtype, default_device)
    specs = []
    for name, value in models.items():
        if not name or name == "teacher" or not name.replace("-", "_").replace(".", "_").isidentifier():
            raise DistillError(f"model name {name!r} is not allowed (use letters, digits, - and _; not 'teacher')")
        specs.append(_spec(name, value, dtype, default_device))
    if batch_size < 1 or (max_length is not None and max_length < 2):
        raise DistillError("eval needs batch_size >= 1 and max_length >= 2")
    if max_length is None:
        # Truncating to a fixed default would silently cut rows tokenized for a longer context (a run's
        # eval-data.jsonl holds rows of the recipe's data.max_length); only what no model can read is cut.
        contexts = [max_context(load_config(s.path, s.name)) for s in (teacher_spec, *specs)]
        known = [c for c in contexts if c is not None]
        max_length = min(known) if known else None

    tokenizer = load_tokenizer(teacher_spec.path, "teacher")
    for spec in specs:
        if has_tokenizer(spec.path):
            difference = compare_tokenizers(tokenizer, load_tokenizer(spec.path, spec.name))
            if difference is not None:
                raise DistillError(
                    f"teacher and {spec.name} tokenizers differ ({difference.replace('student', spec.name)})"
                )
    examples, stats = build_examples(data, tokenizer, max_length if max_length is not None else sys.maxsize)
    if stats.truncated_rows:
        log(f"eval data: {stats.truncated_rows} rows cut to {max_length} tokens")
    prompt_limit = max_length if max_length is not None else sys.maxsize  # exact match keeps a prompt's last tokens
    if max_rows is not None:
        examples = examples[:max_rows]
    if not examples:
        raise DistillError(f"eval data {data}: no examples with loss tokens ({stats.rows} rows read)")
    total_bytes = counted_bytes(examples, tokenizer)
    pad_id = pad_id_of(tokenizer)
    generation_rows = read_generation_rows(generation) if generation else None
    settings = speed_settings or SpeedSettings()

    def load(spec: ModelSpec):
        try:
            dev = torch.device(spec.device)
        except RuntimeError:
            raise DistillError(f"{spec.name} device {spec.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DistillError(f"{spec.name} device {spec.device!r}: CUDA is not available here")
        if spec.dtype != "auto" and spec.dtype not in DTYPES:
            raise DistillError(f"{spec.name} dtype {spec.dtype!r}: choose auto, {', '.join(DTYPES)}")
        model = load_model(spec.path, spec.name, resolve_dtype(spec.dtype, dev))
        model.eval()
        model.requires_grad_(False)
        return model.to(dev)

    def cost(model, spec: ModelSpec) -> dict:
        result = {
            "params": count_parameters(model),
            "size_on_disk_bytes": size_on_disk(spec.path),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(model_device(model)),
            "path": spec.path,
        }
        if speed:
            log(f"timing {spec.name} ({result['device']}, {result['dtype']})")
            measured = measure_speed(model, vocab_size, settings)
            batch_1 = measured["batches"][0]
            result.update(
                prefill_tokens_per_s=batch_1["prefill_tokens_per_s"],
                decode_tokens_per_s=batch_1["decode_tokens_per_s"],
                peak_memory_bytes=measured["peak_memory_bytes"],
                weights_memory_bytes=measured["weights_memory_bytes"],
                speed=measured,
            )
        else:
            result.update(prefill_tokens_per_s=None, decode_tokens_per_s=None, peak_memory_bytes=None)
        if generation_rows is not None:
            result.update(exact_match(model, tokenizer, generation_rows, prompt_limit, generation_extra_tokens))
        return result

    teacher = load(teacher_spec)
    vocab_size = check_vocabulary(tokenizer, teacher, None)
    log(f"eval data: {len(examples)} sequences, {sum(e.loss_tokens for e in examples)} counted tokens")
    teacher_cost = cost(teacher, teacher_spec)
    results: dict[str, dict] = {}
    teacher_quality = None
    progress = _progress(show_progress)
    with progress or contextlib.nullcontext():
        for spec in specs or [None]:
            model = load(spec) if spec is not None else None
            if model is not None and embedding_rows(model) < vocab_size:
                raise DistillError(
                    f"{spec.name} has {embedding_rows(model)} output rows but the tokenizer has {vocab_size} tokens"
                )
            name = spec.name if spec is not None else "teacher"
            teacher_part, model_part = _score_pass(
                teacher,
                model,
                examples,
                batch_size,
                pad_id,
                vocab_size,
                progress,
                f"eval {name}",
                teacher_quality is None,
                memory_budget_bytes,
            )
            if teacher_quality is None:
                teacher_quality = summarize(teacher_part, total_bytes, examples, tokenizer)
            if model is not None:
                quality = summarize(model_part, total_bytes, examples, tokenizer)
                results[spec.name] = {**quality, **cost(model, spec)}
                device_used, large = model_device(model), count_parameters(model) > 50_000_000
                del model, model_part
                _free_memory(device_used, large)
    report_models = {"teacher": {**teacher_quality, **teacher_cost}}
    report_models.update(results)
    teacher_result = report_models["teacher"]
    report = {
        "models": report_models,
        "retention": {name: retention_of(r, teacher_result) for name, r in results.items()},
        "speedup": {name: speedup_of(r, teacher_result) for name, r in results.items()},
        "data": {
            "path": str(data),
            "sequences": len(examples),
            "counted_tokens": teacher_result["tokens"],
            "counted_bytes": total_bytes,
            "max_length": max_length,
            "rows_read": stats.rows,
            "truncated_rows": stats.truncated_rows,
            "generation": str(generation) if generation else None,
        },
        "definitions": DEFINITIONS,
    }
    if out_dir is not None:
        from distill.report.render import write_report

        write_report(report, out_dir, metrics_path)
        log(f"report written to {Path(out_dir) / 'report.html'}")
    return report


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
