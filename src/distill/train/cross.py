"""Training across tokenizers (objective.cross_tokenizer): the teacher reads its own tokenization of each text.

The student's examples stay as they are; for every micro-batch `distill.data.alignment.TokenizerPair.batch` gives the
teacher's token ids of the same text and the anchors (student and teacher positions that follow the same text), on
on-policy steps too (the student's samples are re-tokenized for the teacher the same way). The teacher runs on its
own ids here, without gradients, and only its rows at the anchors reach the loss
(`distill.losses.cross_tokenizer`, inside `StudentLoss`). From a teacher.cache built across tokenizers
(`distill.cache.cross`) the anchors pick the stored top-k rows instead.
"""

from __future__ import annotations

import torch

from distill.config import Recipe
from distill.data.alignment import TokenizerPair
from distill.errors import DistillError
from distill.losses.cross_tokenizer import BucketMap, CrossObjective, CrossTargets
from distill.losses.heads import backbone_hidden_states
from distill.models import Models, embedding_rows, load_tokenizer, max_context
from distill.train.lora import is_base_view

SAMPLE_EXAMPLES = 64  # examples aligned at set-up to report the shares of anchors and 1:1 spans


def check_recipe(recipe: Recipe) -> None:
    """Refuse, before any model loads, what a cross-tokenizer run cannot do (objective.cross_tokenizer on)."""
    if recipe.objective.cross_tokenizer == "off" or not recipe.needs_teacher:
        return
    key = f"recipe key objective.cross_tokenizer: {recipe.objective.cross_tokenizer}"
    t = recipe.teacher
    if t.endpoint is not None:
        raise DistillError(
            f"{key} runs the teacher on its own tokenization of each text; teacher.endpoint is not supported with "
            "it yet (give teacher.path, or a teacher.cache built with this recipe)"
        )
    if t.path is None and t.cache is None:
        raise DistillError(f"{key} needs teacher.path (the teacher model and its tokenizer) or teacher.cache")
    if recipe.data.packing:
        raise DistillError(f"{key} aligns one document at a time; set data.packing=false")
    if recipe.objective.hidden.weight > 0:
        raise DistillError(
            f"{key}: hidden-state distillation pairs positions of one tokenization; set objective.hidden.weight=0"
        )


def open_cross_tokenizer(recipe: Recipe, models: Models, train_examples, log) -> TokenizerPair | None:
    """The student/teacher tokenizer pair of a cross-tokenizer run (None when objective.cross_tokenizer is off)."""
    mode, t = recipe.objective.cross_tokenizer, recipe.teacher
    if mode == "off" or (models.teacher is None and t.cache is None):
        return None
    if is_base_view(models.teacher):
        raise DistillError(
            f"recipe key objective.cross_tokenizer: {mode}: the teacher is the student's own base, with the same "
            "tokenizer; set objective.cross_tokenizer=off"
        )
    if models.teacher is None:  # from a cache (distill.cache.cross): its tokenizer, from teacher.path or the cache
        from distill.cache.cross import cached_teacher_tokenizer

        folder, limit = cached_teacher_tokenizer(t.cache)
        teacher_tokenizer = load_tokenizer(t.path or folder, "teacher", t.trust_remote_code, t.revision)
    else:
        teacher_tokenizer = load_tokenizer(t.path, "teacher", t.trust_remote_code, t.revision)
        limit = max_context(models.teacher.config)
        if embedding_rows(models.teacher) < len(teacher_tokenizer):
            raise DistillError(
                f"teacher has {embedding_rows(models.teacher)} output rows but its tokenizer has "
                f"{len(teacher_tokenizer)}"
            )
    pair = TokenizerPair(models.tokenizer, teacher_tokenizer, limit)
    stats = pair.stats(train_examples[:SAMPLE_EXAMPLES])
    shared = pair.vocabulary_map[2]
    log(
        f"cross-tokenizer ({mode}): student vocabulary {len(models.tokenizer)}, teacher's {len(teacher_tokenizer)}, "
        f"{shared} pieces shared; of the loss tokens of the first {min(len(train_examples), SAMPLE_EXAMPLES)} "
        f"examples {stats['anchored']:.0%} follow the same text as a teacher position, {stats['one_to_one']:.0%} "
        "are 1:1 spans"
    )
    if not pair.teacher.spells:
        log(
            "cross-tokenizer: the teacher's vocabulary strings do not spell its text; its tokens are placed by "
            "character offsets and no span counts as 1:1 (aligned = uld)"
        )
    return pair


def open_cross_cache_signal(recipe: Recipe, pair: TokenizerPair | None, train_examples):
    """The cross-tokenizer cache at teacher.cache, checked against this pair and data (None without one)."""
    if pair is None or recipe.teacher.cache is None:
        return None
    from distill.cache.cross import open_cross_cache

    return open_cross_cache(recipe, pair, train_examples)


def cross_objective(pair: TokenizerPair | None, mode: str, device: torch.device) -> CrossObjective | None:
    """What `StudentLoss` needs to compare the anchors: the mode, the shared vocabulary on `device` (aligned)."""
    if pair is None:
        return None
    buckets = None
    if mode == "aligned":
        student, teacher, shared = pair.vocabulary_map
        buckets = BucketMap(torch.tensor(student), torch.tensor(teacher), shared).to(device)
    return CrossObjective(mode, buckets, len(pair.teacher.pieces))


@torch.no_grad()
def teacher_targets(teacher, batch: dict[str, torch.Tensor], fused: bool, device: torch.device) -> CrossTargets:
    """The teacher's rows at a micro-batch's anchors, from its own token ids: its last hidden states (N, H_t) on the
    fused path (the loss applies its head a chunk at a time) or its logits (N, V_t'), on `device`."""
    where = teacher.get_input_embeddings().weight.device
    ids = batch["teacher_input_ids"].to(where)  # (B, T_t)
    mask = batch["teacher_attention_mask"].to(where)  # (B, T_t)
    index = batch["anchor_teacher"].to(where)  # (N,) flat positions of the (B, T_t-1) grid
    if fused:
        hidden = backbone_hidden_states(teacher, ids, mask)[:, :-1]  # (B, T_t-1, H_t)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H_t)
    else:
        logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # (B, T_t-1, V_t')
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index)  # (N, V_t')
    return CrossTargets(batch["anchor_student"].to(device), batch["anchor_exact"].to(device), rows.to(device))
