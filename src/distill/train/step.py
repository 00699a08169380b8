"""One optimizer step: the student's loss as one module (`StudentLoss`), the teacher's signal of a micro-batch
(`step_loss`), the step's micro-batches (`step_batches`) and the accumulate-clip-update of a step (`optimizer_step`).

The loss of a step is the sum over every loss token of the global batch divided by the number of those tokens,
whatever the split into micro-batches and ranks.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from distill.config import ObjectiveConfig, Recipe
from distill.data import collate, forward_inputs, step_example_indices
from distill.losses.dense import IGNORE_INDEX
from distill.losses.objective import Objective
from distill.models import Models
from distill.train.parallel import clip_gradients, gathered_for_inference, no_gradient_sync


class StudentLoss(nn.Module):
    """forward(model inputs, labels, normalizer, teacher signal) -> (loss to back-propagate, kd sum, ce sum).

    The model inputs are `distill.data.forward_inputs` of the batch (position ids instead of a mask when packed).

    The sums run over the micro-batch's loss tokens; the loss is (kd_weight·kd_sum + ce_weight·ce_sum) / normalizer.
    Exactly one teacher signal is given: full `teacher_logits` (B, T-1, V), `teacher_hidden` (B, T-1, Ht) with the
    head set at construction (fused path), `sparse` targets (a cache), or none (hard labels only).
    """

    def __init__(self, student: nn.Module, objective: ObjectiveConfig, vocab_size: int, teacher_head=None):
        super().__init__()
        self.student = student
        self.objective = Objective.from_config(objective)
        self.fused = objective.fused
        self.vocab_size = vocab_size
        self.teacher_head = teacher_head  # an OutputHead (plain object, not registered: the teacher is not trained)

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        normalizer: float,
        teacher_logits: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        sparse=None,
    ):
        o = self.objective
        if self.fused:
            return self._fused(inputs, labels, normalizer, teacher_hidden, sparse)
        logits = self.student(**inputs).logits
        logits = logits[:, :-1, : self.vocab_size]  # (B, T-1, V): output i predicts token i+1
        if sparse is not None:
            from distill.losses.sparse import sparse_loss_sums

            kd_sum, ce_sum = sparse_loss_sums(
                logits.reshape(-1, logits.shape[-1]),  # (B·(T-1), V)
                sparse,
                labels.reshape(-1),  # (B·(T-1),)
                o,
            )
        else:
            from distill.losses.dense import loss_sums

            kd_sum, ce_sum = loss_sums(logits, teacher_logits, labels, o)
        loss = (o.kd_weight * kd_sum + o.ce_weight * ce_sum) / normalizer
        return loss, kd_sum.detach(), ce_sum.detach()

    def _fused(self, inputs, labels, normalizer, teacher_hidden, sparse):
        from distill.losses.fused import fused_loss_sums
        from distill.losses.heads import backbone_hidden_states, output_head

        hidden = backbone_hidden_states(self.student, **inputs)[:, :-1]  # (B, T-1, H)
        return fused_loss_sums(
            hidden,
            output_head(self.student),
            labels,
            objective=self.objective,
            teacher_hidden=teacher_hidden,
            teacher_head=self.teacher_head if teacher_hidden is not None else None,
            sparse=sparse,
            vocab_size=self.vocab_size,
            normalizer=normalizer,
        )


def step_loss(
    loss_module, models: Models, batch: dict[str, torch.Tensor], recipe: Recipe, normalizer: float, teacher_signal
):
    """(loss to back-propagate, divergence sum, cross-entropy sum) of one micro-batch.

    The teacher's signal is computed here, without gradients: stored targets from a cache, the teacher's last
    hidden states (fused path: its head is applied chunk by chunk inside the loss) or its logits. The student's
    side runs inside `loss_module` (a `StudentLoss`, possibly wrapped by DDP or FSDP). The sums
    run over the micro-batch's loss tokens; the loss is kd_weight·kd_sum + ce_weight·ce_sum divided by
    `normalizer`, the global batch's loss-token count (per rank).
    """
    from distill.losses.heads import backbone_hidden_states

    o = recipe.objective
    inputs, labels = forward_inputs(batch), batch["labels"]
    signal = {}
    if o.kd_weight > 0 and teacher_signal is not None:
        # Stored targets, one row per position of the (B, T-1) label grid.
        signal["sparse"] = teacher_signal.targets(batch["example_index"], labels.shape[1], labels.device)
    elif o.kd_weight > 0 and models.teacher is not None:
        with torch.no_grad():
            if o.fused:
                hidden = backbone_hidden_states(models.teacher, **inputs)
                signal["teacher_hidden"] = hidden[:, :-1]  # (B, T-1, Ht)
            else:
                logits = models.teacher(**inputs).logits
                signal["teacher_logits"] = logits[:, :-1, : models.vocab_size]  # (B, T-1, V)
    return loss_module(inputs, labels, normalizer, **signal)


def step_batches(run, recipe: Recipe, step: int, on_policy, accelerator) -> tuple[list[dict], int]:
    """(this rank's micro-batches of step `step`, the global batch's loss-token count).

    The data order is a pure function of the step number (exact resume); on an on-policy step (GKD) the student's
    own completions of the same prompts replace the data.
    """
    t, per_rank, micro = recipe.training, run.per_rank, run.micro
    indices = step_example_indices(len(run.train_examples), t.seed, step, t.batch_size)
    mine = indices[run.rank * per_rank : (run.rank + 1) * per_rank]
    micro_examples = [[run.train_examples[i] for i in mine[j : j + micro]] for j in range(0, per_rank, micro)]
    with gathered_for_inference(run.loss_module) if on_policy.chooses(step) else nullcontext():
        micro_examples = on_policy.examples(run.models.student, step, run.rank, micro_examples)
    batches = [collate(examples, run.pad_id) for examples in micro_examples]
    for j, b in enumerate(batches):
        b["example_index"] = torch.tensor(mine[j * micro : (j + 1) * micro])  # (B,) for a teacher cache
    global_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    if run.world > 1:
        global_tokens = int(accelerator.reduce(torch.tensor(global_tokens, device=accelerator.device), "sum"))
    return batches, global_tokens


def optimizer_step(run, recipe: Recipe, batches: list[dict], global_tokens: int, accelerator):
    """Accumulate the micro-batches' gradients, clip, update: returns ((kd, ce) means of the global batch (2,),
    the gradient norm before clipping)."""
    t, device = recipe.training, accelerator.device
    # DDP averages gradients over ranks, so each rank divides by the global count / world size.
    normalizer = max(global_tokens, 1) / run.world
    step_sums = torch.zeros(2, device=device)
    for j, batch in enumerate(batches):
        # Example indices stay on the host: the cache reader needs them there, and copying back would sync.
        batch = {k: v if k == "example_index" else v.to(device) for k, v in batch.items()}
        sync = j == len(batches) - 1
        # Backward inside too: FSDP2 decides whether to reduce gradients during backward, DDP in forward.
        with nullcontext() if sync else no_gradient_sync(run.loss_module, accelerator, run.strategy):
            with accelerator.autocast():
                loss, kd_sum, ce_sum = step_loss(
                    run.loss_module, run.models, batch, recipe, normalizer, run.teacher_signal
                )
            accelerator.backward(loss)
        step_sums += torch.stack([kd_sum.float(), ce_sum.float()])
    # With clipping off the norm is still measured (an infinite threshold clips nothing): a user watching
    # for exploding gradients needs it most when nothing holds them back.
    max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
    grad_norm = clip_gradients(run.loss_module, accelerator, max_norm, run.strategy)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.world > 1:  # the logged loss is the global batch's, not this rank's share of it
        step_sums = accelerator.reduce(step_sums, "sum")
    return step_sums / max(global_tokens, 1), grad_norm
