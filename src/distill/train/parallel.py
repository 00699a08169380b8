"""Training over several processes: DDP or FSDP2 around the student's loss module, clipping, and state dicts.

Launch with `torchrun --nproc_per_node N -m distill train RECIPE` or `accelerate launch -m distill train RECIPE`;
accelerate reads the launcher's environment and sets up the process group (gloo on CPU, nccl on GPUs).

Why a module around the student *and* its loss: the fused loss multiplies hidden states by the output head's
weight outside the model's own forward. A DDP or FSDP wrapper only sees what runs inside the forward of the module
it wraps — under FSDP2 the head's weight is a shard everywhere else — so the wrapped module's forward is the whole
loss computation (`distill.train.step.StudentLoss`), and every use of a student weight happens where the wrapper
expects it.

The teacher is never trained. Under FSDP2 its decoder layers are sharded (each is gathered for its forward and
freed after it); its embeddings, final norm and output head stay whole on every rank because the fused loss reads
the head outside any forward. This is the memory a teacher costs per rank: its layers / N plus those three.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from distill.errors import DistillError

# ---------------------------------------------------------------- strategies


def pick_strategy(requested: str, world: int) -> str:
    """'single', 'ddp' or 'fsdp' for this launch.

    FSDP2 also on one process when a launcher set up a process group (`torchrun --nproc_per_node 1`): the same
    sharded code path on one GPU, checked by benchmarks/gpu_check.py. A plain one-process run is 'single'."""
    import torch.distributed as dist

    if requested == "fsdp" and (world > 1 or (dist.is_available() and dist.is_initialized())):
        return "fsdp"
    return "single" if world == 1 else "ddp"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes): FSDP's sharding units."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistillError(
            f"training.distributed=fsdp: cannot find the decoder layers of {type(model).__name__} "
            "(it declares no _no_split_modules); use training.distributed=ddp"
        )
    return layers


def shard_student(loss_module: nn.Module, mixed_precision: str) -> nn.Module:
    """FSDP2 around a `distill.train.step.StudentLoss`: each decoder layer is one unit, the rest (embeddings,
    norm, head) the root unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed_precision in ("bf16", "fp16"):
        low = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    for layer in decoder_layers(loss_module.student):
        fully_shard(layer, mp_policy=policy)
    fully_shard(loss_module, mp_policy=policy)
    return loss_module


def shard_teacher(teacher: nn.Module, device: torch.device) -> None:
    """FSDP2 for a frozen teacher on CPU: its layers reach `device` as shards (gathered for their forward, freed
    after it); embeddings, norm and head move to `device` whole."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for layer in decoder_layers(teacher):
        fully_shard(layer, reshard_after_forward=True)
        # Each layer is its own FSDP root, and roots keep their weights gathered after forward by default
        # (training would gather them again for backward); a teacher has no backward, so free them.
        layer.set_reshard_after_forward(True)
    with torch.no_grad():
        for tensor in [*teacher.parameters(), *teacher.buffers()]:
            if not isinstance(tensor, DTensor):
                tensor.data = tensor.data.to(device)
    # A teacher half on the wrong device fails late and obscurely (a known FSDP pitfall): check every tensor now.
    for name, tensor in [*teacher.named_parameters(), *teacher.named_buffers()]:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.device.type != device.type:
            raise RuntimeError(f"teacher tensor {name} is on {local.device} after sharding, not on {device}")


@contextmanager
def gathered_for_inference(module: nn.Module):
    """Run the student outside the wrapped forward (evaluation, sampling): FSDP2's root weights gathered."""
    unshard = getattr(module, "unshard", None)
    if unshard is None:
        yield
        return
    # Sampling can come before the first training forward, and FSDP2 sets up its root state in that forward;
    # unshard() on a module whose layers were never run as part of the root refuses, so set it up here.
    module._get_fsdp_state()._lazy_init()  # private torch API (2.6-2.13); no public equivalent yet
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def no_gradient_sync(module: nn.Module, accelerator, strategy: str):
    """Skip the gradient all-reduce of a micro-batch that is not the step's last."""
    if strategy == "fsdp":
        return _fsdp_no_sync(module)
    return accelerator.no_sync(module)


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def clip_gradients(module: nn.Module, accelerator, max_norm: float, strategy: str) -> torch.Tensor:
    """Clip the global gradient norm (over all shards and ranks); returns the norm before clipping."""
    if strategy != "fsdp":
        return accelerator.clip_grad_norm_(module.parameters(), max_norm)
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---------------------------------------------------------------- state dicts


def full_state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool = False):
    """(model, optimizer) state dicts, whole, on CPU, keyed by parameter names; empty on ranks other than 0.

    Every rank must call this (FSDP gathers the shards). Works the same for a plain, DDP or FSDP2 module.
    `trainable_only` leaves out frozen parameters (a LoRA student's base: checkpoints hold the adapter only).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    model_state = get_model_state_dict(module, options=options)
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options) if optimizer is not None else None
    return model_state, optimizer_state


def load_full_state_dicts(module: nn.Module, optimizer, model_state: dict, optimizer_state: dict, world: int) -> None:
    """Inverse of `full_state_dicts`; with several processes only rank 0 needs the dicts (it broadcasts them).

    A module with frozen parameters (a LoRA student) loads a `trainable_only` state: its frozen ones stay as built.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    frozen = any(not p.requires_grad for p in module.parameters())
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1, strict=not frozen)
    set_model_state_dict(module, model_state, options=options)
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


def gather_objects(value, world: int) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered
