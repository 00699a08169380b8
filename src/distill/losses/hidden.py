"""Hidden-state distillation: the student's intermediate states pulled toward the teacher's, added to the logit loss.

The method is TinyBERT's hidden-state loss (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language
Understanding", eq. 8: MSE(H_S W_h, H_T) with a learned W_h where the widths differ, and its uniform layer mapping
g(m) = m · T / S), with the per-pair bias-free projections and the cosine variant of DistillKit's hidden-state losses
(arcee-ai/DistillKit `hs_cosine` / `hs_mse`: one `nn.Linear(student_width, teacher_width, bias=False)` per layer pair,
xavier-uniform start, 1 − cos or the squared error averaged over the teacher's width, then the mean over pairs).
MiniLM's attention-relation transfer is not implemented.

Layer numbers are indices into transformers' `output_hidden_states`: layer k is the state after k decoder layers,
0 = the embedding output, L = the last layer's output (after the final norm, as transformers returns it).

`auto` pairs every student layer k = 1..S with teacher layer round(k · T / S) (halves round up), so the last layers
are always paired and the embedding output is not (TinyBERT distils it with a term of its own; give [0, 0] to add
it). For S = 3, T = 6: [[1, 2], [2, 4], [3, 6]].

Normalization matches the logit loss: the hidden term of a micro-batch is a sum over its loss tokens (padding and
prompt tokens excluded) of the per-token loss averaged over the pairs; the caller divides by the global batch's
loss-token count, so neither gradient accumulation nor the number of ranks changes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from distill.losses.objective import HIDDEN_LOSSES

LayerPairs = list[tuple[int, int]]

_EXAMPLE = "e.g. [[1, 2], [2, 4]] (layer k = the state after k decoder layers, 0 = the embeddings)"


def token_hidden_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token loss between two states of the same width, in float32. (..., H), (..., H) -> (...).

    cosine: 1 − cos(student, teacher), in [0, 2], 0 when the two point the same way (their norms do not matter).
    mse: the squared difference averaged over the width (TinyBERT's MSE), 0 only for equal states.
    """
    s, t = student.float(), teacher.float()
    if loss == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    if loss == "mse":
        return (s - t).pow(2).mean(dim=-1)
    raise ValueError(f"unknown hidden-state loss {loss!r}; choose one of {', '.join(HIDDEN_LOSSES)}")


def hidden_loss_sum(
    student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], mask: torch.Tensor, loss: str
) -> torch.Tensor:
    """Sum over counted tokens of the per-token loss averaged over layer pairs: a float32 scalar.

    student_states[i] (..., Ht) is pair i's student state, already projected to the teacher's width; teacher_states[i]
    (..., Ht) the teacher's state of that pair (no gradient flows into it); mask (...) bool, True = a loss token.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"{len(student_states)} student states for {len(teacher_states)} teacher states")
    per_token = sum(
        token_hidden_loss(s, t.detach(), loss) for s, t in zip(student_states, teacher_states, strict=True)
    )  # (...)
    # torch.where, not a product: a padding position's value never reaches the sum, whatever it is.
    return torch.where(mask, per_token / len(student_states), 0.0).sum()


def auto_layer_pairs(student_layers: int, teacher_layers: int) -> LayerPairs:
    """Student layer k (1..S) with teacher layer round(k·T/S), halves up: TinyBERT's uniform mapping, last with last."""
    return [
        (k, (2 * k * teacher_layers + student_layers) // (2 * student_layers)) for k in range(1, student_layers + 1)
    ]


def check_layer_pairs(value: Any) -> str | LayerPairs:
    """The recipe's `objective.hidden.layers` as given: "auto" or a list of [student, teacher] pairs of layer numbers.

    Raises ValueError (one line) for anything else; whether the numbers exist is checked against the models later
    (`resolve_layer_pairs`).
    """
    if value == "auto":
        return value
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"give auto or a list of [student_layer, teacher_layer] pairs, {_EXAMPLE}; got {value!r}")
    if not value:
        raise ValueError("an empty list pairs no layers; give auto or pairs, or objective.hidden.weight=0 for none")
    pairs = []
    for i, pair in enumerate(value):
        numbers = isinstance(pair, (list, tuple)) and all(type(n) is int for n in pair)
        if not numbers or len(pair) != 2:
            raise ValueError(
                f"entry {i} ({pair!r}) is not a [student_layer, teacher_layer] pair of integers, {_EXAMPLE}"
            )
        if min(pair) < 0:
            raise ValueError(f"entry {i} ({list(pair)}): layer numbers start at 0 (the embedding output)")
        pairs.append((pair[0], pair[1]))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"a pair is given twice in {[list(p) for p in pairs]}")
    return pairs


def resolve_layer_pairs(layers: str | Sequence[Sequence[int]], student_layers: int, teacher_layers: int) -> LayerPairs:
    """The (student, teacher) pairs for models with S and T decoder layers; ValueError naming a number out of range."""
    if layers == "auto":
        return auto_layer_pairs(student_layers, teacher_layers)
    pairs = check_layer_pairs(layers)
    for s, t in pairs:
        if s > student_layers:
            raise ValueError(
                f"student layer {s} of pair [{s}, {t}] does not exist (the student has 0..{student_layers})"
            )
        if t > teacher_layers:
            raise ValueError(
                f"teacher layer {t} of pair [{s}, {t}] does not exist (the teacher has 0..{teacher_layers})"
            )
    return pairs


def new_projections(pairs: int, student_width: int, teacher_width: int, seed: int) -> torch.nn.ModuleList:
    """One bias-free linear map student width -> teacher width per pair (DistillKit's), xavier-uniform from `seed`.

    Drawn in a forked RNG: the same on every rank whatever ran before, and the training RNG streams stay as they were.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projections = torch.nn.ModuleList(
            torch.nn.Linear(student_width, teacher_width, bias=False) for _ in range(pairs)
        )
        for projection in projections:
            torch.nn.init.xavier_uniform_(projection.weight)  # (Ht, Hs)
    return projections
