"""Real data for forge runs: file sources through Ray Data, contracts, fingerprint, profile.

Modules (each one job; heavy imports stay inside them):

* :mod:`forge.data.source`: list a Parquet/CSV file, folder or glob (local or ``s3://``) with
  sizes and versions; stream it on the driver one batch at a time.
* :mod:`forge.data.contract`: data contracts (pandera per-row checks, table checks), the
  violation table, ``infer_contract``.
* :mod:`forge.data.profile`: ``data_profile.json`` (``docs/FORMATS.md``); ``bin_counts`` bins
  new data against its frozen edges, ``loads`` reads it with a version check.
* :mod:`forge.data.fingerprint`: which data a run saw (``run.json``, checkpoint manifests).
* :mod:`forge.data.split`: the seeded hash split into train and validation.
* :mod:`forge.data.prepare`: the driver's pass before launch (``prepare(spec)``).
* :mod:`forge.data.feed`: Ray Data datasets for the launcher, each worker's shard.
* :mod:`forge.data.cli`: ``python -m forge validate-data`` / ``infer-contract``.
"""
