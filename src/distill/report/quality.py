"""Token-level quality metrics of a model against labels and against the teacher.

The same tokens count here as in training: outputs whose label is not -100 (prompt tokens and padding are
excluded by the data pipeline's loss mask).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distill.data import Example, collate, forward_inputs
from distill.losses.fused import DEFAULT_MEMORY_BUDGET_BYTES
from distill.losses.heads import OutputHead, backbone_hidden_states, output_head, verify_output_head
from distill.losses.token_metrics import LogitRows, chunked_token_metrics, dense_rows, head_rows
from distill.report.failures import expected_calibration_error
from distill.report.speed import model_device


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
    where, back = model_device(model), inputs["input_ids"].device
    if where != back:  # a teacher on another device (teacher.device): it computes there, its rows come back
        inputs = {k: v.to(where) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        rows = logit_rows(model, head, inputs, vocab_size)
        return lambda index: rows(index.to(where)).to(back)
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


# What the report keeps of every counted token, per model: `confidence` feeds calibration, `teacher_entropy` the
# split by difficulty (the teacher's own entropy in the teacher's entry).
PER_TOKEN = (
    "cross_entropy",
    "kl_to_teacher",
    "prediction",
    "teacher_prediction",
    "correct",
    "agreement",
    "confidence",
    "teacher_entropy",
)


@dataclass
class Collected:
    """Per-token results of one model over the whole eval set (CPU tensors, concatenated at the end)."""

    parts: dict[str, list[torch.Tensor]]

    @classmethod
    def empty(cls) -> Collected:
        return cls({name: [] for name in ("example", "position", *PER_TOKEN)})

    def add(self, metrics: dict[str, torch.Tensor], first_example: int, width: int) -> None:
        index = metrics["index"].cpu()
        # Output position i predicts input token i+1: report the target token's own position.
        self.parts["example"].append(first_example + index // width)
        self.parts["position"].append(index % width + 1)
        for name in PER_TOKEN:
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


def _own_metrics(metrics: dict[str, torch.Tensor], targets: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """The teacher's own per-token results, KL 0 and agreement 1 by construction. All (M,) over counted tokens.

    `metrics` are `chunked_token_metrics` results in which the teacher's values carry `prefix` ("teacher_" when
    they come from a pass beside a model, "" from a teacher-only pass)."""
    cross_entropy, prediction = metrics[f"{prefix}cross_entropy"], metrics[f"{prefix}prediction"]
    return {
        "index": metrics["index"],
        "cross_entropy": cross_entropy,
        "kl_to_teacher": torch.zeros_like(cross_entropy),
        "prediction": prediction,
        "teacher_prediction": prediction,
        "correct": prediction == targets,
        "agreement": torch.ones_like(prediction, dtype=torch.bool),
        "confidence": metrics[f"{prefix}confidence"],
        "teacher_entropy": metrics["teacher_entropy" if prefix else "entropy"],
    }


@torch.no_grad()
def score_pass(
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
) -> tuple[Collected, Collected]:
    """One pass over the eval set: per-token results of `model` against the teacher, and of the teacher itself.

    With `teacher_metrics`, the teacher's own results (KL 0, agreement 1 by construction) come from the same
    forward, so the teacher runs once per pass. `model` may be None (teacher only). Each model stays on its own
    device and dtype; logits are formed a chunk of counted tokens at a time from each model's hidden states
    (`distill.losses.token_metrics`), the teacher's chunk moving to the model's device for the comparison.
    """
    teacher_device = model_device(teacher)
    model_dev = model_device(model) if model is not None else teacher_device
    teacher_out, model_out = Collected.empty(), Collected.empty()
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
                teacher_out.add(_own_metrics(metrics, targets, "teacher_"), first, width)
        elif teacher_metrics:
            metrics = chunked_token_metrics(
                teacher_rows, flat_labels, vocab_size=vocab_size, memory_budget_bytes=memory_budget_bytes
            )
            targets = flat_labels.index_select(0, metrics["index"])  # (M,)
            teacher_out.add(_own_metrics(metrics, targets, ""), first, width)
        teacher_rows = model_rows = None  # free this batch's hidden states (or fallback logits) before the next
        if progress:
            progress.advance(task)
    return teacher_out, model_out


def _percentile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return 0.0
    return float(np.percentile(values.double().numpy(), q))


def summarize(
    collected: Collected, total_bytes: int, examples: Sequence[Example], tokenizer, worst: int = 10, context: int = 12
) -> dict:
    """Means over counted tokens, KL spread, calibration and the tokens where the model diverges most from the
    teacher."""
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
        "expected_calibration_error": expected_calibration_error(t["confidence"], t["correct"]),
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
