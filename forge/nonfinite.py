"""Stop (or skip) training that goes non-finite, without a host sync per step.

A NaN/inf loss or gradient does not raise in PyTorch: the optimizer writes NaN into the weights
and training carries on, logging NaN and checkpointing it. :class:`NonFiniteGuard` watches the
loss of every micro-batch and (where forge steps the optimizer itself and no fp16 loss scaler
owns overflow) the gradient norm, and records on the device the first step where one of them
was not finite. Nothing is read back per step: the record is summed across ranks with the
logged loss (:meth:`NonFiniteGuard.record`), and read before any row of the steps it covers is
logged; :meth:`NonFiniteGuard.check` reads it at once, with the weights, before every
checkpoint is submitted, so no checkpoint with non-finite weights is ever committed.

Policies (``trainer.on_nonfinite``):

* ``fail`` (default): the run stops with :class:`~forge.errors.NonFiniteError`, naming the step
  and the first non-finite quantity. Steps after it may have trained on NaN weights, but none of
  them is checkpointed; a restart resumes from the last good checkpoint.
* ``skip``: a step whose loss or gradients are not finite on any worker is skipped on every
  worker (gradients dropped, no optimizer step; the step still counts, so the schedule and the
  data position stay those of the uninterrupted run) and counted in ``train/skipped_steps``.
  Deciding that needs every worker's answer before the optimizer step: one all-reduce and one
  host sync per step, which is why it is opt-in.

fp16: gradient overflow is the loss scaler's business (it skips the step and lowers the scale),
so under fp16 the guard watches the loss only and never skips a step the scaler will skip.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import torch

from forge.errors import NonFiniteError

LOSS, GRAD_NORM, WEIGHTS = 1, 2, 3
QUANTITY = {
    LOSS: "the training loss was",
    GRAD_NORM: "the gradient norm was",
    WEIGHTS: "the weights were",
}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded, DTensor) tensor; a ZeRO-3 parameter's shard."""
    tensor = getattr(tensor, "ds_tensor", tensor)
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on the tensors' device: every element of every tensor is finite.

    One fused norm per tensor group (``torch._foreach_norm``), no host sync.

    Example:
        >>> bool(all_finite([torch.ones(3), torch.zeros(2)])), bool(all_finite([torch.ones(2) / 0]))
        (True, False)
    """
    norms = _norms(list(tensors))
    return torch.isfinite(torch.stack(norms)).all() if norms else torch.ones((), dtype=torch.bool)


def _norms(tensors: list[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Each tensor's (local part's) L2 norm as a 0-d float32 tensor (an fp16 tensor's norm
    would overflow at 65504), in one fused op; no host sync."""
    if not tensors:
        return ()
    # Plain tensors outside autograd (every gradient outside FSDP and ZeRO-3) skip _local's
    # attribute lookups and the no_grad context: this runs at every step.
    if all(type(t) is torch.Tensor and not t.requires_grad for t in tensors):
        return torch._foreach_norm(tensors, 2, dtype=torch.float32)
    with torch.no_grad():  # parameters; DTensor or ZeRO-3 shards: this rank's part
        return torch._foreach_norm([_local(t) for t in tensors], 2, dtype=torch.float32)


def flat_runs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as few 1-d tensors: each run of them that tiles one contiguous block of one
    storage (DDP's gradient buckets, under ``gradient_as_bucket_view``) becomes one view of that
    block; the others stay as they are. Same elements, so the same verdict on finiteness, with
    one kernel per run instead of one per tensor (CPU has no fused multi-tensor norm).

    Example:
        >>> bucket = torch.arange(10.0)
        >>> runs = flat_runs([bucket[4:10].view(2, 3), bucket[0:4], torch.ones(2)])
        >>> sorted(tuple(r.shape) for r in runs)  # in memory order
        [(2,), (10,)]
        >>> [tuple(r.shape) for r in flat_runs([bucket[0:3], bucket[4:10]])]  # a gap: two runs
        [(3,), (6,)]
    """

    def block(t: torch.Tensor) -> tuple[int, int]:
        return t.untyped_storage().data_ptr(), t.data_ptr()

    runs: list[list[torch.Tensor]] = []
    for t in sorted(tensors, key=block):
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and t.is_contiguous()
            and last.is_contiguous()
            and t.dtype == last.dtype
            and t.device == last.device
            and block(t)[0] == block(last)[0]
            and t.data_ptr() == last.data_ptr() + last.numel() * last.element_size()
        ):
            runs[-1].append(t)
        else:
            runs.append([t])
    return [
        run[0].as_strided((sum(t.numel() for t in run),), (1,)) if len(run) > 1 else run[0]
        for run in runs
    ]


class NonFiniteGuard:
    """This worker's record of the first non-finite step; see the module docstring.

    Args:
        device: Where the record lives (the training device).
        rank, world_size: This worker's place, for the all-reduce in :meth:`check`.
        step: The step training starts from (0, or the resumed step).
        check_grads: Whether :meth:`observe_grads` looks at gradients (not under an fp16 loss
            scaler, which owns overflow; not under DeepSpeed, whose engine steps in backward).
        can_skip: Whether the error may suggest ``trainer.on_nonfinite=skip`` (the forge loop
            on DDP/FSDP; not Lightning or DeepSpeed, which refuse it).

    Example:
        >>> guard = NonFiniteGuard(torch.device("cpu"), rank=0, world_size=1, step=0)
        >>> guard.observe_loss(torch.tensor(0.5)); guard.end_step()
        >>> guard.observe_loss(torch.tensor(float("nan"))); guard.end_step()
        >>> guard.check(lambda t: None)
        Traceback (most recent call last):
        ...
        forge.errors.NonFiniteError: Training went non-finite at step 2: the training loss was ...
    """

    def __init__(
        self,
        device: torch.device,
        rank: int,
        world_size: int,
        step: int,
        check_grads: bool = True,
        can_skip: bool = True,
        window: int = 64,
    ) -> None:
        self.rank, self.world_size, self.check_grads = rank, world_size, check_grads
        self.can_skip = can_skip
        kw = {"device": device}
        self._step = step  # steps ended so far (a host count: no device op per step)
        # The record: the earliest non-finite (step, quantity) seen, coded as one float64
        # ``step * 4 + quantity`` (inf: none), so that keeping the first one is one minimum
        # and a quantity seen earlier in the same step (loss, then gradients, then weights)
        # wins a tie.
        self._first = torch.full((), math.inf, dtype=torch.float64, **kw)
        # Per step of the current window, its loss and its gradients' norms, kept as the 0-d
        # tensors they are (list appends, no device op) and folded into _first at each check
        # and every ``window`` steps: under load (two workers on two cores) each tiny device op
        # costs several times its quiet microbenchmark, and a per-step device record cost ~25
        # of them, 10 % of a small CNN's CPU step (scripts/bench/ddp_overhead.py).
        self._window = window
        self._losses: list[torch.Tensor] = []
        self._grad_norms: list[Sequence[torch.Tensor]] = []
        self._codes: dict[tuple[int, ...], torch.Tensor] = {}  # see _fold
        self._none = torch.zeros((), **kw)  # the record of a loss not observed in a step
        # The gradients as flat runs (see flat_runs), and where the gradients were when built;
        # how many times gradients were found in no shared buffer.
        self._runs_key: list[int] = []
        self._runs: list[torch.Tensor] = []
        self._untiled = 0
        # This rank's slot in a (world size,) tensor: a record summed over ranks stays apart.
        self._slot = torch.zeros(world_size, dtype=torch.float64, **kw)
        self._slot[rank] = 1.0
        self._loss: torch.Tensor | None = None  # this step's loss (sum of micro-batches)
        self._grad_norm: Sequence[torch.Tensor] = ()  # this step's gradient norms
        self.skipped = 0  # steps skipped under the skip policy

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Call with a micro-batch's loss, or a sum of them (NaN and inf survive a sum);
        queued on the device, no sync."""
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def observe_grads(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Call once per optimizer step, after the last backward, before the optimizer step.

        One fused norm of the gradients (``torch._foreach_norm``), nothing else on the device;
        gradients that are views of one buffer (DDP's buckets) are normed as one tensor per
        buffer (:func:`flat_runs`, worked out again only when the gradients move).
        """
        if not self.check_grads:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        # Not for sharded gradients (DTensor, ZeRO); and not again after a few tries found no
        # shared buffer (no DDP, or gradient_as_bucket_view=false: new gradients every step).
        if self._untiled < 3 and all(type(g) is torch.Tensor for g in grads):
            key = [g.data_ptr() for g in grads]
            if key == self._runs_key:
                grads = self._runs
            else:
                runs = flat_runs(grads)
                if len(runs) < len(grads):
                    self._runs_key, self._runs, grads = key, runs, runs
                else:  # hold no gradient: a stale one would keep its memory alive
                    self._runs_key, self._runs = [], []
                    self._untiled += 1
        self._grad_norm = _norms(grads)

    def step_is_bad(
        self, all_reduce_sum: Callable[[torch.Tensor], None], loss: torch.Tensor | None = None
    ) -> bool:
        """Skip policy: whether any worker saw a non-finite loss or gradient in this step.

        A collective and a host sync (call on every rank). Clears this step's observations.
        """
        if loss is not None:
            self.observe_loss(loss)
        seen = [self._loss] if self._loss is not None else []
        seen += self._grad_norm
        flag = torch.zeros(1, dtype=torch.float64, device=self._first.device)
        if seen:
            flag = (~torch.isfinite(torch.stack(seen))).any().to(torch.float64).reshape(1)
        all_reduce_sum(flag)
        self._loss, self._grad_norm = None, ()
        bad = flag.item() > 0
        self._step += 1
        self.skipped += int(bad)
        return bad

    def end_step(self, loss: torch.Tensor | None = None) -> None:
        """Fail policy: record this step's loss and gradient norm (no sync).

        ``loss``: the step's loss (a sum over its micro-batches is enough), if not observed.
        """
        if loss is not None:
            self.observe_loss(loss)
        self._step += 1
        self._losses.append(self._none if self._loss is None else self._loss)
        self._grad_norms.append(self._grad_norm)
        self._loss, self._grad_norm = None, ()
        if len(self._losses) == self._window:
            self._fold()

    def _fold(self) -> None:
        """Move the window's first non-finite step (if any, and none before) into the record."""
        n = len(self._losses)
        if n == 0:
            return
        counts = tuple(len(norms) for norms in self._grad_norms)
        codes = self._codes.get(counts)
        if codes is None:  # once per window shape: the code of each value for a window at 0
            if len(self._codes) > 16:  # gradients that come and go: do not grow without end
                self._codes.clear()
            host = [4.0 * i + LOSS for i in range(n)]
            host += [4.0 * i + GRAD_NORM for i, count in enumerate(counts) for _ in range(count)]
            codes = torch.tensor(host, dtype=torch.float64).to(self._first.device)
            self._codes[counts] = codes
        values = torch.stack([*self._losses, *itertools.chain.from_iterable(self._grad_norms)])
        start = float((self._step - n + 1) * 4)  # the code of the window's first step
        bad = torch.where(torch.isfinite(values), math.inf, codes + start)
        torch.minimum(self._first, bad.min(), out=self._first)
        self._losses.clear()
        self._grad_norms.clear()

    def check(
        self,
        all_reduce_sum: Callable[[torch.Tensor], None],
        weights: Iterable[torch.Tensor] | None = None,
    ) -> None:
        """Raise :class:`~forge.errors.NonFiniteError` if any worker recorded a non-finite step
        (or, with ``weights``, holds a non-finite weight now). Call on every rank: one small
        all-reduce and one host sync."""
        slots = self.record(weights)
        all_reduce_sum(slots)
        self.raise_if_seen(slots.tolist())

    def record(self, weights: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        """This rank's record (with ``weights`` checked now) in its slot of a (world size,)
        float64 tensor of zeros; no host sync. Summed over the ranks, slot r is rank r's record
        (0: none): pass the sum, as floats, to :meth:`raise_if_seen`.

        The forge loop sends it with the train loss's reduction
        (:class:`forge.train_loss.TrainLossWindow`), so checking costs no collective of its own.
        """
        self._fold()
        if weights is not None:
            now = float(self._step * 4 + WEIGHTS)
            bad = torch.where(all_finite(weights), math.inf, now)
            torch.minimum(self._first, bad, out=self._first)
        # none (inf) is 0 in the slot: the ranks' slots are summed
        return torch.nan_to_num(self._first, posinf=0.0) * self._slot

    def raise_if_seen(self, summed: Sequence[float]) -> None:
        """Raise :class:`~forge.errors.NonFiniteError` naming the earliest non-finite step in
        ``summed``, every rank's :meth:`record` summed (as floats); nothing if there is none."""
        seen = [(int(code) // 4, int(code) % 4, r) for r, code in enumerate(summed) if code]
        if not seen:
            return
        step, kind, rank = min(seen)
        after = " after that step's update" if kind == WEIGHTS else ""
        skip = (
            " To skip such steps instead, set trainer.on_nonfinite=skip (counted in "
            "train/skipped_steps)."
            if self.can_skip
            else ""
        )
        raise NonFiniteError(
            f"Training went non-finite at step {step}: {QUANTITY[kind]} NaN or inf{after} "
            f"(first seen on rank {rank}). The run stopped; no checkpoint of step {step} or "
            "later was committed, so a restart resumes from the last good one. Usual causes: "
            "a learning rate too high (lower the learning rate, or warm it up), exploding "
            "gradients (set trainer.gradient_clip_val), a log or division of zero in the "
            f"loss.{skip}"
        )
