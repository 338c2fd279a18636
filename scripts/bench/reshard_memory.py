"""Memory one rank needs to load its part of a sharded checkpoint: forge vs whole-shard loads.

The case: a ZeRO-1/2 checkpoint written by ``--shards`` ranks (each shard holds its range of the
fp32 weights and of Adam's two moments) is loaded by rank 0 of ``--new-world`` ranks, which
needs the *whole* weights but only *its* range of the moments. The baseline is how forge loaded
before (and how loaders that read whole files work): every overlapping shard downloaded and
deserialized whole, kept until the load is done. forge memory-maps each shard and copies only
the requested ranges.

Each side runs in a fresh subprocess and reports, during the load, the peak rise of anonymous
memory (``RssAnon``, sampled every 2 ms: what the process itself allocates) minus the bytes it
returns (those are needed either way): the *overhead* of loading. Memory-mapped file pages
are page cache the kernel can drop, so they are reported (``VmHWM``) but not counted.
Target: forge's overhead <= 0.1x the baseline's.

    python scripts/bench/reshard_memory.py                     # 100M params, 4 shards -> 2 ranks
    python scripts/bench/reshard_memory.py --params-m 50 --shards 8 --new-world 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET = 0.1
MOMENTS = ("exp_avg", "exp_avg_sq")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def write(folder: str, params_m: int, shards: int) -> int:
    """A committed checkpoint: weights and two moments of one parameter over ``shards`` ranks."""
    import torch

    from forge.checkpoint.store import CheckpointStore
    from forge.strategies.fragments import ShardWriter

    total = params_m * 1_000_000 // shards * shards
    per = total // shards
    files = {}
    for rank in range(shards):
        writer = ShardWriter(rank, shards)
        for key in ("model/w", *(f"optim/{m}/w" for m in MOMENTS)):
            writer.add(key, torch.full((per,), float(rank)), (total,), rank * per)
        files.update({name: make() for name, make in writer.files().items()})
    CheckpointStore(folder).save(1, files, strategy="deepspeed_zero2", world_size=shards)
    return total


def load(side: str, folder: str, total: int, new_world: int) -> dict[str, float]:
    """In this (fresh) process: new rank 0's state, by ``side``; memory figures in MB."""
    import torch

    from forge.checkpoint.serialize import bytes_to_tensors
    from forge.checkpoint.store import CheckpointStore
    from forge.strategies.fragments import StateReader

    ckpt = CheckpointStore(folder).latest(verify=False)
    assert ckpt is not None
    mine = -(-total // new_world)  # new rank 0's range of the moments: [0, mine)

    peak = {"anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            time.sleep(0.002)

    anon_before = _status_kb("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    hwm_before = _status_kb("VmHWM")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if side == "forge":
        with StateReader(ckpt) as reader:
            out = {"model/w": reader.read("model/w")}
            out.update({f"optim/{m}/w": reader.read(f"optim/{m}/w", 0, mine) for m in MOMENTS})
    else:
        loaded = {}  # every shard whole (all overlap: the weights are needed in full)
        for name in sorted(n for n in ckpt.manifest.files if n.endswith(".safetensors")):
            loaded[name] = bytes_to_tensors(ckpt.read(name))
        out = {"model/w": torch.cat([t["model/w"] for t in loaded.values()])}
        for m in MOMENTS:
            out[f"optim/{m}/w"] = torch.cat([t[f"optim/{m}/w"] for t in loaded.values()])[:mine]
        del loaded
    done.set()
    sampler.join()
    returned_mb = sum(t.numel() * t.element_size() for t in out.values()) / 2**20
    rise_mb = (peak["anon"] - anon_before) / 1024
    return {
        "returned_mb": returned_mb,
        "anon_rise_mb": rise_mb,
        "overhead_mb": max(0.0, rise_mb - returned_mb),
        "hwm_rise_mb": (_status_kb("VmHWM") - hwm_before) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=int, default=100, help="parameters, millions")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--new-world", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    if args.child:
        side, folder, total, new_world = args.child
        print(json.dumps(load(side, folder, int(total), int(new_world))))
        return 0
    with tempfile.TemporaryDirectory(prefix="forge-reshard-bench-") as folder:
        total = write(folder, args.params_m, args.shards)
        results = {}
        for side in ("baseline", "forge"):
            cmd = [sys.executable, __file__, "--child", side, folder, str(total)]
            out = subprocess.run(
                [*cmd, str(args.new_world)], check=True, capture_output=True, text=True
            )
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"checkpoint: {total / 1e6:.0f}M params (fp32 weights + 2 Adam moments) in "
        f"{args.shards} shards; rank 0 of {args.new_world} loads the weights and 1/"
        f"{args.new_world} of the moments: {results['forge']['returned_mb']:.0f} MB"
    )
    print(f"{'':<10}{'anon rise':>12}{'overhead':>12}{'VmHWM rise':>12}   (MB)")
    for side, r in results.items():
        print(
            f"{side:<10}{r['anon_rise_mb']:>12.0f}{r['overhead_mb']:>12.0f}{r['hwm_rise_mb']:>12.0f}"
        )
    ratio = results["forge"]["overhead_mb"] / max(results["baseline"]["overhead_mb"], 1e-9)
    verdict = "ok" if ratio <= TARGET else "ABOVE TARGET"
    print(f"overhead forge / baseline: {ratio:.3f} (target <= {TARGET}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
