"""Retention by difficulty: the eval tokens split by how uncertain the teacher is about them.

A token's difficulty is the entropy of the teacher's next-token distribution at temperature 1, −Σ p_t log p_t in
nats, which the report's chunked pass computes for every counted token beside the other metrics (no (tokens × V)
logits are held). The tokens are cut at the quartiles of that entropy over the counted tokens, so each bucket holds
about a quarter of them (ties at an edge go to the lower bucket), and every model is scored per bucket on exactly
the same tokens. The claim to check: a student keeps the teacher's easy tokens and loses most on the hard ones.
"""

from __future__ import annotations

import numpy as np
import torch

from distill.report.retention import retention_of

BUCKETS = 4  # quartiles
METRICS = ("tokens", "top1_accuracy", "agreement", "kl_to_teacher", "cross_entropy", "mean_teacher_entropy")


def difficulty_edges(teacher_entropy: torch.Tensor, buckets: int = BUCKETS) -> list[float]:
    """[min, q_1, ..., q_{buckets-1}, max] of the teacher's entropy (N,) over the counted tokens (linear
    interpolation between order statistics, numpy's default). [] when there are no tokens."""
    if teacher_entropy.numel() == 0:
        return []
    values = teacher_entropy.double().numpy()
    return [float(v) for v in np.quantile(values, np.linspace(0.0, 1.0, buckets + 1))]


def bucket_index(teacher_entropy: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """The bucket (0 = easiest) of each token (N,): bucket b holds edges[b] < H ≤ edges[b+1] (bucket 0 from the min)."""
    inner = torch.tensor(edges[1:-1], dtype=torch.float64)
    return torch.bucketize(teacher_entropy.double(), inner, right=False)  # (N,)


def bucket_metrics(tensors: dict[str, torch.Tensor], index: torch.Tensor, buckets: int = BUCKETS) -> list[dict]:
    """Per bucket: counted tokens, top-1 accuracy, agreement with the teacher, mean KL(teacher ‖ model), mean
    cross-entropy and the mean teacher entropy. `tensors` are one model's per-token results (report.quality's
    `Collected.tensors()`), `index` (N,) the bucket of each of those tokens."""
    counts = torch.bincount(index, minlength=buckets).double()  # (buckets,)

    def mean(name: str) -> list[float]:
        sums = torch.bincount(index, weights=tensors[name].double(), minlength=buckets)
        return (sums / counts.clamp_min(1.0)).tolist()

    columns = {
        "top1_accuracy": mean("correct"),
        "agreement": mean("agreement"),
        "kl_to_teacher": mean("kl_to_teacher"),
        "cross_entropy": mean("cross_entropy"),
        "mean_teacher_entropy": mean("teacher_entropy"),
    }
    return [{"tokens": int(counts[b]), **{name: values[b] for name, values in columns.items()}} for b in range(buckets)]


def by_difficulty(per_model: dict[str, list[dict]], edges: list[float]) -> dict[str, list[dict]]:
    """report.json's `by_difficulty`: per model, its buckets with their entropy range and retention against the
    teacher's same bucket (`retention_of`'s rules: m / m_teacher, cross-entropy teacher / model)."""
    teacher = per_model.get("teacher")
    result = {}
    for name, buckets in per_model.items():
        rows = []
        for b, values in enumerate(buckets):
            row = {"bucket": b + 1, "teacher_entropy_low": edges[b], "teacher_entropy_high": edges[b + 1], **values}
            if teacher is not None and name != "teacher" and values["tokens"] and teacher[b]["tokens"]:
                kept = retention_of(values, teacher[b])
                row["retention"] = {k: kept[k] for k in ("top1_accuracy", "cross_entropy", "agreement")}
            rows.append(row)
        result[name] = rows
    return result
