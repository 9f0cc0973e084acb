"""Multi-host start-up: a thin, environment-driven wrapper of jax.distributed.

Single process: nothing happens. Several processes: every process calls
`initialize()` before touching devices, then JAX's multi-controller SPMD runs
the same program everywhere over the global mesh.

Environment (all optional):
  ASURA_COORDINATOR     host:port of process 0 (GPU clusters, local tests)
  ASURA_NUM_PROCESSES   total processes
  ASURA_PROCESS_ID      this process's rank
  ASURA_LOCAL_DEVICES   comma-separated local device ids (GPU: one process per GPU)
  ASURA_DISTRIBUTED=auto  let JAX discover the cluster (Cloud TPU pod slices, SLURM)
"""

from __future__ import annotations

import os

import jax

_INITIALIZED = False


def initialize() -> None:
    """Initialise jax.distributed from the environment; a no-op for one process."""
    global _INITIALIZED
    if _INITIALIZED:
        return
    env = os.environ
    if env.get("ASURA_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        _INITIALIZED = True
        return
    num = int(env.get("ASURA_NUM_PROCESSES", "1"))
    if num <= 1:
        return
    coordinator = env.get("ASURA_COORDINATOR")
    if not coordinator or "ASURA_PROCESS_ID" not in env:
        raise ValueError("ASURA_NUM_PROCESSES > 1 needs ASURA_COORDINATOR=host:port and ASURA_PROCESS_ID")
    # CPU processes need a collectives backend to talk to each other; the flag
    # only affects the CPU client, so it is harmless on GPU/TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local = env.get("ASURA_LOCAL_DEVICES")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num,
        process_id=int(env["ASURA_PROCESS_ID"]),
        local_device_ids=[int(x) for x in local.split(",")] if local else None,
    )
    _INITIALIZED = True


def is_main_process() -> bool:
    return jax.process_index() == 0
