"""The math of distillation: pure functions on tensors, shared by every path (online, fused, cache, on-policy).

objective.py      the Objective value (divergence, β, α, τ, the two weights; "is this forward KL?")
dense.py          per-token divergences (forward/reverse KL, JSD, skew KL, TVD), cross-entropy, the reference loss
sparse.py         the same objectives against stored top-k / sampled teacher targets with a tail (offline cache)
heads.py          a causal LM's output head (bias, soft-capping, logit scale) and its backbone's hidden states
fused.py          chunked head + divergence + gradient: never builds (tokens x vocabulary) logits
hidden.py         hidden-state distillation (TinyBERT / DistillKit): layer pairs, cosine / MSE per token, projections
cross_tokenizer.py  teacher and student with different vocabularies: ULD, shared pieces + a tail, at aligned positions
token_metrics.py  evaluation sums (CE, KL, agreement, top-1) through the same chunked head path

`from distill.losses import distillation_loss` is the public entry point (see the README's Python section).
"""

from distill.losses.dense import DIVERGENCES, IGNORE_INDEX, distillation_loss, loss_sums, token_divergence
from distill.losses.objective import Objective

__all__ = ["DIVERGENCES", "IGNORE_INDEX", "Objective", "distillation_loss", "loss_sums", "token_divergence"]
