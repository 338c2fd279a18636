"""A test recipe for file sources: a linear classifier that records, per worker and process,
the ``id`` of every training row it receives (``id`` must be the first feature column), and can
kill its own worker once to test recovery. Used as ``recipe.module=<this file>``."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import forge


@dataclass
class Params:
    out: str = "/tmp/forge-probe"  # folder for the per-worker id logs
    kill_rank: int = -1  # this worker SIGKILLs itself once ...
    kill_at_call: int = 0  # ... at this training batch of the process (if out/killed is absent)


def build(params: Params, data=None) -> forge.Recipe:
    assert data is not None and data.features[0] == "id"
    os.makedirs(params.out, exist_ok=True)
    calls = [0]

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        rank = dist.get_rank() if dist.is_initialized() else 0
        calls[0] += 1
        ids = " ".join(str(int(v)) for v in x[:, 0].tolist())
        with open(os.path.join(params.out, f"rank{rank}.log"), "a") as f:
            f.write(f"{os.getpid()} {ids}\n")
        marker = os.path.join(params.out, "killed")
        if (
            rank == params.kill_rank
            and calls[0] == params.kill_at_call
            and not os.path.exists(marker)
        ):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.cross_entropy(model(torch.nan_to_num(x)), y)

    def eval_fn(model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(torch.nan_to_num(x))
        return {"loss": nn.functional.cross_entropy(logits, y, reduction="none")}

    torch.manual_seed(0)
    return forge.Recipe(
        model=nn.Linear(data.width, len(data.classes)),
        train_data=None,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
    )


def read_log(out: str, rank: int) -> list[tuple[int, list[int]]]:
    """``(pid, ids)`` per training batch of ``rank``, in order."""
    rows = []
    with open(os.path.join(out, f"rank{rank}.log")) as f:
        for line in f:
            pid, *ids = line.split()
            rows.append((int(pid), [int(i) for i in ids]))
    return rows
