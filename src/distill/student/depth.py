"""Which layers to keep, chosen by measurement: the KL to the teacher on calibration data.

The question depth pruning asks is "which k of the teacher's L layers, run alone, give distributions closest to the
teacher's?", and distillation then minimizes exactly that distance. So the layers are scored by it: mean over
calibration tokens of KL(teacher ‖ teacher with only the kept layers), at temperature 1, the `kl_to_teacher` of the
report. That is the removal-effect criterion of Minitron (Muralidharan et al. 2024, who measure the LM loss with
layers removed) and Shortened LLaMA (Kim et al. 2024, perplexity with a block removed), with the teacher's own
distribution as the reference. Block influence (ShortGPT) judges each layer alone by how much it turns the hidden
state; it cannot see that two layers are redundant only together, or that a quiet layer is one the head relies on.

Search (`search_layers`), in forward passes of the teacher with some layers left out:
  exhaustive  every one of the C(L, k) subsets: C(L, k) passes of a k-layer model, the best subset on calibration.
  greedy      drop one layer at a time, the one whose removal raises the calibration KL least, then re-measure:
              the round that starts from m layers scores m subsets of m - 1 layers, so L→k costs sum_{m=k+1..L} m
              passes (30 → 15: 345 passes).
  auto        exhaustive when it needs no more decoder-layer forwards than greedy (C(L, k)·k <= sum m·(m−1)); it is
              then the cheaper search and also the optimal one. That covers every k <= 2, k = L - 1, and small
              teachers (6 → 3: 20 subsets, 60 layer forwards, vs greedy's 15 passes and 62 layer forwards); for
              deep teachers C(L, k) explodes (30 → 15: 155 million) and greedy is used.

No model is copied: `layer_subset` swaps the decoder's ModuleList for one holding the kept layers (the same module
objects) and restores it. The calibration batch and the teacher's log-probabilities on it are computed once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from distill.losses.dense import divergence_from_log_probs, log_probs
from distill.losses.objective import Objective

SEARCHES = ("auto", "exhaustive", "greedy")


@contextmanager
def layer_subset(model, kept: Sequence[int]) -> Iterator[None]:
    """Inside the block, `model` runs only the decoder layers `kept` (teacher indices, ascending); no weights move.

    Decoders loop over `model.model.layers[: config.num_hidden_layers]` and look up each layer's attention type in
    `config.layer_types[i]` (sliding vs full), so those two follow the subset too. Run it with use_cache=False: the
    attention modules keep their teacher `layer_idx`, which only matters for a KV cache.
    """
    decoder, config = model.model, model.model.config
    layers, count, types = decoder.layers, config.num_hidden_layers, getattr(config, "layer_types", None)
    decoder.layers = torch.nn.ModuleList([layers[i] for i in kept])
    config.num_hidden_layers = len(kept)
    if types is not None:
        config.layer_types = [types[i] for i in kept]
    try:
        yield
    finally:
        decoder.layers = layers
        config.num_hidden_layers = count
        if types is not None:
            config.layer_types = types


class CalibrationKL:
    """kept layers -> mean KL(teacher ‖ teacher with only those layers) over the calibration tokens, in nats.

    The token batches and the full teacher's log-probabilities on them are built once, on the model's device.
    Counts what it costs: `passes` (subsets scored) and `layer_forwards` (decoder layers run over all tokens).
    """

    def __init__(self, model, examples: Sequence[Sequence[int]], max_tokens: int, batch_tokens: int = 4096):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.batches = _batches(examples, max_tokens, batch_tokens, self.device)
        self.tokens = sum(b.numel() for b in self.batches)
        if self.tokens == 0:
            raise ValueError("no calibration tokens")
        with torch.no_grad():
            self.teacher = [self._log_probs(ids) for ids in self.batches]  # each (B, T, V) float32
        self.passes = 0
        self.layer_forwards = 0

    def _log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        return log_probs(self.model(input_ids=ids, use_cache=False).logits)  # (B, T, V)

    @torch.no_grad()
    def __call__(self, kept: Sequence[int]) -> float:
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        with layer_subset(self.model, kept):
            for ids, teacher in zip(self.batches, self.teacher, strict=True):
                total += divergence_from_log_probs(
                    self._log_probs(ids), teacher, Objective("forward_kl")
                ).sum()  # (B, T) summed
        self.passes += 1
        self.layer_forwards += len(kept)
        return float(total) / self.tokens  # one host sync per subset, not per batch


def _spread(examples: Sequence[Sequence[int]], max_tokens: int) -> list[Sequence[int]]:
    """Sequences evenly spaced over all of `examples`, about as many as `max_tokens` holds. Packed calibration
    data holds its documents in order, so its first blocks would all come from the first file or two."""
    total = sum(len(e) for e in examples)
    if total <= max_tokens:
        return list(examples)
    count = max(1, math.ceil(len(examples) * max_tokens / total))
    return [examples[i * len(examples) // count] for i in range(count)]


def _batches(examples, max_tokens: int, batch_tokens: int, device) -> list[torch.Tensor]:
    """Up to `max_tokens` tokens, spread over the examples, as (B, T) batches of equal-length sequences (no
    padding to mask out)."""
    by_length: dict[int, list[list[int]]] = {}
    left = max_tokens
    for ids in _spread(examples, max_tokens):
        ids = list(ids[: max(0, left)])
        if not ids:
            break
        by_length.setdefault(len(ids), []).append(ids)
        left -= len(ids)
    batches = []
    for length, rows in by_length.items():
        per_batch = max(1, batch_tokens // length)
        for start in range(0, len(rows), per_batch):
            batches.append(torch.tensor(rows[start : start + per_batch], device=device))  # (B, T)
    return batches


@dataclass
class LayerSearch:
    """The kept layers (teacher indices, ascending), their calibration KL, and what finding them cost."""

    kept: list[int]
    kl: float
    method: str  # "exhaustive" or "greedy"
    passes: int  # subsets scored, each one pass over the calibration tokens
    layer_forwards: int  # decoder-layer passes over the calibration tokens, summed over those subsets
    # greedy: one entry per round, {"dropped": teacher layer, "kl": calibration KL after dropping it}
    rounds: list[dict] = field(default_factory=list)


def exhaustive_cost(total: int, keep: int) -> int:
    """Decoder-layer forwards of the exhaustive search: C(L, k) subsets of k layers."""
    return math.comb(total, keep) * keep


def greedy_cost(total: int, keep: int) -> int:
    """Decoder-layer forwards of the greedy search: the round from m layers scores m subsets of m - 1 layers."""
    return sum(m * (m - 1) for m in range(keep + 1, total + 1))


def search_layers(score: Callable[[list[int]], float], total: int, keep: int, method: str = "auto") -> LayerSearch:
    """Keep `keep` of `total` layers, minimizing `score(kept)` (lower is better): see the module docstring."""
    if method not in SEARCHES:
        raise ValueError(f"search {method!r}: expected one of {', '.join(SEARCHES)}")
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if method == "auto":
        method = "exhaustive" if exhaustive_cost(total, keep) <= greedy_cost(total, keep) else "greedy"
    if keep == total:
        return LayerSearch(list(range(total)), 0.0, method, 0, 0)
    if method == "exhaustive":
        return _exhaustive(score, total, keep)
    return _greedy(score, total, keep)


def _exhaustive(score, total: int, keep: int) -> LayerSearch:
    best, best_kl = None, math.inf
    for kept in itertools.combinations(range(total), keep):  # lexicographic: ties go to the earlier layers
        kl = score(list(kept))
        if kl < best_kl:
            best, best_kl = list(kept), kl
    return LayerSearch(best, best_kl, "exhaustive", math.comb(total, keep), exhaustive_cost(total, keep))


def _greedy(score, total: int, keep: int) -> LayerSearch:
    kept, rounds, kl = list(range(total)), [], 0.0
    while len(kept) > keep:
        # Ties go to the earlier layer, so the result does not depend on float noise order.
        kl, dropped = min((score([i for i in kept if i != j]), j) for j in kept)
        kept.remove(dropped)
        rounds.append({"dropped": dropped, "kl": kl})
    passes = sum(range(keep + 1, total + 1))
    return LayerSearch(kept, kl, "greedy", passes, greedy_cost(total, keep), rounds)
