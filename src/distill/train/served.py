"""Online and on-policy training from a served teacher (`teacher.endpoint` without `teacher.cache`).

Each micro-batch's token ids go to the server with the same prompt-log-prob request that builds a cache
(`distill.cache.served`), and the answer trains the student through the same sparse top-k + rest loss as a cache
(`cache.top_k`, `cache.tail`): `ServedSignal.targets` has the interface of `CacheReader.targets`, so a run from
the server and a run from a cache the same server built train on the same numbers.

The student does not wait on the network: the data order is a pure function of the step
(`distill.data.step_example_indices`), so while step s trains, the requests for step s + 1's micro-batches are
already in flight (`generate.concurrency` at a time). On-policy steps (their samples depend on the student of that
step) are asked for as soon as the student has sampled them, every micro-batch of the step at once. Answers are
taken in the order the micro-batches are trained, and the same request gets the same answer, so retries, arrival
order and a resume (which asks again from the resumed step) change nothing: the run is exact.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from distill.cache.generated import log_rest_of
from distill.cache.served import ServedTeacher, check_served_recipe
from distill.data import Example
from distill.errors import DistillError
from distill.losses.sparse import SparseTargets

_NEG_INF = float("-inf")


class ServedSignal:
    """The teacher's signal of each micro-batch, asked of teacher.endpoint ahead of time.

    The loop calls `prefetch(step, micro_batches)` for a step it will train later and `begin_step(step,
    micro_batches)` for the step it trains now, then `targets` once per micro-batch, in order.
    """

    def __init__(
        self,
        recipe,
        tokenizer,
        train_examples: Sequence[Example],
        vocab_size: int,
        log: Callable = print,
        teacher=None,
    ):
        """`teacher`: the teacher section whose endpoint to ask (default recipe.teacher)."""
        c = recipe.cache
        check_served_recipe(recipe, building=False)
        self.tail = c.tail
        t = teacher if teacher is not None else recipe.teacher
        self.teacher = ServedTeacher(t, recipe.generate, tokenizer, min(c.top_k, vocab_size), log)
        try:
            # On-policy samples fill up to data.max_length: that is the longest sequence the server will see.
            on_policy = recipe.objective.on_policy.lambda_ > 0
            longest = recipe.data.max_length if on_policy else None
            self.teacher.check(train_examples, "cache.top_k", longest)
        except BaseException:
            self.teacher.close()
            raise
        self.width = self.teacher.top_k
        self._pool = ThreadPoolExecutor(max_workers=self.teacher.concurrency, thread_name_prefix="distill-teacher")
        self._asked: dict[int, list[list[Future]]] = {}  # step -> per micro-batch, per example: its answer
        self._next: deque[tuple[list[Future], list[Example]]] = deque()  # begun micro-batches, in training order
        log(
            f"teacher: {self.teacher.model_name} at {self.teacher.url} (top {self.width} prompt log-probs, "
            f"{self.teacher.concurrency} requests in flight)"
        )

    def _ask(self, micro_batches: Sequence[Sequence[Example]]) -> list[list[Future]]:
        return [[self._pool.submit(self.teacher.score, e.input_ids) for e in examples] for examples in micro_batches]

    def prefetch(self, step: int, micro_batches: Sequence[Sequence[Example]]) -> None:
        """Send the requests of a later step's micro-batches now (once)."""
        if step not in self._asked:
            self._asked[step] = self._ask(micro_batches)

    def begin_step(self, step: int, micro_batches: Sequence[Sequence[Example]], sampled: bool = False) -> None:
        """The micro-batches step `step` trains on, in order; `sampled`: on-policy samples, asked for now (a
        prefetch of that step, made before the samples existed, would be of other sequences)."""
        asked = self._asked.pop(step, None)
        if asked is None or sampled:
            asked = self._ask(micro_batches)
        for earlier in [s for s in self._asked if s < step]:  # not trained after all (a resume past them)
            del self._asked[earlier]
        for futures, examples in zip(asked, micro_batches, strict=True):
            self._next.append((futures, list(examples)))

    def targets(self, example_indices: Sequence[int] | torch.Tensor, width: int, device=None) -> SparseTargets:
        """Targets of the next begun micro-batch, laid out as its (B, width) label grid, flattened: (B·width)
        rows, as `CacheReader.targets` lays them out. Positions that do not count hold no information."""
        if not self._next:
            raise DistillError("internal error: targets of a micro-batch that was not begun (ServedSignal.begin_step)")
        futures, examples = self._next.popleft()
        if len(futures) != len(example_indices):
            raise DistillError(f"internal error: {len(example_indices)} examples in the batch, {len(futures)} asked")
        n = len(examples) * width
        ids = torch.full((n, self.width), -1, dtype=torch.long)  # (B·width, k)
        lp = torch.full((n, self.width), _NEG_INF)  # (B·width, k)
        rest = torch.zeros(n)  # (B·width,)
        for row, (future, example) in enumerate(zip(futures, examples, strict=True)):
            top_ids, top_lp = future.result()  # (T-1, k) each: row i predicts token i + 1
            counted = np.asarray(example.loss_mask[1 : width + 1], dtype=np.bool_)  # (≤ width,)
            where = torch.from_numpy(np.flatnonzero(counted) + row * width)  # flat positions in the grid
            chosen = torch.from_numpy(np.flatnonzero(counted))
            ids.index_copy_(0, where, torch.from_numpy(top_ids)[chosen])
            lp.index_copy_(0, where, torch.from_numpy(top_lp)[chosen])
            # The rest exactly as a cache built from the same server stores it.
            rest.index_copy_(0, where, torch.from_numpy(log_rest_of(top_lp[counted])))
        targets = SparseTargets(ids, lp, rest, distinct=True, tail=self.tail)
        return targets.to(device) if device is not None else targets

    def close(self) -> None:
        """Stop asking: pending requests are dropped, the connections closed."""
        self.teacher.client.stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.teacher.close()
