"""The output head of a causal LM, taken apart so that logits can be computed a few tokens at a time.

A Hugging Face causal LM computes ``logits = post(lm_head(backbone(input_ids)))``. The fused loss
(`distill.losses.fused`) needs the two halves separately: the backbone's last hidden states, which are small
(tokens × hidden), and the head, so that it can form the large (tokens × vocabulary) logits one chunk at a
time and never hold all of them.

`post` is model-specific. In transformers 5.x it is, after the linear layer:

- Cohere / Cohere2: ``logits * logit_scale`` (``CohereForCausalLM.logit_scale`` from the config).
- Granite family: ``logits / config.logits_scaling``.
- Gemma2 / Gemma3 (and relatives): ``tanh(logits / final_logit_softcapping) * final_logit_softcapping``.

`OutputHead` applies them in that order (scale, then softcap); no shipped model uses both. A model with any
other post-processing is not described correctly by `output_head`; `verify_output_head` catches that by
comparing against the model's own forward pass on a few tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's final projection: ``softcap(scale · (hidden @ weightᵀ + bias))``.

    Attributes:
        weight: (V, H) projection, possibly with more rows than the tokenizer has tokens (padded vocabularies).
            For tied embeddings this is the embedding matrix itself, so gradients reach it once through autograd.
        bias: (V,) or None.
        logit_scale: multiplier applied after the projection (Cohere's ``logit_scale``, 1/Granite's
            ``logits_scaling``); 1.0 for most models.
        softcap: Gemma-style final logit soft-capping value, or None for none.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def rows(self) -> int:
        """Number of output rows of the projection (the model's vocabulary size, padding included)."""
        return self.weight.shape[0]

    def finish(self, raw_logits: torch.Tensor) -> torch.Tensor:
        """Scale, then softcap, the projection ``hidden @ weightᵀ + bias``. (..., V) -> (..., V)."""
        logits = raw_logits
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits in the weight's dtype, as the model's forward computes them. (..., H) -> (..., V)."""
        return self.finish(nn.functional.linear(hidden, self.weight, self.bias))


def _text_config(model: nn.Module):
    config = model.config
    # Multimodal wrappers keep the language model's settings in a sub-config.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_head(model: nn.Module) -> OutputHead:
    """Describe the output head of a Hugging Face causal LM. Raises ValueError if it is not a linear layer."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no linear output head (get_output_embeddings() gave {head!r})")
    config = _text_config(model)
    scale = 1.0
    # Cohere keeps the multiplier as a plain float attribute of the model, which is what its forward uses; a
    # tensor attribute of that name (CLIP-style learned temperatures) means something else and is ignored.
    model_scale = getattr(model, "logit_scale", None)
    if isinstance(model_scale, (int, float)) and not isinstance(model_scale, bool):
        scale *= float(model_scale)
    granite_scaling = getattr(config, "logits_scaling", None)
    if isinstance(granite_scaling, (int, float)) and granite_scaling:
        scale /= float(granite_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(
        weight=head.weight,
        bias=getattr(head, "bias", None),
        logit_scale=scale,
        softcap=float(softcap) if softcap else None,
    )


def backbone(model: nn.Module) -> nn.Module:
    """The module that maps input ids to the last (normed) hidden states, without the output head."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    for name in ("model", "transformer"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError(f"cannot find the backbone of {type(model).__name__}")


def backbone_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """The backbone's output of a causal LM, without its logits: `.last_hidden_state` (B, T, H) and, with
    `output_hidden_states=True`, `.hidden_states` (L + 1 tensors (B, T, H): the embeddings, then each layer's output).

    Extra keyword arguments (position_ids, output_hidden_states, ...) go to the backbone unchanged.
    """
    kwargs.setdefault("use_cache", False)  # whole sequences, no cache to keep (`forward_inputs` passes it too)
    return backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def backbone_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """Last hidden states of a causal LM without computing its logits. (B, T) -> (B, T, H)."""
    return backbone_outputs(model, input_ids, attention_mask, **kwargs).last_hidden_state


@torch.no_grad()
def verify_output_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    head: OutputHead | None = None,
    rtol: float = 1e-3,
) -> None:
    """Raise ValueError if ``head.logits(backbone_hidden_states(...))`` differs from the model's own logits.

    Meant to run once on a few tokens before training with the fused loss, so an architecture whose head
    post-processing `output_head` does not know about fails loudly instead of training on wrong logits.

    One forward pass, not two: the backbone's hidden states are taken from inside the model's own forward (a hook
    on `backbone(model)`), which is the module `backbone_hidden_states` calls. A forward pass of a model on a few
    tokens costs what reading all its weights costs, so this halves the check (a fixed cost of every fused run).
    A model whose forward does not go through its backbone exactly once is checked with a separate backbone call.
    """
    head = output_head(model) if head is None else head
    seen = []
    keep = lambda _module, _args, output: seen.append(getattr(output, "last_hidden_state", None))  # noqa: E731
    hook = backbone(model).register_forward_hook(keep)
    try:
        expected = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    finally:
        hook.remove()
    once = len(seen) == 1 and seen[0] is not None
    hidden = seen[0] if once else backbone_hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    got = head.logits(hidden).float()  # (B, T, V), expected too
    error = (got - expected).abs().max()
    scale = expected.abs().max().clamp_min(1e-6)
    if got.shape != expected.shape or not bool(error <= rtol * scale):
        raise ValueError(
            f"the output head of {type(model).__name__} does not reproduce its logits "
            f"(max abs error {float(error):.3g}); the fused loss cannot be used with this architecture"
        )
