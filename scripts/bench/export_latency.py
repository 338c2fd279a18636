"""Serving latency of forge's ONNX export vs the eager PyTorch model, on CPU.

For the ``digits``, ``tabular`` and ``tinylm`` recipes (default params; weights do not change
latency), the script builds the model with the recipe's own builder, exports it with forge's
ONNX writer (``torch.onnx.export(dynamo=True)``, the same code ``forge export`` runs) and times
one forward call on validation rows at batch 1 and 64:

* **ONNX Runtime**: CPU provider, ``ORT_ENABLE_ALL``, ``intra_op_num_threads=2``;
* **eager PyTorch**: the same model in eval mode under ``torch.inference_mode()``,
  ``torch.set_num_threads(2)``.

Both run in this one process, one after the other; the median over ``--repeats`` calls (after
warm-up) is reported, and the ratio ORT ÷ eager. Target: <= 0.5 at batch 64 for digits and
tabular (tinylm is reported, not gated).

Run it (from any directory)::

    python scripts/bench/export_latency.py
    python scripts/bench/export_latency.py --repeats 200 --recipes digits tabular
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
THREADS = 2
TARGET = {"digits": 0.5, "tabular": 0.5}
RECIPES = {
    "digits": {"name": "digits", "module": "recipes.digits", "params": {}},
    "tabular": {"name": "tabular", "module": "recipes.tabular", "params": {}},
    # Default model size (2 layers, 128 wide, 128 bytes of context); a corpus slice for speed.
    "tinylm": {"name": "tinylm", "module": "recipes.tinylm", "params": {"max_files": 20}},
}


def measure(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after 20 warm-up calls."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))

    import torch

    from forge.export import onnx as onnx_format
    from forge.export.settings import ExportSettings
    from forge.export.source import recipe_builders

    torch.set_num_threads(THREADS)
    rows, misses = [], []
    for name in args.recipes:
        build, spec = recipe_builders(RECIPES[name])
        model = build()
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            example = tuple(spec.example(4))
            onnx_format.write(model, spec, example, ExportSettings(), tmp)
            session = onnx_format.session(f"{tmp}/{onnx_format.FILE}", True, threads=THREADS)
            for batch in args.batch_sizes:
                inputs = [t.contiguous() for t in spec.example(batch)]
                feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs, strict=True)}

                def eager(inputs=inputs, model=model) -> None:
                    with torch.inference_mode():
                        model(*inputs)

                def ort(feeds=feeds, session=session) -> None:
                    session.run(None, feeds)

                t_eager = measure(eager, args.repeats)
                t_ort = measure(ort, args.repeats)
                ratio = t_ort / t_eager
                target = TARGET.get(name) if batch == 64 else None
                if target is not None and ratio > target:
                    misses.append(f"{name} batch {batch}: {ratio:.2f} > {target}")
                rows.append((name, batch, t_eager, t_ort, ratio, target))

    print(
        f"ONNX Runtime ({THREADS} intra-op threads) vs eager PyTorch ({THREADS} threads), "
        f"median of {args.repeats} calls, torch {torch.__version__}"
    )
    print(f"{'recipe':<8} {'batch':>5} {'eager ms':>10} {'ORT ms':>10} {'ORT/eager':>10}  target")
    for name, batch, t_eager, t_ort, ratio, target in rows:
        verdict = (
            "" if target is None else (f"<= {target} " + ("ok" if ratio <= target else "MISS"))
        )
        print(f"{name:<8} {batch:>5} {t_eager:>10.4f} {t_ort:>10.4f} {ratio:>10.3f}  {verdict}")
    if misses:
        print("targets missed: " + "; ".join(misses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
