"""The typed ``export`` settings: the validated form of ``configs/export/default.yaml``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from forge.config.specs import PositiveInt, Spec

FormatName = Literal["onnx", "torch_export", "safetensors", "torchscript"]
DEFAULT_FORMATS: tuple[FormatName, ...] = ("onnx", "torch_export", "safetensors")


class Tolerance(Spec):
    """Elementwise parity bound: ``|actual - eager| <= atol + rtol * |eager|`` (numpy's
    ``allclose`` rule); defaults as HF Optimum's validation uses for fp32 (atol 1e-5)."""

    rtol: float = Field(1e-3, ge=0)
    atol: float = Field(1e-5, ge=0)


class Tolerances(Spec):
    default: Tolerance = Tolerance()
    onnx: Tolerance | None = None
    torch_export: Tolerance | None = None
    safetensors: Tolerance | None = None
    torchscript: Tolerance | None = None

    def for_format(self, fmt: str) -> Tolerance:
        """The tolerance of ``fmt``: its own, or the default."""
        return getattr(self, fmt, None) or self.default


class ExportSettings(Spec):
    """What ``forge export`` produces and how strictly it is checked.

    Example:
        >>> ExportSettings(formats=["onnx"], batch_size=8).parity_sizes()
        [1, 8, 32]
        >>> ExportSettings(batch_size=1)
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for ExportSettings
        ...
    """

    formats: list[FormatName] = Field(default_factory=lambda: list(DEFAULT_FORMATS))
    pick: Literal["latest", "best"] = "latest"
    out: str | None = None
    overwrite: bool = False
    opset: int = Field(18, ge=7)
    batch_size: int = Field(4, ge=2, description="example batch; >= 2 or dims specialize")
    parity_batch_sizes: list[PositiveInt] | None = None
    parity_seq_lens: list[PositiveInt] | None = None
    onnx_external_data_mb: float = Field(512, ge=0)
    tolerance: Tolerances = Tolerances()
    latency_batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 64])
    latency_repeats: PositiveInt = 20
    max_latency_ms: float | None = Field(None, gt=0)
    max_size_mb: float | None = Field(None, gt=0)
    license: str | None = None

    @model_validator(mode="after")
    def _formats_not_empty(self) -> ExportSettings:
        if not self.formats:
            raise ValueError("export.formats is empty: name at least one format")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"export.formats={self.formats} lists a format twice")
        return self

    def parity_sizes(self) -> list[int]:
        """Batch sizes of the golden cases: 1, the export size and a larger one."""
        sizes = self.parity_batch_sizes or [1, self.batch_size, 4 * self.batch_size]
        return sorted(set(sizes))
