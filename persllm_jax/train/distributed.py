"""Multi-host start-up: `jax.distributed.initialize()` from the config or the usual environment.

Order of precedence for each of coordinator address, process count and process id: the config keys
(`coordinator_address`, `num_processes`, `process_id`), then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, then JAX's own cluster detection (Cloud TPU VMs, SLURM, Open MPI, Kubernetes), which is what
a bare `jax.distributed.initialize()` does. On CPU the cross-process collectives are gloo (JAX 0.10's
default, set explicitly so a changed default cannot silently break the CPU multi-process path).
"""

from __future__ import annotations

import os

import jax

from persllm_jax.errors import PersllmError


class DistributedError(PersllmError, RuntimeError):
    pass


def init_kwargs(cfg) -> dict:
    """The explicit arguments for jax.distributed.initialize (unset ones are left to JAX's autodetection)."""
    kw = {}
    addr = getattr(cfg, "coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    n = getattr(cfg, "num_processes", 0) or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = getattr(cfg, "process_id", -1)
    if pid < 0 and os.environ.get("JAX_PROCESS_ID", "") != "":
        pid = int(os.environ["JAX_PROCESS_ID"])
    if addr:
        kw["coordinator_address"] = addr
    if n:
        kw["num_processes"] = n
    if pid >= 0:
        kw["process_id"] = pid
    if kw and not {"coordinator_address", "num_processes", "process_id"} <= set(kw) and not _autodetectable():
        missing = {"coordinator_address", "num_processes", "process_id"} - set(kw)
        raise DistributedError(f"distributed: set {', '.join(sorted(missing))} too (config keys or JAX_* "
                               f"environment variables); only {', '.join(sorted(kw))} were given")
    return kw


def _autodetectable() -> bool:
    """A cluster JAX recognises by itself (the coordinator comes from it)."""
    return any(os.environ.get(v) for v in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "PMIX_NAMESPACE",
                                           "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "KUBERNETES_SERVICE_HOST"))


def initialize(cfg, log=print) -> bool:
    """Join the multi-host runtime when `cfg.distributed` is set (once per process). Returns whether it is on."""
    if not getattr(cfg, "distributed", False):
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = init_kwargs(cfg)
    try:
        jax.distributed.initialize(**kw)
    except (ValueError, RuntimeError) as e:
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistributedError(f"distributed: jax.distributed.initialize({args}) failed: {why}") from None
    if jax.process_index() == 0:
        log(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} per process, {jax.devices()[0].platform})")
    return True


def is_main() -> bool:
    """Process 0 writes logs, metrics and run files; every process takes part in checkpoints."""
    return jax.process_index() == 0


def gather(tree):
    """A pytree of (possibly non-addressable) global arrays as host numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


__all__ = ["initialize", "init_kwargs", "is_main", "gather", "DistributedError"]
