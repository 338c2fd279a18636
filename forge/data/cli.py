"""``python -m forge validate-data ...`` and ``python -m forge infer-contract ...``.

Both take the same ``data.*`` (and ``storage.*``) overrides as a training run::

    python -m forge validate-data data.source=s3://bucket/loans/ data.contract=contract.yaml \\
        data.label=default storage.endpoint_url=http://localhost:9000
    python -m forge infer-contract data.source=data/loans data.label=default > contract.yaml

``validate-data`` exits 0 when the data passes (and prints a summary), 2 with the table of every
violation otherwise. ``infer-contract`` writes a draft contract (YAML) to stdout for review.
No Ray cluster is needed: the driver's own reader streams the files.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from forge.errors import ConfigError

_USAGE = {
    "validate-data": "python -m forge validate-data data.source=<uri> [data.contract=<yaml>] "
    "[data.label=<column>] [data.columns=[...]] [storage.endpoint_url=...]",
    "infer-contract": "python -m forge infer-contract data.source=<uri> [data.label=<column>] "
    "> contract.yaml",
}


def _spec(verb: str, args: Sequence[str]):  # type: ignore[no-untyped-def]
    from forge.config.compose import compose
    from forge.config.validate import to_run_spec

    if any(a in ("-h", "--help") for a in args):
        print(f"usage: {_USAGE[verb]}\n\n{__doc__}")
        return None
    spec = to_run_spec(compose(list(args)))
    if spec.data.source is None:
        raise ConfigError(f"{verb} needs data.source=<file, folder or glob>. Usage: {_USAGE[verb]}")
    return spec


def validate_main(args: Sequence[str]) -> int:
    """Check ``data.source`` against ``data.contract``; 0 when it passes, 2 otherwise.

    Raises:
        ConfigError: Bad source or contract, or violations (the CLI prints it, exit 2).
    """
    from forge.checkpoint.storage import StorageOptions
    from forge.data.prepare import prepare_files

    spec = _spec("validate-data", args)
    if spec is None:
        return 0
    data = spec.data.model_copy(update={"on_violation": "fail"})
    prepared = prepare_files(data, StorageOptions.from_spec(spec.storage), check_batches=False)
    for note in prepared.notes:
        print(note)
    print(f"fingerprint {prepared.fingerprint['sha256']}")
    return 0


def infer_main(args: Sequence[str]) -> int:
    """Print a draft contract for ``data.source`` (YAML) on stdout."""
    import yaml

    from forge.checkpoint.storage import StorageOptions
    from forge.data.contract import infer_contract
    from forge.data.source import read_batches, resolve

    spec = _spec("infer-contract", args)
    if spec is None:
        return 0
    source = resolve(spec.data.source, spec.data.format, StorageOptions.from_spec(spec.storage))
    require = [c for c in [*(spec.data.columns or []), spec.data.label] if c]
    frames = read_batches(source, require=require)
    if spec.data.columns:
        keep = [*spec.data.columns, *([spec.data.label] if spec.data.label else [])]
        frames = (f[keep] for f in frames)
    draft = infer_contract(frames, label=spec.data.label)
    sys.stdout.write(
        f"# Draft data contract for {spec.data.source}, inferred by forge infer-contract.\n"
        "# Review it: ranges are the observed ones widened by 10%, categories the observed ones.\n"
        f"# Use it with data.contract=<this file>.\n"
    )
    sys.stdout.write(yaml.safe_dump(draft, sort_keys=False))
    return 0
