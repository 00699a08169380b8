"""What to keep: importance scores for layers, embedding channels, MLP neurons and attention heads.

With calibration data (activation-based, measured with forward hooks in one pass over the data):
  layers    block influence, ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
            Redundant Than You Expect"): 1 - cos(layer input, layer output), averaged over tokens. A layer that
            barely turns the hidden state does little and goes first.
  neurons   mean |activation| of the MLP intermediate (the input of down_proj), per layer.  Minitron
  heads     mean L2 norm of each head's attention output (the input of o_proj, split by head), per layer.  Minitron
  channels  mean |output| of every residual-stream RMSNorm, summed over the norms.  Minitron
            (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation")

Without calibration data, width falls back on weight magnitudes (see `weight_importance`) and depth on a uniform
choice of layers (the caller's business: there is no block influence without activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.student.architecture import HIDDEN_NORMS, NORM_OFFSET


@dataclass
class Importance:
    """Scores, higher = keep. Per-layer lists are indexed by the teacher's layer number."""

    source: str  # "activations" or "weights"
    hidden: torch.Tensor  # (H,)
    neurons: list[torch.Tensor]  # L x (I,)
    heads: list[torch.Tensor]  # L x (heads,)
    block_influence: list[float] | None = None  # L, only from activations
    tokens: int = 0


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def activation_importance(model, examples, max_tokens: int, head_dim: int) -> Importance:
    """Run `examples` (lists of token ids) through the teacher, one sequence at a time, and score everything.

    One sequence per forward means no padding to mask out; calibration sets are small, so the lost batching is cheap.
    """
    layers = model.model.layers
    device = next(model.parameters()).device
    # Sums stay on the model's device until the end: no host sync per forward.
    acc = {
        "hidden": torch.zeros(model.config.hidden_size, device=device),
        "neurons": [None] * len(layers),
        "heads": [None] * len(layers),
        "influence": torch.zeros(len(layers), device=device),
    }

    def add(slot, index, value):
        acc[slot][index] = value if acc[slot][index] is None else acc[slot][index] + value

    def on_layer(index):
        def hook(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).float()  # (B, T, H)
            y = _first_tensor(output).float()  # (B, T, H)
            acc["influence"][index] += (1 - F.cosine_similarity(x, y, dim=-1)).sum()

        return hook

    def on_down_proj(index):
        def hook(module, args):
            add("neurons", index, args[0].float().abs().sum(dim=(0, 1)))  # (I,)

        return hook

    def on_o_proj(index):
        def hook(module, args):
            x = args[0].float()  # (B, T, heads * head_dim)
            per_head = x.view(*x.shape[:-1], -1, head_dim)  # (B, T, heads, head_dim)
            add("heads", index, per_head.norm(dim=-1).sum(dim=(0, 1)))  # (heads,)

        return hook

    def on_norm(module, args, output):
        acc["hidden"] += output.float().abs().sum(dim=(0, 1))  # (H,)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        for name in HIDDEN_NORMS:
            if hasattr(layer, name):
                handles.append(getattr(layer, name).register_forward_hook(on_norm))
    handles.append(model.model.norm.register_forward_hook(on_norm))

    tokens = 0
    try:
        for ids in examples:
            ids = ids[: max(0, max_tokens - tokens)]
            if not ids:
                break
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            tokens += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    tokens = max(tokens, 1)
    return Importance(
        source="activations",
        hidden=(acc["hidden"] / tokens).cpu(),
        neurons=[(n / tokens).cpu() for n in acc["neurons"]],
        heads=[(h / tokens).cpu() for h in acc["heads"]],
        block_influence=(acc["influence"] / tokens).cpu().tolist(),
        tokens=tokens,
    )


def weight_importance(state: dict[str, torch.Tensor], config, head_dim: int) -> Importance:
    """Magnitude-based scores when there is no calibration data (a weaker signal than activations).

    channel c: L2 norm of embedding column c times the mean |scale| the residual-stream norms give it
    neuron i:  ||gate row i|| * ||up row i|| * ||down column i||  (the three weights a neuron's signal passes)
    head h:    ||q_proj rows of h|| * ||o_proj columns of h||
    """
    offset = NORM_OFFSET.get(config.model_type, 0.0)
    norms = [v.float() + offset for k, v in state.items() if k.endswith("layernorm.weight") or k == "model.norm.weight"]
    hidden = state["model.embed_tokens.weight"].float().norm(dim=0)  # (H,)
    if norms:
        hidden = hidden * torch.stack(norms).abs().mean(dim=0)
    neurons, heads = [], []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        gate, up = state[p + "mlp.gate_proj.weight"].float(), state[p + "mlp.up_proj.weight"].float()  # (I, H)
        down = state[p + "mlp.down_proj.weight"].float()  # (H, I)
        neurons.append(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))
        q = state[p + "self_attn.q_proj.weight"].float()  # (heads * head_dim, H)
        o = state[p + "self_attn.o_proj.weight"].float()  # (H, heads * head_dim)
        q_norm = q.view(-1, head_dim, q.shape[1]).norm(dim=(1, 2))  # (heads,)
        o_norm = o.view(o.shape[0], -1, head_dim).norm(dim=(0, 2))  # (heads,)
        heads.append(q_norm * o_norm)
    return Importance(source="weights", hidden=hidden, neurons=neurons, heads=heads)
