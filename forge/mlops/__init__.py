"""The MLOps loop: drift monitoring, a model registry, retraining policy, batch scoring.

Modules (each imported on use; nothing heavy loads at ``import forge.mlops``):

* :mod:`forge.mlops.reference` reads a ``data_profile.json`` (docs/FORMATS.md) and rebuilds what
  the statistics need from it (a quantile-reconstructed sample, frozen bins).
* :mod:`forge.mlops.drift` per-feature drift tests, multiple-testing control, the verdict.
* :mod:`forge.mlops.report` ``drift.json`` and the self-contained HTML report.
* :mod:`forge.mlops.registry` versions, aliases moved by conditional writes, the audit log.
* :mod:`forge.mlops.policy` when to retrain and whether a challenger may be promoted.
* :mod:`forge.mlops.cli` the ``registry``, ``monitor`` and ``score`` verbs.
"""
