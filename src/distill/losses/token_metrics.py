"""Evaluation metrics a chunk of tokens at a time: the (tokens × vocabulary) logits are never held whole.

The same idea as the fused loss (`distill.losses.fused`), for evaluation: a model's side is given as a function that
forms the float32 logits of a few chosen token positions, usually from the backbone's last hidden states and the output
head (`head_rows`: (n, H) @ (V, H)ᵀ, then the head's scale and softcap), and the metrics of each chunk are reduced
to per-token values (a few floats per token) before the next chunk is formed. Only counted positions (label
!= -100) are ever projected. Peak extra memory is O(chunk × V) instead of O(B × T × V): at V = 152k, 8 × 1024
tokens of float32 logits are 5 GB per model, a 256 MiB chunk budget keeps it under that budget.

`dense_rows` serves the same rows from full logits a model's forward already produced. It is the fallback for
an architecture whose output head `distill.losses.heads.output_head` cannot reproduce (`verify_output_head`), and the
reference the chunked path is tested against; both go through the same per-chunk math (`chunk_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from distill.losses.dense import IGNORE_INDEX, log_probs
from distill.losses.fused import DEFAULT_MEMORY_BUDGET_BYTES, chunk_rows_for
from distill.losses.heads import OutputHead

# rows (n,) long -> float32 logits (n, V) over the real vocabulary of those flat token positions.
LogitRows = Callable[[torch.Tensor], torch.Tensor]


def head_rows(hidden: torch.Tensor, head: OutputHead, vocab_size: int) -> LogitRows:
    """Logit rows from hidden states (N, H) and an output head, over its first `vocab_size` rows.

    The projection and the head's scale/softcap run in the weight's dtype, as the model's own forward does, so
    a bf16 model is measured on the logits it really produces; the result is float32. Padding rows of the
    embedding (rows >= vocab_size) are sliced off before the matmul and never computed.
    """
    weight = head.weight[:vocab_size]  # (V, H) a view
    bias = head.bias[:vocab_size] if head.bias is not None else None

    def rows(index: torch.Tensor) -> torch.Tensor:
        h = hidden.index_select(0, index.to(hidden.device)).to(weight.dtype)  # (n, H)
        return head.finish(F.linear(h, weight, bias)).float()  # (n, V)

    return rows


def dense_rows(logits: torch.Tensor, vocab_size: int) -> LogitRows:
    """Logit rows taken from full logits (N, V_model) a forward pass already built (the dense fallback)."""

    def rows(index: torch.Tensor) -> torch.Tensor:
        return logits.index_select(0, index.to(logits.device))[:, :vocab_size].float()  # (n, V)

    return rows


def chunk_metrics(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-token metrics of one chunk of counted tokens, in float32.

    logits (n, V) float, labels (n,) long (every one counted), teacher_logits (n, V) or None, on one device.
    Returns (n,) tensors: `cross_entropy` (−log p_model(label), nats), `prediction` (argmax id), `confidence` (the
    model's probability of its argmax, for calibration) and, with a teacher, `kl_to_teacher` (KL(teacher ‖ model) at
    temperature 1, nats), `teacher_prediction`, `teacher_confidence`, `teacher_cross_entropy` (the teacher's own
    −log p(label): the teacher's report comes from the same chunk) and `teacher_entropy` (−Σ p_t log p_t, nats: how
    hard the teacher finds the token); without one, `entropy` (the model's own).
    """
    model_lp = log_probs(logits)  # (n, V)
    top, prediction = model_lp.max(-1)  # (n,) each; the first maximum, as argmax
    result = {
        "cross_entropy": -model_lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1),  # (n,)
        "prediction": prediction,
        "confidence": top.exp(),  # (n,)
    }
    if teacher_logits is not None:
        teacher_lp = log_probs(teacher_logits)  # (n, V)
        teacher_p = teacher_lp.exp()  # (n, V)
        # KL(T ‖ M) = Σ p_t (log p_t − log p_m) and H(T) = −Σ p_t log p_t, both written into model_lp's buffer, so no
        # more than three (n, V) stay alive beside the logits.
        difference = torch.sub(teacher_lp, model_lp, out=model_lp)  # (n, V)
        result["kl_to_teacher"] = torch.mul(teacher_p, difference, out=difference).sum(-1)  # (n,)
        result["teacher_entropy"] = -torch.mul(teacher_p, teacher_lp, out=difference).sum(-1)  # (n,)
        teacher_top, result["teacher_prediction"] = teacher_lp.max(-1)  # (n,) each
        result["teacher_confidence"] = teacher_top.exp()  # (n,)
        result["teacher_cross_entropy"] = -teacher_lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (n,)
    else:
        model_p = model_lp.exp()  # (n, V)
        result["entropy"] = -torch.mul(model_p, model_lp, out=model_p).sum(-1)  # (n,)
    return result


def chunked_token_metrics(
    model_rows: LogitRows,
    labels: torch.Tensor,
    teacher_rows: LogitRows | None = None,
    *,
    vocab_size: int,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token metrics of every counted token (labels != -100), walking them `chunk_rows` at a time.

    labels (N,) flat, on the device where the metrics are computed (the model's); the teacher's chunk of logits
    is moved there. Returns 1-D tensors of length M = number of counted tokens, in flat order: `index` (position
    in N), the `chunk_metrics` keys, `correct` (prediction == label) and, with a teacher, `agreement`
    (prediction == teacher's). The chunk size comes from `memory_budget_bytes` by the fused loss's rule
    (`fused.chunk_rows_for`) unless `chunk_rows` is given.
    """
    rows = chunk_rows if chunk_rows is not None else chunk_rows_for(vocab_size, memory_budget_bytes, "forward_kl")
    # One host sync per batch: chunk boundaries must be known on the host, and skipping uncounted positions
    # (padding, prompts) saves their whole (n, V) cost.
    index = (labels != IGNORE_INDEX).nonzero().squeeze(-1)  # (M,)
    # Results go into (M,) tensors allocated before the loop, not into per-chunk pieces concatenated at the end.
    # With pieces, a `distill train` process's resident memory was measured growing by about one chunk's buffers
    # per chunk (to 5.5 GB over one eval batch at V = 32768) and dropping when the batch ended: small tensors that
    # outlive a chunk most likely split the holes its (n, V) buffers leave in the CPU heap, so the next chunk's
    # buffers no longer fit there.
    m, device = index.numel(), labels.device
    teacher_floats = ["kl_to_teacher", "teacher_cross_entropy", "teacher_entropy", "teacher_confidence"]
    floats = ["cross_entropy", "confidence"] + (teacher_floats if teacher_rows is not None else ["entropy"])
    ids = ["prediction"] + (["teacher_prediction"] if teacher_rows is not None else [])
    out = {name: torch.empty(m, dtype=torch.float32, device=device) for name in floats}  # (M,) each
    out.update({name: torch.empty(m, dtype=torch.long, device=device) for name in ids})
    for start in range(0, m, rows):
        idx = index[start : start + rows]  # (n,)
        logits = model_rows(idx)  # (n, V)
        teacher_logits = teacher_rows(idx).to(logits.device) if teacher_rows is not None else None  # (n, V)
        for name, value in chunk_metrics(logits, labels.index_select(0, idx), teacher_logits).items():
            out[name][start : start + idx.numel()].copy_(value)
        del logits, teacher_logits  # before the next chunk's are formed
    result = {"index": index, **out}
    result["correct"] = result["prediction"] == labels.index_select(0, index)
    if teacher_rows is not None:
        result["agreement"] = result["prediction"] == result["teacher_prediction"]
    return result
