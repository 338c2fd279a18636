"""A model registry in object storage: numbered versions, movable aliases, an audit log.

Layout under ``registry.uri`` (default ``<storage.uri>/registry``; local or ``s3://``)::

    <name>/versions/000003/.claim            the number, taken by an exclusive create
    <name>/versions/000003/export/...        the export's files and its own manifest.json
    <name>/versions/000003/data_profile.json the training data's reference profile (if any)
    <name>/versions/000003/version.json      source run/checkpoint, metrics, fingerprint
    <name>/versions/000003/manifest.json     written last: the commit (size + sha256 of all)
    <name>/aliases/champion/00000007.json    the 7th move of "champion": version, previous
    <name>/audit/<utc time>-<uuid>.json      one object per event, never rewritten

**Aliases move by conditional write.** A move writes generation ``n + 1`` of the alias with
:func:`forge.checkpoint.storage.create_exclusive` (``O_EXCL`` locally, ``If-None-Match: *`` on
S3), where ``n`` is the generation the mover read. Of two concurrent moves exactly one creates
``n + 1``; the other gets :class:`AliasConflictError` and nothing of it lands except its audit
entry. The current holder is the highest generation; each generation records the previous
holder, so :meth:`Registry.rollback` is one step back. The same scheme as MLflow's aliases
(``models:/name@champion``), without a database.

References accepted wherever a model is expected: ``registry://name@alias``,
``registry://name:3``, ``registry://name`` (the newest version), and the same without the
``registry://`` prefix.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from forge.checkpoint import storage
from forge.checkpoint.manifest import FileEntry
from forge.errors import ForgeError
from forge.mlops.reference import ReferenceProfile, load_profile

VERSION_FORMAT = "forge.registry_version"
ALIAS_FORMAT = "forge.registry_alias"
EXPORT_FORMAT = "forge.export"
SCHEME = "registry://"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF = re.compile(r"^(?P<name>[^@:/]+)(?:@(?P<alias>[^@:/]+)|:(?P<version>\d+))?$")


class RegistryError(ForgeError):
    """A registry operation cannot be done; the message says why and what to do."""


class AliasConflictError(RegistryError):
    """Another writer moved the alias between our read and our write."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    Example:
        >>> ModelRef.parse("registry://tabular@champion")
        ModelRef(name='tabular', alias='champion', version=None)
        >>> ModelRef.parse("tabular:3")
        ModelRef(name='tabular', alias=None, version=3)
    """

    name: str
    alias: str | None = None
    version: int | None = None

    @staticmethod
    def parse(ref: str) -> ModelRef:
        text = ref[len(SCHEME) :] if ref.startswith(SCHEME) else ref
        m = _REF.match(text)
        if not m or not _NAME.match(m["name"]):
            raise RegistryError(
                f"{ref!r} is not a model reference. Write registry://NAME@ALIAS, "
                "registry://NAME:VERSION or registry://NAME (the newest version)."
            )
        version = int(m["version"]) if m["version"] else None
        return ModelRef(m["name"], m["alias"], version)

    def __str__(self) -> str:
        tail = f"@{self.alias}" if self.alias else f":{self.version}" if self.version else ""
        return f"{SCHEME}{self.name}{tail}"


@dataclass(frozen=True)
class ModelVersion:
    """One committed version; its files are read through the version's manifest."""

    name: str
    version: int
    uri: str
    meta: dict[str, Any]
    files: dict[str, FileEntry]
    options: storage.StorageOptions | None = None

    def read(self, file: str) -> bytes:
        """A file of the version, checked against the manifest.

        Raises:
            RegistryError: Not in the manifest, or its bytes do not match it.
        """
        entry = self.files.get(file)
        if entry is None:
            raise RegistryError(f"{self}: has no file {file!r} (it has {sorted(self.files)})")
        data = storage.read_bytes(storage.join(self.uri, file), self.options)
        if FileEntry.of(data) != entry:
            raise RegistryError(
                f"{self}: {file} does not match the version's manifest (corrupted or "
                "overwritten). Register the export again as a new version."
            )
        return data

    @property
    def export_manifest(self) -> dict[str, Any]:
        return json.loads(self.read("export/manifest.json"))

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.meta.get("metrics", {}))

    def profile(self) -> ReferenceProfile:
        """The training data's reference profile.

        Raises:
            RegistryError: The version was registered without one.
        """
        if "data_profile.json" not in self.files:
            raise RegistryError(
                f"{self} has no data_profile.json, so nothing to compare new data with. "
                "Register an export whose run folder holds one (forge writes it when the "
                "data comes through forge.data), or pass --profile to `registry register`."
            )
        return load_profile(self.read("data_profile.json"), f"{self}/data_profile.json")

    def local_file(self, file: str) -> str:
        """A path on this machine holding the verified ``file`` (a temp copy when remote)."""
        import os
        import tempfile

        data = self.read(file)
        folder = tempfile.mkdtemp(prefix=f"forge-{self.name}-v{self.version}-")
        path = os.path.join(folder, os.path.basename(file))
        with open(path, "wb") as f:
            f.write(data)
        return path

    def __str__(self) -> str:
        return f"{SCHEME}{self.name}:{self.version}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sortable_now() -> str:
    """UTC time to the nanosecond, from one clock reading, sortable as text."""
    ns = time.time_ns()
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(ns // 10**9))}-{ns % 10**9:09d}"


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Registry:
    """The registry at ``uri``.

    Args:
        uri: Root folder (local path or ``s3://bucket/prefix``).
        options: Storage options (endpoint, retries).
        mlflow_uri: When set, every register/promote/rollback is mirrored to the MLflow Model
            Registry at this tracking URI (aliases, not the deprecated stages).

    Example:
        >>> import tempfile
        >>> reg = Registry(tempfile.mkdtemp())
        >>> reg.models()
        []
    """

    def __init__(
        self,
        uri: str,
        options: storage.StorageOptions | None = None,
        mlflow_uri: str | None = None,
    ) -> None:
        self.uri = storage.normalize(uri)
        self.options = options
        self.mlflow_uri = mlflow_uri

    # -- paths --------------------------------------------------------------------------------

    def _model(self, name: str) -> str:
        if not _NAME.match(name):
            raise RegistryError(
                f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)."
            )
        return storage.join(self.uri, name)

    def _version_uri(self, name: str, version: int) -> str:
        return storage.join(self._model(name), "versions", f"{version:06d}")

    # -- reading ------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the registered models."""
        return sorted(
            e["name"]
            for e in storage.list_dir(self.uri, self.options)
            if e.get("type") == "directory" and _NAME.match(e["name"])
        )

    def versions(self, name: str) -> list[int]:
        """Committed version numbers of ``name`` (a version counts once its manifest exists)."""
        out = []
        for e in storage.list_dir(storage.join(self._model(name), "versions"), self.options):
            if e["name"].isdigit():
                number = int(e["name"])
                if storage.exists(
                    storage.join(self._version_uri(name, number), "manifest.json"), self.options
                ):
                    out.append(number)
        return sorted(out)

    def get(self, name: str, version: int) -> ModelVersion:
        """A committed version, its manifest checked.

        Raises:
            RegistryError: No such committed version.
        """
        uri = self._version_uri(name, version)
        try:
            raw = json.loads(storage.read_bytes(storage.join(uri, "manifest.json"), self.options))
        except FileNotFoundError:
            have = self.versions(name)
            raise RegistryError(
                f"{SCHEME}{name}:{version} does not exist (committed versions: "
                f"{have or 'none'}). `python -m forge registry list` shows what there is."
            ) from None
        if raw.get("format") != VERSION_FORMAT or raw.get("version") != 1:
            raise RegistryError(f"{uri}: unknown version format {raw.get('format')!r}")
        files = {k: FileEntry(**v) for k, v in raw["files"].items()}
        mv = ModelVersion(name, version, uri, {}, files, self.options)
        meta = json.loads(mv.read("version.json"))
        return ModelVersion(name, version, uri, meta, files, self.options)

    def alias(self, name: str, alias: str) -> dict[str, Any] | None:
        """The current record of ``alias`` (``version``, ``previous``, ``generation``, ...)."""
        gen = self._generation(name, alias)
        if gen == 0:
            return None
        return json.loads(storage.read_bytes(self._alias_uri(name, alias, gen), self.options))

    def aliases(self, name: str) -> dict[str, int]:
        """Alias -> version for every alias of ``name``."""
        out = {}
        for e in storage.list_dir(storage.join(self._model(name), "aliases"), self.options):
            record = self.alias(name, e["name"])
            if record is not None and record["version"] is not None:
                out[e["name"]] = record["version"]
        return out

    def resolve(self, ref: str | ModelRef) -> ModelVersion:
        """The version a reference points at.

        Raises:
            RegistryError: Unknown model, alias or version.

        Example:
            >>> import tempfile
            >>> Registry(tempfile.mkdtemp()).resolve("registry://tabular@champion")
            Traceback (most recent call last):
            ...
            forge.mlops.registry.RegistryError: registry://tabular@champion: the alias is not set...
        """
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if ref.alias:
            record = self.alias(ref.name, ref.alias)
            if record is None or record["version"] is None:
                raise RegistryError(
                    f"{ref}: the alias is not set. Promote a version first: python -m forge "
                    f"registry promote {ref.name}:VERSION --alias {ref.alias}"
                )
            return self.get(ref.name, record["version"])
        if ref.version is not None:
            return self.get(ref.name, ref.version)
        have = self.versions(ref.name)
        if not have:
            raise RegistryError(f"{ref}: no committed version of {ref.name!r}.")
        return self.get(ref.name, have[-1])

    def audit(self, name: str) -> list[dict[str, Any]]:
        """The audit log of ``name``, oldest first."""
        folder = storage.join(self._model(name), "audit")
        names = sorted(e["name"] for e in storage.list_dir(folder, self.options))
        return [
            json.loads(storage.read_bytes(storage.join(folder, n), self.options)) for n in names
        ]

    # -- writing ------------------------------------------------------------------------------

    def log(self, name: str, action: str, **facts: Any) -> dict[str, Any]:
        """Append one audit entry (who, what, when, why, numbers); never rewrites one."""
        entry = {
            "time": _now(),
            "unix_time": time.time(),
            "actor": _actor(),
            "model": name,
            "action": action,
            **facts,
        }
        key = f"{_sortable_now()}-{uuid.uuid4().hex[:8]}.json"
        uri = storage.join(self._model(name), "audit", key)
        if not storage.create_exclusive(uri, json.dumps(entry, indent=1).encode(), self.options):
            raise RegistryError(f"{uri}: an audit entry of that name exists already")
        return entry

    def register(
        self,
        name: str,
        export_uri: str,
        *,
        profile: dict[str, Any] | bytes | None = None,
        source_run: str | None = None,
        metrics: dict[str, float] | None = None,
        reason: str = "",
        extra: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Copy a committed export (docs/FORMATS.md) into a new numbered version.

        Args:
            name: Model name.
            export_uri: The export folder (its ``manifest.json`` must verify).
            profile: The reference ``data_profile.json``; None looks for it in the run folder
                (``<export>/../../data_profile.json``, then beside the source checkpoint's
                ``checkpoints/`` folder).
            source_run: The run folder; None derives it as above.
            metrics: Metrics to record; None takes the export manifest's.
            reason: Why, for the audit log.
            extra: More facts for ``version.json`` (e.g. the training window).

        Raises:
            RegistryError: The export is not committed, does not verify, or has no servable
                format.
        """
        export_uri = storage.normalize(export_uri)
        export_manifest, blobs = self._read_export(export_uri)
        run = source_run or self._guess_run(export_uri, export_manifest)
        if profile is None and run is not None:
            try:
                profile = storage.read_bytes(storage.join(run, "data_profile.json"), self.options)
            except FileNotFoundError:
                profile = None
        files: dict[str, bytes] = {f"export/{k}": v for k, v in blobs.items()}
        fingerprint = None
        if profile is not None:
            parsed = load_profile(profile, "data profile")
            files["data_profile.json"] = json.dumps(parsed.raw, indent=1).encode()
            fingerprint = parsed.raw.get("fingerprint")
        version = self._claim(name)
        uri = self._version_uri(name, version)
        meta = {
            "format": VERSION_FORMAT,
            "name": name,
            "version": version,
            "created_at": _now(),
            "created_by": _actor(),
            "export_uri": export_uri,
            "export_manifest_sha256": FileEntry.of(blobs["manifest.json"]).sha256,
            "source_run": run,
            "source_checkpoint": export_manifest.get("source_checkpoint"),
            "recipe": export_manifest.get("recipe"),
            "metrics": metrics if metrics is not None else export_manifest.get("metrics", {}),
            "data_fingerprint": fingerprint,
            "formats": {k: v.get("status") for k, v in export_manifest.get("formats", {}).items()},
            "inputs": export_manifest.get("inputs"),
            "outputs": export_manifest.get("outputs"),
            **(extra or {}),
        }
        files["version.json"] = json.dumps(meta, indent=1).encode()
        for rel, data in files.items():
            storage.write_bytes(storage.join(uri, rel), data, self.options)
        manifest = {
            "format": VERSION_FORMAT,
            "version": 1,
            "files": {rel: FileEntry.of(d).__dict__ for rel, d in files.items()},
        }
        storage.write_bytes(
            storage.join(uri, "manifest.json"),
            json.dumps(manifest, indent=1).encode(),
            self.options,
        )
        self.log(
            name,
            "register",
            version=version,
            export_uri=export_uri,
            reason=reason,
            metrics=meta["metrics"],
        )
        mv = self.get(name, version)
        self._mirror(lambda m: m.register(mv))
        return mv

    def promote(
        self,
        name: str,
        version: int,
        alias: str = "champion",
        *,
        reason: str = "",
        metrics: dict[str, Any] | None = None,
        expected_generation: int | None = None,
    ) -> dict[str, Any]:
        """Point ``alias`` at ``version`` (a conditional write; see the module docstring).

        Args:
            expected_generation: The alias generation the caller decided on; None reads it
                now. A different current generation is a conflict.

        Raises:
            RegistryError: The version does not exist.
            AliasConflictError: Another writer moved the alias meanwhile; the alias is theirs.
        """
        self.get(name, version)  # refuse aliases to versions that are not committed
        return self._move(name, alias, version, "promote", reason, metrics, expected_generation)

    def rollback(self, name: str, alias: str = "champion", *, reason: str = "") -> dict[str, Any]:
        """Move ``alias`` back to the version it held before its last move.

        Raises:
            RegistryError: The alias is unset or has no previous holder.
            AliasConflictError: Another writer moved it meanwhile.
        """
        current = self.alias(name, alias)
        if current is None or current.get("previous") is None:
            raise RegistryError(f"{SCHEME}{name}@{alias} has no previous version to roll back to.")
        return self._move(
            name, alias, current["previous"], "rollback", reason, None, current["generation"]
        )

    # -- monitoring history (input of forge.mlops.policy) -------------------------------------

    def record_batch(self, name: str, entry: dict[str, Any]) -> None:
        """Append one monitored batch (``time``, ``rows``, ``drift``, ...) to the history."""
        key = f"{_sortable_now()}-{uuid.uuid4().hex[:8]}.json"
        uri = storage.join(self._model(name), "monitor", "history", key)
        storage.create_exclusive(uri, json.dumps(entry).encode(), self.options)

    def batches(self, name: str) -> list[dict[str, Any]]:
        """The monitored batches of ``name``, oldest first."""
        folder = storage.join(self._model(name), "monitor", "history")
        names = sorted(e["name"] for e in storage.list_dir(folder, self.options))
        return [
            json.loads(storage.read_bytes(storage.join(folder, n), self.options)) for n in names
        ]

    def last_event(self, name: str, action: str) -> dict[str, Any] | None:
        """The newest audit entry with ``action``, or None."""
        found = [e for e in self.audit(name) if e["action"] == action]
        return found[-1] if found else None

    # -- internals ----------------------------------------------------------------------------

    def _alias_uri(self, name: str, alias: str, generation: int) -> str:
        if not _NAME.match(alias):
            raise RegistryError(f"alias {alias!r}: use letters, digits, '.', '_' or '-'.")
        return storage.join(self._model(name), "aliases", alias, f"{generation:08d}.json")

    def _generation(self, name: str, alias: str) -> int:
        folder = storage.join(self._model(name), "aliases", alias)
        gens = [
            int(e["name"][:-5])
            for e in storage.list_dir(folder, self.options)
            if e["name"].endswith(".json") and e["name"][:-5].isdigit()
        ]
        return max(gens, default=0)

    def _move(
        self,
        name: str,
        alias: str,
        version: int,
        action: str,
        reason: str,
        metrics: dict[str, Any] | None,
        expected: int | None,
    ) -> dict[str, Any]:
        current_gen = self._generation(name, alias)
        base = current_gen if expected is None else expected
        previous = None
        if base > 0:
            previous = json.loads(
                storage.read_bytes(self._alias_uri(name, alias, base), self.options)
            )["version"]
        record = {
            "format": ALIAS_FORMAT,
            "alias": alias,
            "version": version,
            "previous": previous,
            "generation": base + 1,
            "action": action,
            "moved_at": _now(),
            "moved_by": _actor(),
            "reason": reason,
        }
        won = current_gen == base and storage.create_exclusive(
            self._alias_uri(name, alias, base + 1),
            json.dumps(record, indent=1).encode(),
            self.options,
        )
        if not won:
            holder = self.alias(name, alias) or {}
            self.log(
                name,
                f"{action}-conflict",
                alias=alias,
                version=version,
                previous=previous,
                reason=reason,
                metrics=metrics,
                winner=holder.get("version"),
                winner_by=holder.get("moved_by"),
            )
            raise AliasConflictError(
                f"{SCHEME}{name}@{alias} was moved by {holder.get('moved_by')} to version "
                f"{holder.get('version')} (generation {holder.get('generation')}) while this "
                f"{action} to version {version} was deciding; the alias stays theirs. Check "
                f"`python -m forge registry show {name}@{alias}` and retry if still wanted."
            )
        self.log(
            name,
            action,
            alias=alias,
            version=version,
            previous=previous,
            reason=reason,
            metrics=metrics,
            generation=base + 1,
        )
        self._mirror(lambda m: m.set_alias(name, alias, version))
        return record

    def _claim(self, name: str) -> int:
        folder = storage.join(self._model(name), "versions")
        taken = [
            int(e["name"]) for e in storage.list_dir(folder, self.options) if e["name"].isdigit()
        ]
        number = max(taken, default=0) + 1
        # Each claim is an exclusive create: two registrations never share a number.
        while not storage.create_exclusive(
            storage.join(self._version_uri(name, number), ".claim"),
            _actor().encode(),
            self.options,
        ):
            number += 1
        return number

    def _read_export(self, uri: str) -> tuple[dict[str, Any], dict[str, bytes]]:
        try:
            raw = storage.read_bytes(storage.join(uri, "manifest.json"), self.options)
        except FileNotFoundError:
            raise RegistryError(
                f"{uri}: no manifest.json, so not a committed export. Export a checkpoint "
                "first: python -m forge export <checkpoint>."
            ) from None
        manifest = json.loads(raw)
        if manifest.get("format") != EXPORT_FORMAT or manifest.get("version") != 1:
            raise RegistryError(
                f"{uri}: format {manifest.get('format')!r} version {manifest.get('version')!r}"
                f" is not {EXPORT_FORMAT} version 1."
            )
        ok = [k for k, v in manifest.get("formats", {}).items() if v.get("status") == "ok"]
        if not ok:
            raise RegistryError(
                f"{uri}: no format passed export (statuses: "
                f"{ {k: v.get('status') for k, v in manifest.get('formats', {}).items()} }); "
                "an export that failed its parity gate cannot be registered."
            )
        blobs = {"manifest.json": raw}
        for rel, entry in manifest["files"].items():
            data = storage.read_bytes(storage.join(uri, rel), self.options)
            if FileEntry.of(data) != FileEntry(**entry):
                raise RegistryError(f"{uri}/{rel} does not match the export's manifest.")
            blobs[rel] = data
        return manifest, blobs

    def _guess_run(self, export_uri: str, manifest: dict[str, Any]) -> str | None:
        candidates = []
        parts = export_uri.rstrip("/").rsplit("/", 2)
        if len(parts) == 3 and parts[1] == "exports":
            candidates.append(parts[0])
        ckpt = manifest.get("source_checkpoint")
        if ckpt:
            head = storage.normalize(ckpt).rstrip("/").rsplit("/", 2)
            if len(head) == 3 and head[1] == "checkpoints":
                candidates.append(head[0])
        for run in candidates:
            if storage.exists(storage.join(run, "data_profile.json"), self.options):
                return run
        return candidates[0] if candidates else None

    def _mirror(self, fn: Any) -> None:
        if self.mlflow_uri:
            from forge.mlops.mlflow_mirror import MlflowMirror

            fn(MlflowMirror(self.mlflow_uri))
