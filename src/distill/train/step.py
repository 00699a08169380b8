"""One optimizer step: the student's loss as one module (`StudentLoss`), the teacher's signal of a micro-batch
(`step_loss`), the step's micro-batches (`step_batches`) and the accumulate-clip-update of a step (`optimizer_step`).

The loss of a step is the sum over every loss token of the global batch divided by the number of those tokens,
whatever the split into micro-batches and ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from distill.config import ObjectiveConfig, Recipe
from distill.data import collate, forward_inputs, step_example_indices
from distill.errors import DistillError
from distill.losses.dense import IGNORE_INDEX
from distill.losses.objective import Objective
from distill.models import Models
from distill.train.lora import is_base_view
from distill.train.parallel import clip_gradients, gathered_for_inference, no_gradient_sync
from distill.train.served import ServedSignal


class StudentLoss(nn.Module):
    """forward(model inputs, labels, normalizer, teacher signal) -> (loss to back-propagate, kd, ce and hidden sums).

    The model inputs are `distill.data.forward_inputs` of the batch (position ids instead of a mask when packed).

    The sums run over the micro-batch's loss tokens; the loss is (kd_weight·kd_sum + ce_weight·ce_sum +
    hidden_weight·hidden_sum) / normalizer. Exactly one teacher signal is given: full `teacher_logits` (B, T-1, V),
    `teacher_hidden` (B, T-1, Ht) with the head set at construction (fused path), `sparse` targets (a cache), or none
    (hard labels only). With hidden-state distillation (`hidden_pairs`, `distill.losses.hidden`), `teacher_states` also
    holds the teacher's state (B, T-1, Ht) of each pair's teacher layer, and the student's come from the same forward
    that gives its logits (or, fused, its last hidden states): the backbone runs once.

    The projections from the student's width to the teacher's (one per pair, when the widths differ) are registered
    here, not in the student: DDP and FSDP2 wrap this module, so they train, reduce and shard with it, checkpoints
    hold them (`hidden_projections.*`), and the saved student (the `student.*` weights) does not.
    """

    def __init__(
        self,
        student: nn.Module,
        objective: ObjectiveConfig,
        vocab_size: int,
        teacher_head=None,
        hidden_pairs: Sequence[tuple[int, int]] = (),
        teacher_width: int | None = None,
        seed: int = 0,
        cross=None,
    ):
        super().__init__()
        self.student = student
        self.objective = Objective.from_config(objective)
        self.fused = objective.fused
        self.chunk_budget = objective.fused_chunk_mib * 2**20  # bytes of logits per fused chunk
        self.vocab_size = vocab_size
        self.teacher_head = teacher_head  # an OutputHead (plain object, not registered: the teacher is not trained)
        self.cross = cross  # a CrossObjective across tokenizers (distill.losses.cross_tokenizer), or None
        self.hidden_pairs = tuple(hidden_pairs) if self.objective.hidden_weight > 0 else ()
        self.hidden_projections = None
        student_width = _text_config(student).hidden_size
        if self.hidden_pairs and teacher_width is not None and teacher_width != student_width:
            from distill.losses.hidden import new_projections

            self.hidden_projections = new_projections(len(self.hidden_pairs), student_width, teacher_width, seed)

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        normalizer: float,
        teacher_logits: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        sparse=None,
        teacher_states: list[torch.Tensor] | None = None,
        cross=None,
    ):
        o = self.objective
        if cross is not None:  # the teacher's rows at the anchors of another tokenization (CrossTargets)
            loss, kd_sum, ce_sum = self._cross(inputs, labels, normalizer, cross)
            return loss, kd_sum, ce_sum, torch.zeros((), device=labels.device)
        # One forward of the student gives both its logits (or last hidden states) and the paired layers' states.
        states = {"output_hidden_states": True} if self.hidden_pairs else {}
        if self.fused:
            from distill.losses.heads import backbone_outputs

            outputs = backbone_outputs(self.student, **inputs, **states)
            loss, kd_sum, ce_sum = self._fused(outputs.last_hidden_state, labels, normalizer, teacher_hidden, sparse)
        else:
            outputs = self.student(**inputs, **states)
            loss, kd_sum, ce_sum = self._plain(outputs.logits, labels, normalizer, teacher_logits, sparse)
        hidden_sum = self._hidden_sum(outputs.hidden_states if states else None, teacher_states, labels)
        if self.hidden_pairs:
            loss = loss + o.hidden_weight * hidden_sum / normalizer
        return loss, kd_sum, ce_sum, hidden_sum.detach()

    def _fused(self, hidden, labels, normalizer, teacher_hidden, sparse):
        from distill.losses.fused import fused_loss_sums
        from distill.losses.heads import output_head

        # Teacher states without a teacher head: the teacher is the student's own base (LoRA self-distillation)
        # and shares its output head, read here, where FSDP has it gathered.
        teacher_head = self.teacher_head if self.teacher_head is not None else output_head(self.student)
        return fused_loss_sums(
            hidden[:, :-1],  # (B, T-1, H)
            output_head(self.student),
            labels,
            objective=self.objective,
            teacher_hidden=teacher_hidden,
            teacher_head=teacher_head if teacher_hidden is not None else None,
            sparse=sparse,
            vocab_size=self.vocab_size,
            normalizer=normalizer,
            memory_budget_bytes=self.chunk_budget,
        )

    def _plain(self, logits, labels, normalizer, teacher_logits, sparse):
        o = self.objective
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

    def _cross(self, inputs, labels, normalizer, targets):
        """Across tokenizers: the cross-entropy over every loss token, the divergence of objective.cross_tokenizer
        over the anchors only (a loss token without one adds nothing to it); both sums divided by `normalizer`."""
        from distill.losses.cross_tokenizer import cross_tokenizer_sum
        from distill.losses.dense import token_cross_entropy
        from distill.losses.heads import backbone_hidden_states, output_head

        o, c = self.objective, self.cross
        vocab_sizes = (self.vocab_size, c.teacher_vocab)
        if self.fused:
            from distill.losses.fused import fused_loss_sums

            hidden = backbone_hidden_states(self.student, **inputs)[:, :-1]  # (B, T-1, H)
            head = output_head(self.student)
            # No teacher given: the fused pass is the hard-label term (its kd sum is 0). Kept in the graph even at
            # ce_weight 0, so that a micro-batch without anchors still gives every parameter a (zero) gradient (DDP).
            ce_loss, _, ce_sum = fused_loss_sums(
                hidden,
                head,
                labels,
                objective=o,
                vocab_size=self.vocab_size,
                normalizer=normalizer,
                memory_budget_bytes=self.chunk_budget,
            )
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets.student_index)  # (N, H)
            kd_sum = cross_tokenizer_sum(rows, targets, o, c.mode, vocab_sizes, c.buckets, head, self.teacher_head)
        else:
            logits = self.student(**inputs).logits[:, :-1, : self.vocab_size]  # (B, T-1, V)
            ce_sum = token_cross_entropy(logits, labels).sum()  # 0 where labels are -100
            ce_loss = o.ce_weight * ce_sum / normalizer
            rows = logits.reshape(-1, logits.shape[-1]).index_select(0, targets.student_index)  # (N, V)
            kd_sum = cross_tokenizer_sum(rows, targets, o, c.mode, vocab_sizes, c.buckets)
        return ce_loss + o.kd_weight * kd_sum / normalizer, kd_sum.detach(), ce_sum.detach()

    def _hidden_sum(self, student_states, teacher_states, labels) -> torch.Tensor:
        """The hidden-state loss summed over the micro-batch's loss tokens (0 without hidden-state distillation)."""
        if not self.hidden_pairs:
            return torch.zeros((), device=labels.device)
        if teacher_states is None or len(teacher_states) != len(self.hidden_pairs):
            raise ValueError(f"hidden-state distillation needs the teacher's states of {len(self.hidden_pairs)} layers")
        from distill.losses.hidden import hidden_loss_sum

        # State i sits at the position whose output predicts token i+1, like the logits: (B, T-1, Hs) each.
        students = [student_states[s][:, :-1] for s, _ in self.hidden_pairs]
        if self.hidden_projections is not None:
            students = [p(h) for p, h in zip(self.hidden_projections, students, strict=True)]  # (B, T-1, Ht) each
        return hidden_loss_sum(students, teacher_states, labels != IGNORE_INDEX, self.objective.hidden_loss)


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_layer_pairs(recipe: Recipe, models: Models, log) -> tuple[list[tuple[int, int]], int | None]:
    """(the objective.hidden layer pairs for these models, the teacher's width); ([], None) when it is off."""
    h = recipe.objective.hidden
    if h.weight == 0 or models.teacher is None:
        return [], None
    from distill.losses.hidden import resolve_layer_pairs

    student, teacher = _text_config(models.student), _text_config(models.teacher)
    try:
        pairs = resolve_layer_pairs(h.layers, student.num_hidden_layers, teacher.num_hidden_layers)
    except ValueError as e:
        raise DistillError(f"recipe key objective.hidden.layers: {e}") from None
    widths = f"{student.hidden_size} -> {teacher.hidden_size}"
    projected = f"; learned projections {widths}" if student.hidden_size != teacher.hidden_size else ""
    log(f"hidden-state distillation ({h.loss}, weight {h.weight:g}): layer pairs {[list(p) for p in pairs]}{projected}")
    return pairs, teacher.hidden_size


def step_loss(
    loss_module, models: Models, batch: dict[str, torch.Tensor], recipe: Recipe, normalizer: float, teacher_signal
):
    """(loss to back-propagate, divergence sum, cross-entropy sum, hidden-state sum) of one micro-batch.

    The teacher's signal is computed here, without gradients: stored targets from a cache, the teacher's last
    hidden states (fused path: its head is applied chunk by chunk inside the loss) or its logits, plus (hidden-state
    distillation) its states at the paired layers, from the same forward. The student's
    side runs inside `loss_module` (a `StudentLoss`, possibly wrapped by DDP or FSDP). The sums
    run over the micro-batch's loss tokens; the loss is kd_weight·kd_sum + ce_weight·ce_sum + hidden_weight·hidden_sum
    divided by `normalizer`, the global batch's loss-token count (per rank).
    """
    from distill.losses.heads import backbone_outputs

    if getattr(teacher_signal, "routes", False):  # several teachers: each one's rows apart (distill.train.teachers)
        return teacher_signal.step_loss(loss_module, models, batch, recipe, normalizer, step_loss)
    o = recipe.objective
    inputs, labels = forward_inputs(batch), batch["labels"]
    pairs = getattr(getattr(loss_module, "module", loss_module), "hidden_pairs", ())  # DDP keeps it in .module
    states = {"output_hidden_states": True} if pairs else {}
    signal = {}
    if o.kd_weight > 0 and "cached_ids" in batch:  # across tokenizers from a cache: its rows at the anchors
        from distill.losses.cross_tokenizer import TopKCrossTargets

        rows = (batch[f"cached_{name}"] for name in ("ids", "log_probs", "log_rest", "log_rest_half"))
        signal["cross"] = TopKCrossTargets(batch["anchor_student"], batch["anchor_exact"], *rows)
    elif o.kd_weight > 0 and "teacher_input_ids" in batch and models.teacher is not None:
        from distill.train.cross import teacher_targets

        # Across tokenizers: the teacher reads its own tokenization of the text (`distill.train.cross`).
        signal["cross"] = teacher_targets(models.teacher, batch, o.fused, labels.device)
    elif o.kd_weight > 0 and teacher_signal is not None:
        # Stored targets, one row per position of the (B, T-1) label grid.
        signal["sparse"] = teacher_signal.targets(batch["example_index"], labels.shape[1], labels.device)
    elif o.kd_weight > 0 and models.teacher is not None:
        # The student's own base as the teacher (LoRA self-distillation) runs outside the wrapped forward: under FSDP
        # the root's weights are gathered for it, as for sampling.
        own = gathered_for_inference(loss_module) if is_base_view(models.teacher) else nullcontext()
        # A teacher on another device (teacher.device) gets its inputs there; its outputs come back to the student's.
        where = models.teacher.get_input_embeddings().weight.device
        teacher_inputs = forward_inputs(batch, where) if where != labels.device else inputs
        with torch.no_grad(), own:
            if o.fused:
                outputs = backbone_outputs(models.teacher, **teacher_inputs, **states)
                signal["teacher_hidden"] = outputs.last_hidden_state[:, :-1].to(labels.device)  # (B, T-1, Ht)
            else:
                outputs = models.teacher(**teacher_inputs, **states)
                signal["teacher_logits"] = outputs.logits[:, :-1, : models.vocab_size].to(labels.device)  # (B, T-1, V)
            if pairs:  # only the paired layers' states stay alive through the student's forward and backward
                signal["teacher_states"] = [outputs.hidden_states[t][:, :-1].to(labels.device) for _, t in pairs]
            del outputs
    return loss_module(inputs, labels, normalizer, **signal)


def step_batches(run, recipe: Recipe, step: int, on_policy, accelerator) -> tuple[list[dict], int]:
    """(this rank's micro-batches of step `step`, the global batch's loss-token count).

    The data order is a pure function of the step number (exact resume); on an on-policy step (GKD) the student's
    own completions of the same prompts replace the data.
    """
    micro = run.micro
    mine, micro_examples = _micro_examples(run, recipe, step)
    sampled = on_policy.chooses(step)
    with gathered_for_inference(run.loss_module) if sampled else nullcontext():
        micro_examples = on_policy.examples(run.models.student, step, run.rank, micro_examples)
    if isinstance(run.teacher_signal, ServedSignal) or getattr(run.teacher_signal, "routes", False):
        # This step's requests (in flight since the step before, unless sampled just now), and the next step's.
        run.teacher_signal.begin_step(step, micro_examples, sampled)
        ahead = step + 1
        if ahead < recipe.training.steps and not on_policy.chooses(ahead):
            run.teacher_signal.prefetch(ahead, _micro_examples(run, recipe, ahead)[1])
    batches = [collate(examples, run.pad_id) for examples in micro_examples]
    for j, b in enumerate(batches):
        b["example_index"] = torch.tensor(mine[j * micro : (j + 1) * micro])  # (B,) for a teacher cache
        if getattr(run.teacher_signal, "routes", False):  # several teachers: each row's, (B,)
            b["teacher_index"] = run.teacher_signal.teacher_index(micro_examples[j])
        if getattr(run, "cross", None) is not None:  # the teacher's ids of the same texts and the anchors
            b.update(run.cross.batch(micro_examples[j], b["input_ids"].shape[1]))
            if hasattr(run.teacher_signal, "anchor_rows"):  # from a cache: its rows there, the teacher ids checked
                b.update(run.teacher_signal.anchor_rows(mine[j * micro : (j + 1) * micro], b))
    global_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    if run.world > 1:
        global_tokens = int(accelerator.reduce(torch.tensor(global_tokens, device=accelerator.device), "sum"))
    return batches, global_tokens


def _micro_examples(run, recipe: Recipe, step: int) -> tuple[list[int], list[list]]:
    """(this rank's example indices of step `step`, their micro-batches of examples): a pure function of the step."""
    t, per_rank, micro = recipe.training, run.per_rank, run.micro
    indices = step_example_indices(len(run.train_examples), t.seed, step, t.batch_size)
    mine = indices[run.rank * per_rank : (run.rank + 1) * per_rank]
    return mine, [[run.train_examples[i] for i in mine[j : j + micro]] for j in range(0, per_rank, micro)]


def optimizer_step(run, recipe: Recipe, batches: list[dict], global_tokens: int, accelerator):
    """Accumulate the micro-batches' gradients, clip, update: returns ((kd, ce, hidden) means of the global batch (3,),
    the gradient norm before clipping)."""
    t, device = recipe.training, accelerator.device
    # DDP averages gradients over ranks, so each rank divides by the global count / world size.
    normalizer = max(global_tokens, 1) / run.world
    step_sums = torch.zeros(3, device=device)
    for j, batch in enumerate(batches):
        # Example indices stay on the host: the cache reader needs them there, and copying back would sync.
        batch = {k: v if k in ("example_index", "teacher_index") else v.to(device) for k, v in batch.items()}
        sync = j == len(batches) - 1
        # Backward inside too: FSDP2 decides whether to reduce gradients during backward, DDP in forward.
        with nullcontext() if sync else no_gradient_sync(run.loss_module, accelerator, run.strategy):
            with accelerator.autocast():
                loss, kd_sum, ce_sum, hidden_sum = step_loss(
                    run.loss_module, run.models, batch, recipe, normalizer, run.teacher_signal
                )
            accelerator.backward(loss)
        step_sums += torch.stack([kd_sum.float(), ce_sum.float(), hidden_sum.float()])
    # With clipping off the norm is still measured (an infinite threshold clips nothing): a user watching
    # for exploding gradients needs it most when nothing holds them back.
    max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
    grad_norm = clip_gradients(run.loss_module, accelerator, max_norm, run.strategy)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.world > 1:  # the logged loss is the global batch's, not this rank's share of it
        step_sums = accelerator.reduce(step_sums, "sum")
    return step_sums / max(global_tokens, 1), grad_norm
