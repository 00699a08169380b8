"""Which axis of which parameter is what, for Llama-style decoders.

Every supported model is `model.embed_tokens` -> `model.layers[i]` (self_attn q/k/v/o, mlp gate/up/down, RMSNorms)
-> `model.norm` -> `lm_head`. Each parameter dimension is one of these kinds:

  hidden   the residual stream (embedding channels), pruned together everywhere
  inter    MLP neurons of one layer
  q        query heads x head_dim of one layer (rows of q_proj, columns of o_proj)
  kv       key/value heads x head_dim of one layer (rows of k_proj and v_proj)
  fixed    never pruned (vocabulary, head_dim of Qwen3/Gemma3 q_norm/k_norm)

The table is explicit on purpose: a parameter it does not know is an error, never a silent copy.
"""

from __future__ import annotations

import re

from distill.errors import DistillError

# model_type -> the extra norms its decoder layers carry beyond input/post-attention. Tested in tests/test_student.py.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

# Gemma's RMSNorm multiplies by (1 + weight), the others by weight; importance and rescaling need the real scale.
NORM_OFFSET = {"gemma": 1.0, "gemma2": 1.0, "gemma3_text": 1.0}

# Gemma multiplies embeddings by sqrt(hidden_size), so the scale changes when the hidden size does.
EMBED_SCALED = ("gemma", "gemma2", "gemma3_text")

TOP_LEVEL = {
    "model.embed_tokens.weight": ("fixed", "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": ("fixed", "hidden"),
}

IN_LAYER = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "self_attn.q_norm.weight": ("fixed",),
    "self_attn.k_norm.weight": ("fixed",),
    "mlp.gate_proj.weight": ("inter", "hidden"),
    "mlp.gate_proj.bias": ("inter",),
    "mlp.up_proj.weight": ("inter", "hidden"),
    "mlp.up_proj.bias": ("inter",),
    "mlp.down_proj.weight": ("hidden", "inter"),
    "mlp.down_proj.bias": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "pre_feedforward_layernorm.weight": ("hidden",),
    "post_feedforward_layernorm.weight": ("hidden",),
}

# Norms over the residual stream: their outputs measure embedding-channel importance (Minitron).
HIDDEN_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)

REQUIRED_IN_LAYER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
REQUIRED_CONFIG = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def split_name(name: str) -> tuple[int | None, str]:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); top-level names -> (None, name)."""
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def axes_of(name: str) -> tuple[str, ...] | None:
    """The kind of each dimension of parameter `name`, or None when the table does not know it."""
    layer, rest = split_name(name)
    return IN_LAYER.get(rest) if layer is not None else TOP_LEVEL.get(rest)


def check_supported(config, names: list[str]) -> None:
    """Raise a one-line DistillError naming the model_type and what it lacks, unless pruning can handle it."""
    model_type = getattr(config, "model_type", "?")
    missing_config = [key for key in REQUIRED_CONFIG if getattr(config, key, None) is None]
    unknown = [n for n in names if axes_of(n) is None]
    present = {split_name(n)[1] for n in names if split_name(n)[0] == 0}
    missing = [f"model.layers.N.{r}" for r in REQUIRED_IN_LAYER if r not in present]
    if model_type in SUPPORTED and not (missing_config or unknown or missing):
        return
    problems = []
    if missing_config:
        problems.append(f"config lacks {', '.join(missing_config)}")
    if missing:
        problems.append(f"no {', '.join(missing[:3])}")
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        problems.append(f"unknown parameters {', '.join(unknown[:3])}{more}")
    if model_type not in SUPPORTED and not problems:
        problems.append("its layout matches but it is not tested")
    raise DistillError(
        f"cannot prune model_type {model_type!r}: {'; '.join(problems)} "
        f"(supported: {', '.join(SUPPORTED)} - Llama-style q/k/v/o_proj + gate/up/down_proj decoders)"
    )
