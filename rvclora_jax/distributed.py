"""Training on several processes (hosts) with JAX's multi-controller runtime, ``jax.distributed``.

Every process runs the same program (``rvclora train`` with the same flags and data); JAX's
runtime joins them into one set of global devices and XLA runs each step as one SPMD program
over all of them, with the gradient all-reduce between hosts. Nothing here is a home-made
communication layer: this module only wires that runtime into the training run.

Life cycle of a multi-host run:

1. :func:`resolve` reads the coordinator address, process count and process id from the
   command line (``--coordinator HOST:PORT --num-processes N --process-id I``) or the
   environment (``RVCLORA_COORDINATOR`` …, or JAX's own ``JAX_COORDINATOR_ADDRESS``);
   ``auto`` leaves them to JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU pods,
   Kubernetes, mpi4py). No setting at all means one process: nothing changes.
2. :func:`initialize` calls ``jax.distributed.initialize`` before any JAX computation
   (CPU hosts use gloo collectives). Afterwards ``jax.devices()`` lists every process's devices.
3. The :class:`~rvclora_jax.train.Trainer`'s 1-D ``data`` mesh spans those global devices;
   parameters and optimiser state are replicated, batches sharded along rows.
4. Every process builds the same (deterministic) :class:`~rvclora_jax.data.Batches` plan;
   :class:`ProcessBatches` collates only this process's rows of each global batch and
   :func:`put_process_batch` (``jax.make_array_from_process_local_data``) assembles the global
   array from every process's rows. So ``--batch-size`` is the GLOBAL batch.
5. :class:`StopFlag`: Ctrl-C / SIGTERM on any process stops every process after the same step
   (the checkpoint save that follows is a collective: processes that disagreed would hang).
6. Orbax saves and restores on every process (its saves are collective; the run directory
   must be on storage every host sees at the same path). Only the primary process
   (:func:`is_primary`, process 0) writes metrics, samples, the adapter and ``model.pth``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator, Mapping, Sequence

import numpy as np

ENV_COORDINATOR = "RVCLORA_COORDINATOR"
ENV_NUM_PROCESSES = "RVCLORA_NUM_PROCESSES"
ENV_PROCESS_ID = "RVCLORA_PROCESS_ID"
AUTO = "auto"


class DistributedSetupError(ValueError):
    """A bad or incomplete multi-host setting (one line naming the flag or variable)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where the coordinator is and who this process is. ``coordinator == "auto"``: JAX's
    cluster auto-detection fills in whatever is ``None``."""

    coordinator: str
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def auto(self) -> bool:
        return self.coordinator == AUTO


_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _int(value, name: str, *, minimum: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise DistributedSetupError(f"{name} = {value!r}: expected an integer") from None
    if v < minimum:
        raise DistributedSetupError(f"{name} = {v}: expected an integer >= {minimum}")
    return v


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            environ: Mapping[str, str] | None = None) -> DistributedConfig | None:
    """The multi-host setting from flags (first) or the environment; ``None`` = one process.

    Environment: ``RVCLORA_COORDINATOR`` (``HOST:PORT`` or ``auto``), ``RVCLORA_NUM_PROCESSES``,
    ``RVCLORA_PROCESS_ID``; JAX's ``JAX_COORDINATOR_ADDRESS`` counts as a coordinator too.
    With an explicit ``HOST:PORT``, the process count and id are required unless JAX can
    detect them (``auto``)."""
    env = os.environ if environ is None else environ
    src_c = "--coordinator"
    if coordinator is None:
        for var in (ENV_COORDINATOR, "JAX_COORDINATOR_ADDRESS"):
            if env.get(var):
                coordinator, src_c = env[var], var
                break
    n = _int(num_processes, "--num-processes", minimum=1) if num_processes is not None else \
        _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES, minimum=1)
    i = _int(process_id, "--process-id", minimum=0) if process_id is not None else \
        _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID, minimum=0)
    if coordinator is None:
        if n is not None and n > 1 or i is not None and i > 0:
            raise DistributedSetupError(f"--num-processes/--process-id given without --coordinator HOST:PORT "
                                        f"(or {ENV_COORDINATOR}, or 'auto' for JAX's cluster detection)")
        return None
    coordinator = coordinator.strip()
    if coordinator.lower() == AUTO:
        return DistributedConfig(AUTO, n, i)
    if not _HOSTPORT.match(coordinator) or not 0 < int(coordinator.rsplit(":", 1)[1]) < 65536:
        raise DistributedSetupError(f"{src_c} = {coordinator!r}: expected HOST:PORT (e.g. node0:12355) or 'auto'")
    if n is None or i is None:
        raise DistributedSetupError(f"{src_c} {coordinator} needs --num-processes N and --process-id I "
                                    f"(or {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); use 'auto' on SLURM/MPI/TPU")
    if i >= n:
        raise DistributedSetupError(f"--process-id {i} is out of range for --num-processes {n} (0..{n - 1})")
    return DistributedConfig(coordinator, n, i)


def initialize(cfg: DistributedConfig | None, *, timeout_s: int = 300) -> bool:
    """Join the multi-host runtime (``jax.distributed.initialize``); must run before JAX
    computes anything in this process. Returns whether a multi-process runtime is active.
    ``None`` (one process) does nothing; a second call is a no-op."""
    import jax

    if cfg is None:
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    # CPU hosts exchange gradients over gloo (the default in recent jax; explicit for older ones).
    try:
        if jax.config.jax_cpu_collectives_implementation is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax without the option has no CPU cross-process collectives to pick
        pass
    kw = {} if cfg.auto else {"coordinator_address": cfg.coordinator}
    if cfg.num_processes is not None:
        kw["num_processes"] = cfg.num_processes
    if cfg.process_id is not None:
        kw["process_id"] = cfg.process_id
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **kw)
    except (RuntimeError, ValueError) as e:
        where = "JAX's cluster auto-detection" if cfg.auto else f"coordinator {cfg.coordinator}"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedSetupError(f"multi-host setup failed ({where}): {msg}") from e
    return True


def is_primary() -> bool:
    """Process 0: the one that writes the run's files."""
    import jax

    return jax.process_index() == 0


def is_multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def describe() -> str:
    """One line: this process among all processes and their devices."""
    import jax

    return (f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local / "
            f"{jax.device_count()} global {jax.devices()[0].platform} devices")


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op for one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------- this process's rows


def process_rows(sharding, global_rows: int) -> slice:
    """The rows of a ``[global_rows, ...]`` batch that this process's devices hold under
    ``sharding`` (rows sharded over a 1-D mesh). They must be one contiguous block, which
    they are when the mesh lists each process's devices together (``jax.devices()`` order)."""
    idx = sharding.addressable_devices_indices_map((global_rows,))
    starts = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in idx.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(f"this process's devices hold non-contiguous rows {starts} of the batch; "
                         f"order the mesh's devices by process")
    return slice(lo, hi)


def local_batch(batches, T: int, idx: Sequence[int], rows: slice) -> dict:
    """Rows ``rows`` of ``batches.collate(T, idx)``, without collating the other rows."""
    from .utterance import collate

    order = sorted(idx, key=lambda i: -batches.data[i]["spec"].shape[0])  # Batches.collate's row order
    return collate([batches.data[i] for i in order[rows]], T, hop=batches.hop)


class ProcessBatches:
    """A :class:`~rvclora_jax.data.Batches` seen by one process: the same plan (so every
    process steps through the same global batches), but :meth:`iterate` yields only this
    process's rows of each. Other attributes are the wrapped batches'."""

    def __init__(self, batches, rows: slice):
        self.batches, self.rows = batches, rows

    def __len__(self) -> int:
        return len(self.batches)

    def __getattr__(self, name):
        return getattr(self.batches, name)

    def iterate(self, epoch: int, start: int = 0) -> Iterator[dict]:
        for T, idx in self.batches.plan(epoch)[start:]:
            yield local_batch(self.batches, T, idx, self.rows)

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(0)


def shard_batches(batches, trainer):
    """``batches`` as this process must feed ``trainer``: itself for one process, else a
    :class:`ProcessBatches` of this process's rows under the trainer's batch sharding."""
    if not is_multiprocess():
        return batches
    n = trainer.mesh.devices.size
    if batches.batch_size % n:
        raise ValueError(f"batch size {batches.batch_size} is not divisible by the {n} devices of the "
                         f"{_nproc()}-process data mesh")
    return ProcessBatches(batches, process_rows(trainer.batch_sharding, batches.batch_size))


def _nproc() -> int:
    import jax

    return jax.process_count()


def put_process_batch(batch: Mapping[str, np.ndarray], sharding) -> dict:
    """Global batch arrays from this process's rows (``jax.make_array_from_process_local_data``):
    each process passes its own rows, the result spans every process's devices."""
    import jax

    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        rows = _global_rows(sharding, v.shape[0])
        out[k] = jax.make_array_from_process_local_data(sharding, v, (rows,) + v.shape[1:])
    return out


def _global_rows(sharding, local_rows: int) -> int:
    mesh_devices = sharding.mesh.devices.size
    local = len(sharding.addressable_devices)
    if local_rows % local:
        raise ValueError(f"{local_rows} local batch rows do not split over this process's {local} devices")
    return local_rows // local * mesh_devices


# ------------------------------------------------------------------- stopping together


class StopFlag:
    """A stop request (Ctrl-C, SIGTERM) that every process acts on at the same step.

    :meth:`request` (from a signal handler) marks this process; :meth:`sync`, called by
    every process once per step, makes :attr:`flag` true on all of them as soon as one
    asked. With one process the request counts at once (no collective)."""

    def __init__(self):
        self.requested = False
        self._agreed = False

    def request(self) -> None:
        self.requested = True

    @property
    def flag(self) -> bool:
        return self._agreed or (self.requested and not is_multiprocess())

    def sync(self) -> bool:
        if is_multiprocess():
            from jax.experimental import multihost_utils

            votes = multihost_utils.process_allgather(np.int32(self.requested))
            self._agreed = self._agreed or bool(np.any(votes))
        return self.flag
