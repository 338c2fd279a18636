"""Scoring pandas batches with a registered model's ONNX artifact through onnxruntime.

The model's input columns are the reference profile's features, in the profile's order (the
training data's column order, which is forge.data's feature order for numeric columns); the
export's first input must take exactly that many. Nulls go in as NaN, as in training (the
tabular model maps them to the training mean). Categorical inputs are refused for now. Used by
``python -m forge score`` inside Ray Data ``map_batches`` and, directly, by evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from forge.errors import ConfigError


class OnnxScorer:
    """One onnxruntime session over a model's ONNX bytes.

    Args:
        model: The ONNX model's bytes (verified against the registry manifest by the caller).
        features: Input column names, in the order the model expects them.
        providers: onnxruntime execution providers; None: CUDA when available, else CPU.

    Example:
        >>> import sys; sys.path.insert(0, "tests")
        >>> from mlops_stubs import make_onnx
        >>> import pandas as pd
        >>> s = OnnxScorer(make_onnx(np.array([[1.0, -1.0]]), np.zeros(2)), ["a"])
        >>> s.predict(pd.DataFrame({"a": [2.0, -3.0]}))["prediction"].tolist()
        [0, 1]
    """

    def __init__(
        self, model: bytes, features: list[str], providers: list[str] | None = None
    ) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider",) if p in available]
            providers.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # Ray Data runs one scorer per CPU slot
        self.session = ort.InferenceSession(model, options, providers=providers)
        self.features = list(features)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        width = inp.shape[-1] if inp.shape else None
        if isinstance(width, int) and width != len(self.features):
            raise ConfigError(
                f"the model's input {inp.name!r} takes {width} features but its reference "
                f"profile lists {len(self.features)}; the export and the profile belong to "
                "different models. Register the export with its own run's data_profile.json."
            )

    @staticmethod
    def from_version(mv: Any, providers: list[str] | None = None) -> OnnxScorer:
        """The scorer of a registry :class:`~forge.mlops.registry.ModelVersion`.

        Raises:
            ConfigError: The version's ONNX format did not pass export (must not be served).
        """
        status = mv.export_manifest.get("formats", {}).get("onnx", {}).get("status")
        if status != "ok":
            raise ConfigError(
                f"{mv}: its ONNX export has status {status!r}; a format that did not pass the "
                "parity gate is not served. Export again and register the new version."
            )
        profile = mv.profile()
        categorical = [c for c in profile.features if profile.columns[c]["kind"] != "numeric"]
        if categorical:
            # The one-hot encoding of a file source's categorical columns is forge.data's
            # (TableInfo.encode) and is not part of the export yet: refuse, never mis-feed.
            raise ConfigError(
                f"{mv}: inputs {categorical[:5]} are categorical; scoring raw rows of models "
                "with categorical inputs is not supported yet (their one-hot encoding is not "
                "in the export). Train on numeric columns (data.columns=[...]) to score here."
            )
        files = mv.export_manifest["formats"]["onnx"].get("files", ["model.onnx"])
        if len(files) > 1:  # external weights: onnxruntime needs the files side by side
            import os

            path = mv.local_file(f"export/{files[0]}")
            for other in files[1:]:
                with open(os.path.join(os.path.dirname(path), other), "wb") as f:
                    f.write(mv.read(f"export/{other}"))
            with open(path, "rb") as f:
                model = f.read()
        else:
            model = mv.read(f"export/{files[0]}")
        return OnnxScorer(model, profile.features, providers)

    def check_columns(self, columns: Any) -> None:
        """Raise ConfigError naming the model inputs a batch lacks."""
        missing = [c for c in self.features if c not in set(columns)]
        if missing:
            raise ConfigError(
                f"the data lacks {len(missing)} of the model's {len(self.features)} input "
                f"columns: {', '.join(map(repr, missing[:10]))}"
                f"{' ...' if len(missing) > 10 else ''}. Point data.source at data with the "
                "columns the model was trained on."
            )

    def predict(self, frame: Any) -> dict[str, np.ndarray]:
        """Class predictions (argmax) and the winning class's softmax probability.

        Args:
            frame: A pandas DataFrame with every input column (others are ignored).

        Returns:
            ``{"prediction": int64 (rows,), "probability": float32 (rows,)}``.
        """
        self.check_columns(frame.columns)
        x = frame[self.features].to_numpy(dtype=np.float32)
        logits = self.session.run(None, {self.input_name: x})[0]
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        prediction = probs.argmax(axis=1)
        return {
            "prediction": prediction.astype(np.int64),
            "probability": probs[np.arange(len(probs)), prediction].astype(np.float32),
        }


def accuracy(scorer: OnnxScorer, frame: Any, label: str) -> float:
    """Share of rows whose predicted class equals ``frame[label]``."""
    pred = scorer.predict(frame)["prediction"]
    return float(np.mean(pred == frame[label].to_numpy().astype(np.int64)))
