"""Optional mirror of the registry to the MLflow Model Registry (``registry.mlflow_uri``).

forge's registry stays the source of truth; MLflow gets a registered model per name, a model
version per forge version (its source is the forge version's ``export/`` folder, tagged with
``forge.version``), and the same aliases (MLflow's aliases, not its deprecated stages).
"""

from __future__ import annotations

from typing import Any


class MlflowMirror:
    """Writes registry events to the MLflow Model Registry at ``tracking_uri``.

    Example:
        >>> MlflowMirror("sqlite:////tmp/mlflow.db").tracking_uri  # doctest: +SKIP
        'sqlite:////tmp/mlflow.db'
    """

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def register(self, mv: Any) -> str:
        """Create the MLflow model version of forge version ``mv``; returns its number."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(mv.name, tags={"forge.registry": "true"})
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        existing = self._find(mv.name, mv.version)
        if existing is not None:
            return existing
        created = self.client.create_model_version(
            mv.name,
            source=f"{mv.uri}/export",
            tags={"forge.version": str(mv.version), "forge.uri": str(mv)},
            description=f"forge {mv}: metrics {mv.metrics}",
        )
        return str(created.version)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point MLflow's alias at the MLflow version mirroring forge ``version``."""
        mlflow_version = self._find(name, version)
        if mlflow_version is None:
            raise LookupError(f"{name}:{version} was never mirrored to {self.tracking_uri}")
        self.client.set_registered_model_alias(name, alias, mlflow_version)

    def _find(self, name: str, version: int) -> str | None:
        for mv in self.client.search_model_versions(f"name='{name}'"):
            if mv.tags.get("forge.version") == str(version):
                return str(mv.version)
        return None
