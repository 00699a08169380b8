"""Selective activation checkpointing (training.gradient_checkpointing: selective).

Inside each checkpointed decoder layer, the outputs of matrix products and attention kernels are kept for backward
and every other op is recomputed from them. Those others are elementwise (norms, rotary embeddings, activations,
the repeat of grouped key/value heads) and cheap to redo, but they hold most of a layer's saved memory: the MLP
alone keeps four (tokens x intermediate) tensors for two products. Recomputation replays the same ops on the same
inputs, so the gradients are bitwise those of no checkpointing.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# Linear layers reach the dispatcher as mm / addmm (bmm for batched products); attention as one of the fused
# scaled-dot-product kernels, whose logsumexp output is kept with it.
_KEPT = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT else CheckpointPolicy.PREFER_RECOMPUTE


# torch.utils.checkpoint's context_fn: a fresh pair of contexts per checkpointed call.
keep_products_only = functools.partial(create_selective_checkpoint_contexts, _policy)
