"""Starting or joining Ray, and checking that the cluster can place the run before it starts."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from forge.config.specs import RaySpec, ScalingSpec, StorageSpec
from forge.errors import ClusterError


@contextmanager
def ray_session(spec: RaySpec, verbose: bool = False) -> Iterator[None]:
    """Join the cluster at ``ray.address``, or start an embedded one and stop it afterwards.

    ``ray.address=null`` always starts forge's own local Ray (``ray.init(address="local")``),
    even when ``RAY_ADDRESS`` is set or another cluster runs on this machine: a bare
    ``ray.init()`` would join that one. ``auto`` joins the cluster running here (or the one
    ``RAY_ADDRESS`` names). If Ray is already initialized in this process (a notebook, a test
    session, a Ray job), that connection is used as is and left running.

    Raises:
        ClusterError: Ray could not start or connect, in one paragraph (never Ray's traceback).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    quiet = not verbose
    if quiet:
        # Ray's INFO chatter (dashboard URLs, worker-group events) is not what a user came for.
        for name in ("ray", "ray.train", "ray.tune", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Token auth stays on (it is the safe default); its start-up notice is noise here.
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    common = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
        "configure_logging": verbose,
    }
    embedded = spec.address in (None, "local")
    if embedded:
        try:
            ray.init(
                address="local",  # never someone else's cluster (RAY_ADDRESS, `ray start`)
                num_cpus=spec.num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                **common,
            )
        except Exception as exc:
            raise ClusterError(
                f"ray.address=null: could not start an embedded local Ray ({_first_line(exc)})."
                " Check free memory and disk space under /tmp (Ray's session folder), or join a "
                "running cluster with ray.address=auto or ray.address=<host:port>."
            ) from None
    else:
        assert spec.address is not None
        _probe(spec.address)
        try:
            ray.init(address=spec.address, **common)
        except Exception as exc:
            found = (
                "no running Ray cluster was found on this machine (and RAY_ADDRESS is unset)"
                if spec.address == "auto" and "Could not find any running Ray instance" in str(exc)
                else f"could not connect to a Ray cluster ({_first_line(exc)})"
            )
            raise ClusterError(
                f"ray.address={spec.address}: {found}. Start one with `ray start --head`, pass "
                "its address, or use ray.address=null to run on an embedded local Ray."
            ) from None
    try:
        yield
    finally:
        if embedded:
            ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a host:port address does not answer.

    ``ray.init`` keeps retrying an unreachable GCS for a long time before it gives up.
    """
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # let Ray interpret anything unusual
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(
            f"ray.address={address}: nothing answers at {host}:{port} ({exc.strerror or exc}). "
            "Check the address (`ray status` on the head node prints it), start a cluster with "
            "`ray start --head`, or use ray.address=null for an embedded local Ray."
        ) from None


def check_resources(scaling: ScalingSpec) -> None:
    """Refuse, before any worker starts, a run the cluster cannot place.

    Counts how many workers fit on the live nodes (each worker must fit on one node), which is
    what Ray's placement group will need; otherwise Ray would wait forever for resources.
    """
    import ray

    per_worker = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        per_worker["GPU"] = scaling.gpus_per_worker
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    if scaling.use_gpu and total_gpus == 0:
        raise ClusterError(
            "scaling.use_gpu=true, but this Ray cluster has no GPUs. Set scaling.use_gpu=false "
            "to train on CPU, or connect to a cluster with GPUs (ray.address=...)."
        )
    fits = workers_that_fit(scaling, nodes)
    if fits < scaling.num_workers:
        total_cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
        need = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
        have = f"{total_cpus:g} CPUs" + (f" and {total_gpus:g} GPUs" if scaling.use_gpu else "")
        raise ClusterError(
            f"scaling.num_workers={scaling.num_workers} workers with {need} each do not fit: "
            f"the cluster ({len(nodes)} node(s), {have}) can place {fits}. Lower "
            f"scaling.num_workers to {max(fits, 1)}, lower scaling.cpus_per_worker"
            f"{' or scaling.gpus_per_worker' if scaling.use_gpu else ''}, or add nodes."
        )


def workers_that_fit(scaling: ScalingSpec, nodes: list[dict] | None = None) -> int:
    """How many workers of this shape the live nodes can hold at once (each on one node)."""
    import ray

    per_worker = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        per_worker["GPU"] = scaling.gpus_per_worker
    if nodes is None:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = 0
    for node in nodes:
        res = node["Resources"]
        fits += int(min(res.get(k, 0) / v for k, v in per_worker.items()) + 1e-9)
    return fits


def check_storage_shared(storage: StorageSpec) -> None:
    """Refuse a local ``storage.uri`` when the cluster spans several machines.

    Each machine would write its own copy of the run folder: rank 0's manifest would vouch
    for shards that other ranks left on other disks, and a resume would find half a
    checkpoint. Raylets on one machine share its disk, so machines are counted by address.
    ``storage.shared=true`` declares a file system every node mounts at the same path (NFS).
    """
    import ray

    hosts = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
    problem = local_storage_problem(storage, hosts)
    if problem:
        raise ClusterError(problem)


def local_storage_problem(storage: StorageSpec, hosts: list[str]) -> str | None:
    """The refusal message for ``storage`` on a cluster of ``hosts``, or None if it is fine.

    Example:
        >>> local_storage_problem(StorageSpec(uri="runs"), ["10.0.0.1"]) is None
        True
        >>> local_storage_problem(StorageSpec(uri="s3://bucket/runs"), ["10.0.0.1", "10.0.0.2"])
        >>> local_storage_problem(StorageSpec(uri="runs"), ["10.0.0.1", "10.0.0.2"])[:40]
        'storage.uri=runs is a local path, but th'
    """
    scheme = storage.uri.split("://", 1)[0] if "://" in storage.uri else "file"
    if scheme != "file" or storage.shared or len(hosts) < 2:
        return None
    return (
        f"storage.uri={storage.uri} is a local path, but this Ray cluster spans {len(hosts)} "
        f"machines ({', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''}): each would "
        "write its own part of the run folder to its own disk, and no checkpoint would be "
        "whole. Use object storage (storage=s3 storage.uri=s3://bucket/prefix), or, if the "
        "path is a file system that every node mounts at the same place (NFS, Lustre), say so "
        "with storage.shared=true."
    )
