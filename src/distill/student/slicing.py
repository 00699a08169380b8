"""Which indices to keep, and the teacher's tensors cut down to them.

The student is a fresh model built from the student config; its state dict is filled here from the teacher's.
Because the model is new, each attention module's `layer_idx` (its KV-cache slot) is 0..N-1 by construction:
no teacher module is ever moved or renumbered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from distill.errors import DistillError
from distill.student.architecture import EMBED_SCALED, HIDDEN_NORMS, NORM_OFFSET, axes_of, split_name
from distill.student.importance import Importance
from distill.student.target import Shape


@dataclass
class Selection:
    """Kept indices. Per-layer lists are indexed by *student* layer; `layers[j]` is its teacher layer."""

    layers: list[int]
    hidden: list[int]
    neurons: list[list[int]] = field(default_factory=list)
    heads: list[list[int]] = field(default_factory=list)
    kv_heads: list[list[int]] = field(default_factory=list)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in their original order (ties keep the earlier index)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def layers_by_influence(block_influence: list[float], keep: int) -> list[int]:
    """ShortGPT: keep the `keep` layers with the largest block influence, drop the rest."""
    return top_k(torch.tensor(block_influence), keep)


def select_heads(scores: torch.Tensor, teacher: Shape, student: Shape) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) of one layer, under the GQA rule of `target.resolve_heads`.

    Query head h reads KV head h // group. Same KV count: each group keeps its best query heads, so the kept
    heads, in order, still map to their KV head by integer division. Fewer KV heads: whole groups are ranked by
    the summed importance of their query heads.
    """
    group = teacher.heads // teacher.kv_heads
    if student.kv_heads == teacher.kv_heads:
        per_group = student.heads // teacher.kv_heads
        heads = []
        for g in range(teacher.kv_heads):
            members = list(range(g * group, (g + 1) * group))
            heads += [members[i] for i in top_k(scores[members], per_group)]
        return heads, list(range(teacher.kv_heads))
    group_scores = scores.view(teacher.kv_heads, group).sum(dim=1)  # (kv_heads,)
    groups = top_k(group_scores, student.kv_heads)
    return [g * group + i for g in groups for i in range(group)], groups


def select(importance: Importance, layers: list[int], teacher: Shape, student: Shape) -> Selection:
    """Apply the importance scores: top channels globally, top neurons and heads in each kept layer (Minitron)."""
    selection = Selection(layers=layers, hidden=top_k(importance.hidden, student.hidden))
    for t in layers:
        selection.neurons.append(top_k(importance.neurons[t], student.intermediate))
        heads, kv_heads = select_heads(importance.heads[t], teacher, student)
        selection.heads.append(heads)
        selection.kv_heads.append(kv_heads)
    return selection


def _rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def slice_state(
    teacher_state: dict[str, torch.Tensor], student_keys: list[str], selection: Selection, head_dim: int
) -> dict[str, torch.Tensor]:
    """Every student tensor, cut from the teacher's along the axes `architecture.axes_of` names."""
    out = {}
    for key in student_keys:
        layer, rest = split_name(key)
        axes = axes_of(key)
        if axes is None:
            raise DistillError(f"do not know how to prune {key}")
        source = key if layer is None else f"model.layers.{selection.layers[layer]}.{rest}"
        tensor = teacher_state[source]
        for dim, kind in enumerate(axes):
            index = _index(kind, layer, selection, head_dim)
            if index is not None:
                tensor = tensor.index_select(dim, torch.tensor(index, device=tensor.device))
        out[key] = tensor.clone().contiguous()
    return out


def _index(kind: str, layer: int | None, selection: Selection, head_dim: int) -> list[int] | None:
    if kind == "hidden":
        return selection.hidden
    if kind == "inter":
        return selection.neurons[layer]
    if kind == "q":
        return _rows(selection.heads[layer], head_dim)
    if kind == "kv":
        return _rows(selection.kv_heads[layer], head_dim)
    return None


def rescale_for_hidden(state: dict[str, torch.Tensor], config, teacher_hidden: int, tied: bool) -> float:
    """Undo the size-dependent scales that change when the hidden size shrinks from H to H'. Returns k.

    RMSNorm divides by the root mean square over all channels, and the mean has H' terms instead of H. Multiplying
    every residual-stream norm's scale by k = sqrt(H / H') makes each norm output on the kept channels exactly what
    the teacher's would be if the dropped channels were zero. Importance keeps the high-energy channels, so this is
    closer to the teacher than leaving the scales alone (which assumes the dropped channels were average).
    Minitron leaves this to retraining; here it makes pruning of dead channels lossless, which the tests check.

    Gemma also multiplies embeddings by sqrt(hidden_size); multiplying the embedding matrix by k restores the
    teacher's input scale. A tied lm_head is that same matrix, so its logits would grow by k: the final norm, already
    multiplied by k above, is divided by k again, which leaves it unchanged.
    """
    if config.hidden_size == teacher_hidden:
        return 1.0
    k = math.sqrt(teacher_hidden / config.hidden_size)
    offset = NORM_OFFSET.get(config.model_type, 0.0)  # Gemma's norms scale by (1 + weight)
    embed_scaled = config.model_type in EMBED_SCALED
    for key, value in state.items():
        _, rest = split_name(key)
        if rest.split(".")[0] in HIDDEN_NORMS or key == "model.norm.weight":
            # Gemma, tied: the final norm's k would cancel lm_head's k, so neither is applied there.
            scale = 1.0 if key == "model.norm.weight" and embed_scaled and tied else k
            state[key] = ((value.float() + offset) * scale - offset).to(value.dtype)
    if embed_scaled:
        embed = state["model.embed_tokens.weight"]
        state["model.embed_tokens.weight"] = (embed.float() * k).to(embed.dtype)
        if tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return k
