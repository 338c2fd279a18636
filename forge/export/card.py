"""The model card (``README.md``): YAML front matter for tools, then what a person needs."""

from __future__ import annotations

from typing import Any

import yaml

# Three lines per format that load the artifact and run it on an input batch ``x``.
SNIPPETS = {
    "onnx": (
        "import onnxruntime as ort\n"
        'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])\n'
        "{unpack} = session.run(None, {{{feeds}}})  # numpy arrays in, numpy arrays out"
    ),
    "torch_export": (
        "from forge.export import load_verified  # checks sha256 against manifest.json first\n"
        'model = load_verified("{uri}", "torch_export")  # torch.export.load(...).module()\n'
        "{outs} = model({args})"
    ),
    "safetensors": (
        "from forge.export import load_verified  # rebuilds the model with {module}\n"
        'model = load_verified("{uri}", "safetensors")\n'
        "{outs} = model({args})"
    ),
    "torchscript": (
        "from forge.export import load_verified  # legacy format; sha256-checked before load\n"
        'model = load_verified("{uri}", "torchscript")\n'
        "{outs} = model({args})"
    ),
}


def render(manifest: dict[str, Any], uri: str, data: str, license: str | None) -> str:
    """The model card for an export ``manifest`` written to ``uri``."""
    recipe = manifest["recipe"]
    formats = manifest["formats"]
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    front = {
        "library_name": "forge",
        "license": license or "unspecified",
        "model_name": f"{recipe['name']}-step{manifest['step']}",
        "recipe": recipe,
        "task": manifest["task"],
        "source_checkpoint": manifest["source_checkpoint"],
        "metrics": manifest["metrics"],
        "data": data,
        "formats": {name: rec["status"] for name, rec in formats.items()},
        "inputs": inputs,
        "outputs": outputs,
    }
    args = ", ".join(i["name"] for i in inputs)
    outs = ", ".join(o["name"] for o in outputs)
    unpack = outs + ("," if len(outputs) == 1 else "")  # run() returns a list
    feeds = ", ".join(f'"{i["name"]}": {i["name"]}' for i in inputs)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {recipe['name']} (step {manifest['step']})",
        "",
        f"Exported by forge from `{manifest['source_checkpoint']}`. Every format below was loaded "
        "by its own runtime and matched the training model on the golden batches in "
        "`golden.npz` (the parity gate); a format whose status is not `ok` must not be served.",
        "",
        "## Intended use",
        "",
        f"What the `{recipe['module']}` recipe trains it for: {manifest['task']} on data like "
        "its training data (below). Validate on your own data before relying on it.",
        "",
        "## Data",
        "",
        data,
        "",
        "## Inputs and preprocessing",
        "",
    ]
    for i in inputs:
        lines.append(f"- `{i['name']}`: {i['dtype']} {i['shape']}")
    for o in outputs:
        lines.append(f"- output `{o['name']}`: {o['dtype']} {o['shape']}")
    lines += ["", manifest["preprocessing"] or "No preprocessing outside the model.", ""]
    lines += ["## Metrics (the checkpoint's validation)", ""]
    lines += [f"- {k}: {v:.6g}" for k, v in sorted(manifest["metrics"].items())] or ["- none"]
    lines += ["", "## Formats", ""]
    for name, rec in formats.items():
        lines.append(f"### {name}: {rec['status']}")
        lines.append("")
        if rec["status"] != "ok":
            lines += [f"Not produced: {rec.get('error', '')}", ""]
            continue
        parity = rec.get("parity", {})
        lines.append(
            f"Parity: max abs diff {parity.get('max_abs', 0):.3g}, max rel diff "
            f"{parity.get('max_rel', 0):.3g} (rtol {parity.get('rtol')}, atol "
            f"{parity.get('atol')}). Latency (CPU): "
            + ", ".join(
                f"{b}: p50 {v['p50_ms']:.3g} ms / p95 {v['p95_ms']:.3g} ms"
                for b, v in rec.get("latency", {}).items()
            )
        )
        lines += ["", "```python"]
        lines.append(
            SNIPPETS[name].format(
                uri=uri, outs=outs, unpack=unpack, args=args, feeds=feeds, module=recipe["module"]
            )
        )
        lines += ["```", ""]
    lines += [
        "## Limitations",
        "",
        "- Parity was checked on CPU runtimes (ONNX Runtime's CPU provider, PyTorch eager) at "
        "the batch sizes and lengths in `golden.npz`; other providers or precisions need their "
        "own check (re-run the golden batches).",
        "- The model knows only its training data's distribution; inputs from elsewhere may "
        "score confidently and wrongly.",
        "- `model.pt2` and TorchScript files are pickles: load them only after checking their "
        "sha256 against `manifest.json` (as `forge.export.load_verified` does).",
        "",
    ]
    return "\n".join(lines)
