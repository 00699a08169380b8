"""Memory-lean "output head + distillation loss": logits are formed a chunk of tokens at a time and never kept.

Why: for N tokens and a vocabulary of V, the plain path materializes the student's and the teacher's (N, V)
logits plus several (N, V) float32 intermediates (log-probabilities, their exponentials, the gradient). At
N = 16k tokens and V = 150k that is tens of GiB, far more than the model itself. Here only the (N, H) hidden
states are inputs; for each chunk of n tokens the forward pass

1. forms the chunk's logits from the hidden states and the output head (`distill.losses.heads.OutputHead`: weight,
   bias, logit scale, softcap), the teacher's without gradient;
2. evaluates the objective on them with the shared definitions of `distill.losses.dense` (or `distill.losses.sparse` for
   stored top-k targets), and differentiates it w.r.t. the chunk's logits right away, with autograd or, for
   forward KL / reverse KL / cross-entropy and for forward KL against sparse targets, in closed form;
3. turns that (n, V) gradient into the gradients of the hidden states (n, H), the weight (V, H) and the bias,
   accumulated in float32, and frees everything of size (n, V).

The backward pass only scales the stored gradients by the incoming gradient. Peak extra memory is therefore
O(n · V) for the chunk plus the gradients of the inputs themselves, independent of N. The same idea appears in
Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989) and in litgpt's
`chunked_cross_entropy`; here it carries every divergence of `distill.losses.dense`.

Chunk size: `chunk_rows_for(vocab_size, memory_budget_bytes, ...)` picks n so that the (n, V) float32 buffers
alive at once stay within the budget (default 256 MiB). The vocabulary is not split: one token's logits are the
smallest unit, so with an enormous vocabulary and a tiny budget the budget is exceeded rather than the
objective rewritten as an online softmax (which would be a second definition of every divergence).

Tokens whose label is -100 contribute nothing to the loss and get a zero gradient, so they are dropped before
chunking; finding them costs one host sync per call (a `nonzero`), which buys skipping padding and prompt tokens
entirely.

Exactness: in float32 the loss and gradients equal `losses.loss_sums` on the full logits with plain autograd, up
to summation order. For bf16/fp16 inputs the matmuls run in the input dtype (as the model's own head would) and
everything after them in float32; gradients are returned in the inputs' dtypes, the weight's accumulated in
float32 first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.dense import (
    IGNORE_INDEX,
    log_probs,
    token_cross_entropy,
    token_divergence,
)
from distill.losses.heads import OutputHead
from distill.losses.objective import Objective
from distill.losses.sparse import SparseTargets, sparse_forward_kl_chunk, sparse_token_divergence

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# How many float32 (n, V) buffers are alive at the peak of one chunk, with about 1.4x headroom over what
# `benchmarks/fused_loss.py --budget-check --exact-allocator` measured at V = 32768 (forward KL 4.6, reverse KL 5.6
# since their chunks work in place; jsd 11.3, skew KLs 10.3 / 11.3, tvd 7.5, sparse top-32 6.4). Objectives that
# go through autograd keep more.
_LIVE_BUFFERS = {
    "forward_kl": 7,
    "reverse_kl": 8,
    "jsd": 16,
    "skew_forward_kl": 15,
    "skew_reverse_kl": 16,
    "tvd": 10,
    "sparse": 10,
    "none": 6,
}
_MIN_ROWS = 8


def chunk_rows_for(
    vocab_size: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, divergence: str = "forward_kl"
) -> int:
    """Tokens per chunk so that the chunk's float32 (n, V) buffers fit in `memory_budget_bytes`.

    Rounded down to a multiple of 8 (matmul-friendly), at least 8: the vocabulary is never split.
    """
    per_row = vocab_size * 4 * _LIVE_BUFFERS.get(divergence, max(_LIVE_BUFFERS.values()))
    rows = memory_budget_bytes // per_row
    return max(_MIN_ROWS, rows // 8 * 8)


def _raw_logits(hidden_rows: torch.Tensor, head: OutputHead, vocab_size: int) -> torch.Tensor:
    """``hidden @ weightᵀ + bias`` over the first `vocab_size` rows, in the weight's dtype. (n, H) -> (n, V)."""
    weight = head.weight[:vocab_size]  # (V, H) a view: padding rows are never touched
    bias = head.bias[:vocab_size] if head.bias is not None else None
    return F.linear(hidden_rows.to(weight.dtype), weight, bias)


def _closed_form_direction(obj: Objective, dense_teacher: bool) -> str | None:
    """ "forward_kl" or "reverse_kl" when the objective is that KL (ends of jsd/skew included) on a dense teacher,
    or no teacher at all (cross-entropy only); None when the generic autograd path is needed."""
    if not dense_teacher:
        return "forward_kl"  # the divergence term is absent; only the cross-entropy gradient is formed
    if obj.is_forward_kl:
        return "forward_kl"
    if obj.is_reverse_kl:
        return "reverse_kl"
    return None


def _closed_form_chunk(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    obj: Objective,
    direction: str,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Like `_generic_chunk` for the two plain KLs and cross-entropy, with the gradient w.r.t. the logits written
    out instead of taken by autograd, which roughly halves the elementwise work of a chunk.

    The log-probabilities come from `losses.dense.log_probs`; the KL is `dense._kl`'s sum, written out here so the
    probabilities it exponentiates serve the gradient too.
    Gradients (P = softmax at τ, s/t = log P of student/teacher, y = label):
    τ²·KL(P_t‖P_s) → τ·(P_s − P_t); τ²·KL(P_s‖P_t) → τ·P_s·(s − t − KL); cross-entropy → softmax − onehot(y).
    They equal autograd through `losses` except where a student log-probability is below the -1e6 floor, which
    no finite training state reaches. Every label in the chunk is counted (uncounted tokens were dropped).
    """
    tau = obj.temperature
    if teacher_logits is None:
        # Hard labels only: one log-softmax whose buffer becomes the softmax and then, in place, the gradient
        # (the cross-entropy is -log_softmax[label], as F.cross_entropy computes it; no floor is needed).
        s1 = torch.log_softmax(logits, dim=-1)  # (n, V)
        ce = -s1.gather(1, labels.unsqueeze(1)).sum()
        kd = logits.new_zeros(())
        if not need_grad:
            return kd, ce, None
        grad = s1.exp_().mul_(obj.ce_weight)  # (n, V) zero when the cross-entropy is not part of the loss
        grad.scatter_add_(1, labels.unsqueeze(1), grad.new_full((labels.shape[0], 1), -obj.ce_weight))
        return kd, ce, grad
    # Every (n, V) buffer below is reused in place once its last reader is done: a chunk's time is mostly
    # elementwise passes and first touches of fresh (n, V) allocations, not the matmuls.
    s = log_probs(logits, tau, in_place_floor=True)  # (n, V)
    # At τ = 1 the student log-probabilities are the cross-entropy's own log-softmax; reuse them.
    s1 = s if tau == 1.0 else log_probs(logits, 1.0, in_place_floor=True)  # (n, V)
    ce = -s1.gather(1, labels.unsqueeze(1)).sum()
    t = log_probs(teacher_logits, tau, in_place_floor=True)  # (n, V)
    # The divergence is `dense._kl` (Σ P·(log P − log Q), forward: P = teacher, reverse: P = student) written
    # with the probabilities it exponentiates kept, because the gradient needs them again.
    p_kl = t.exp() if direction == "forward_kl" else s.exp()  # (n, V)
    diff = t.sub_(s) if direction == "forward_kl" else t.neg_().add_(s)  # (n, V) log P − log Q, in t's buffer
    # Forward KL needs the difference for nothing else, so the product takes its buffer; reverse KL reads it again.
    per_token = (diff.mul_(p_kl) if direction == "forward_kl" else p_kl * diff).sum(-1)  # (n,)
    kd = per_token.sum() * (tau * tau)
    if not need_grad:
        return kd, ce, None
    scale = obj.kd_weight * tau
    ce_folded = tau == 1.0  # the hard-label term's softmax is then P_s itself
    if direction == "forward_kl":
        del diff
        # τ·(P_s − P_t) in s's buffer (the log-probabilities are not read again), the hard-label term's P_s folded in.
        grad = s.exp_().mul_(scale + (obj.ce_weight if ce_folded else 0.0)).sub_(p_kl, alpha=scale)
    else:
        # τ·P_s·(s − t − KL) in diff's buffer; P_s (p_kl) stays intact for the hard-label term.
        grad = diff.sub_(per_token.unsqueeze(1)).mul_(p_kl).mul_(scale)
        if ce_folded and obj.ce_weight:
            grad.add_(p_kl, alpha=obj.ce_weight)
    del p_kl
    if obj.ce_weight:
        if not ce_folded:
            grad.add_(s1.exp_(), alpha=obj.ce_weight)  # softmax at τ = 1, in s1's buffer
        grad.scatter_add_(1, labels.unsqueeze(1), grad.new_full((labels.shape[0], 1), -obj.ce_weight))
    return kd, ce, grad


def _generic_chunk(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: SparseTargets | None,
    labels: torch.Tensor,
    obj: Objective,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sums of divergence × τ² and cross-entropy over a chunk, and d(weighted sum)/d(logits) by autograd."""
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(need_grad)
        if targets is not None:
            kd = sparse_token_divergence(logits, targets, obj).sum()
        elif teacher_logits is not None:
            kd = token_divergence(logits, teacher_logits, obj).sum()
        else:
            kd = logits.new_zeros(())
        # Cross-entropy is always reported; it is only differentiated when it is part of the loss.
        ce = token_cross_entropy(logits if obj.ce_weight else logits.detach(), labels).sum()
        if not need_grad:
            return kd.detach(), ce.detach(), None
        total = obj.kd_weight * kd + obj.ce_weight * ce
        grad = torch.autograd.grad(total, logits)[0] if total.requires_grad else torch.zeros_like(logits)
    return kd.detach(), ce.detach(), grad


def _chunk_objective(
    raw: torch.Tensor,
    head: OutputHead,
    teacher_logits: torch.Tensor | None,
    targets: SparseTargets | None,
    labels: torch.Tensor,
    obj: Objective,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sums of divergence × τ² and cross-entropy over a chunk of counted tokens, and d(weighted sum)/d(raw).

    `raw` (n, V) float32 is the chunk's logits before the head's scale and softcap; the head's own derivative
    is applied by autograd on `head.finish` alone.
    """
    post = head.logit_scale != 1.0 or head.softcap is not None
    with torch.enable_grad():
        raw = raw.detach().requires_grad_(need_grad and post)
        logits = head.finish(raw)  # (n, V)
    direction = None if targets is not None else _closed_form_direction(obj, teacher_logits is not None)
    if targets is not None and obj.is_forward_kl:
        # Closed form against sparse targets: no autograd, and one log-softmax for the divergence and the
        # reported cross-entropy (`sparse.sparse_forward_kl_chunk`).
        kd, ce, grad = sparse_forward_kl_chunk(logits.detach(), targets, labels, obj, need_grad)
    elif direction is not None:
        kd, ce, grad = _closed_form_chunk(logits.detach(), teacher_logits, labels, obj, direction, need_grad)
    else:
        kd, ce, grad = _generic_chunk(logits, teacher_logits, targets, labels, obj, need_grad)
    if grad is not None and post:
        grad = torch.autograd.grad(logits, raw, grad)[0]  # (n, V) through the scale and softcap
    return kd, ce, grad


def _fused_forward(
    hidden: torch.Tensor,
    head: OutputHead,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_head: OutputHead | None,
    targets: SparseTargets | None,
    obj: Objective,
    vocab: int,
    rows: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Walk the counted tokens in chunks of `rows`. Returns kd_sum, ce_sum and float32 grads of the weighted sum
    (kd_weight · kd_sum + ce_weight · ce_sum) w.r.t. hidden (N, H), weight (V_model, H), bias (V_model,)."""
    need_h, need_w, need_b = needs
    need_grad = need_h or need_w or need_b
    # One host sync per call: the chunk boundaries must be known on the host, and dropping uncounted tokens
    # (padding, prompts) saves their whole (n, V) cost.
    index = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros((vocab, hidden.shape[1]), dtype=torch.float32, device=hidden.device) if need_w else None
    grad_b = torch.zeros((vocab,), dtype=torch.float32, device=hidden.device) if need_b else None
    weight = head.weight[:vocab].detach()  # (V, H)

    for start in range(0, index.shape[0], rows):
        idx = index[start : start + rows]  # (n,)
        h = hidden.index_select(0, idx)  # (n, H)
        raw = _raw_logits(h, head, vocab).float()  # (n, V)
        teacher_logits = None
        if teacher_hidden is not None:
            with torch.no_grad():
                t_raw = _raw_logits(teacher_hidden.index_select(0, idx), teacher_head, vocab)  # (n, V)
                teacher_logits = teacher_head.finish(t_raw.float())  # (n, V)
        chunk_targets = targets.select(idx) if targets is not None else None
        kd, ce, grad = _chunk_objective(
            raw, head, teacher_logits, chunk_targets, labels.index_select(0, idx), obj, need_grad
        )
        kd_sum += kd
        ce_sum += ce
        del raw, teacher_logits
        if grad is None:
            continue
        grad_mm = grad.to(weight.dtype)  # (n, V) no copy in float32
        if need_h:
            grad_h.index_copy_(0, idx, (grad_mm @ weight).float())  # (n, H)
        if need_w:
            if grad_mm.dtype == torch.float32 and h.dtype == torch.float32:
                grad_w.addmm_(grad_mm.t(), h)  # (V, H) accumulated in place
            else:
                grad_w += (grad_mm.t() @ h.to(weight.dtype)).float()  # (V, H)
        if need_b:
            grad_b += grad.sum(0)  # (V,)
        del grad, grad_mm

    if need_w and head.rows > vocab:
        grad_w = F.pad(grad_w, (0, 0, 0, head.rows - vocab))  # (V_model, H) padding rows get zero gradient
    if need_b and head.rows > vocab:
        grad_b = F.pad(grad_b, (0, head.rows - vocab))  # (V_model,)
    return kd_sum, ce_sum, grad_h, grad_w, grad_b


class _FusedLinearDivergence(torch.autograd.Function):
    """Autograd node: inputs hidden (N, H), weight, bias, normalizer; outputs loss, kd_sum, ce_sum."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        normalizer,
        head,
        labels,
        teacher_hidden,
        teacher_head,
        targets,
        obj,
        vocab,
        rows,
        needs,
    ):
        kd_sum, ce_sum, grad_h, grad_w, grad_b = _fused_forward(
            hidden, head, labels, teacher_hidden, teacher_head, targets, obj, vocab, rows, needs
        )
        inv = 1.0 / normalizer
        loss = (obj.kd_weight * kd_sum + obj.ce_weight * ce_sum) * inv
        # Fold 1/normalizer in while still in float32 (in place: the weight's gradient is as big as the weight),
        # then store in the inputs' dtypes: in backward the incoming gradient is usually exactly 1, so a
        # low-precision copy is rounded only once.
        ctx.save_for_backward(
            grad_h.mul_(inv).to(hidden.dtype) if grad_h is not None else None,
            grad_w.mul_(inv).to(weight.dtype) if grad_w is not None else None,
            grad_b.mul_(inv).to(bias.dtype) if grad_b is not None else None,
        )
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [g * grad_loss.to(g.dtype) if g is not None else None for g in (grad_h, grad_w, grad_b)]
        return (*scaled, None, None, None, None, None, None, None, None, None, None)


def fused_loss_sums(
    student_hidden: torch.Tensor,
    student_head: OutputHead,
    labels: torch.Tensor,
    *,
    objective: Objective,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: OutputHead | None = None,
    sparse: SparseTargets | None = None,
    vocab_size: int | None = None,
    normalizer: torch.Tensor | float = 1.0,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distillation loss from hidden states, without materializing the (N, V) logits.

    Returns ``(loss, kd_sum, ce_sum)`` with ``loss = (kd_weight·kd_sum + ce_weight·ce_sum) / normalizer``
    (differentiable w.r.t. the student's hidden states, head weight and bias) and the two sums detached; the
    divergence, temperature and both weights are the `objective`'s. The sums
    are what `losses.loss_sums` gives on the full logits: over tokens whose label is not -100, the divergence
    × τ² between the student's and the teacher's (or, with `sparse`, the stored targets') distributions, and the
    student's cross-entropy at temperature 1. Without a teacher and without `sparse`, kd_sum is 0 (hard labels).

    Shapes: student_hidden (..., H), labels (...) long, teacher_hidden (..., H_t), sparse targets of the same
    number of tokens in flattened order. Labels are taken as given: shift them for next-token prediction
    before calling. `vocab_size` is the tokenizer's vocabulary (default: the smallest head's row count);
    logit columns at or beyond it (embedding padding) are ignored on both sides. `normalizer` is usually the
    number of loss tokens in the global batch; it is clamped to at least 1. `chunk_rows` overrides the chunk size that
    `memory_budget_bytes` would give. The teacher never receives gradients.
    """
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head go together")
    if teacher_hidden is not None and sparse is not None:
        raise ValueError("give a teacher or sparse targets, not both")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1)  # (N,)
    if flat_labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {flat_labels.shape[0]} labels")
    t_hidden = None
    if teacher_hidden is not None:
        t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()  # (N, H_t)
        if t_hidden.shape[0] != hidden.shape[0]:
            raise ValueError(f"{hidden.shape[0]} student hidden states but {t_hidden.shape[0]} teacher ones")
    if sparse is not None and len(sparse) != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but sparse targets for {len(sparse)} tokens")
    rows_available = [student_head.rows] + ([teacher_head.rows] if teacher_head is not None else [])
    vocab = min(rows_available) if vocab_size is None else vocab_size
    if vocab > min(rows_available):
        raise ValueError(f"vocab_size {vocab} exceeds an output head's {min(rows_available)} rows")
    if chunk_rows is None:
        kind = "sparse" if sparse is not None else objective.divergence if t_hidden is not None else "none"
        chunk_rows = chunk_rows_for(vocab, memory_budget_bytes, kind)
    if teacher_head is not None:
        teacher_head = OutputHead(
            teacher_head.weight.detach(),
            teacher_head.bias.detach() if teacher_head.bias is not None else None,
            teacher_head.logit_scale,
            teacher_head.softcap,
        )
    # Decided here, not in forward: inside an autograd.Function the grad mode is always off, and under
    # torch.no_grad (evaluation) no gradient work should happen at all.
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and student_head.weight.requires_grad,
        grad_on and student_head.bias is not None and student_head.bias.requires_grad,
    )
    if not isinstance(normalizer, torch.Tensor):
        normalizer = torch.tensor(float(normalizer), dtype=torch.float32, device=hidden.device)
    # Like the count in `losses.masked_mean`: a batch without loss tokens gives 0, not 0/0 = NaN.
    # No clamp at 1 here: under DDP the caller passes (global loss tokens) / world size, which is below 1 when a
    # step has fewer loss tokens than processes; the caller clamps the count before dividing. This only keeps
    # a zero from dividing.
    normalizer = normalizer.detach().float().clamp_min(torch.finfo(torch.float32).tiny)
    return _FusedLinearDivergence.apply(
        hidden,
        student_head.weight,
        student_head.bias,
        normalizer,
        student_head,
        flat_labels,
        t_hidden,
        teacher_head,
        sparse,
        objective,
        vocab,
        chunk_rows,
        needs,
    )
