"""Data parallelism: one `data` mesh axis over every device of every host.

Parameters are replicated and the batch is sharded on `data`; the train step is a
single `jax.jit` over these global arrays and the compiler inserts the collectives
(gradient all-reduce, BatchNorm statistics over the global batch, the contrastive
loss's all-gather). The axis is built with `AxisType.Auto`: JAX 0.10's
`jax.make_mesh` defaults to explicit axes, under which a sharded `z @ z.T` is a
sharding type error.
"""

import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bigssl_med.errors import ConfigError

DATA_AXIS = 'data'


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with the `data` axis over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch: int, mesh: Mesh, key: str = 'batch_size') -> int:
  """The per-host batch; a clear error when the batch does not split evenly."""
  devices = mesh.devices.size
  if global_batch <= 0 or global_batch % devices:
    raise ConfigError(f'config.{key}={global_batch} is not a positive multiple of the '
                      f'{devices} devices in use')
  return global_batch // jax.process_count()


def to_global(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of a batch into global arrays sharded on `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _cluster_detected() -> bool:
  """Whether the environment announces several processes (TPU pod slice, SLURM, MPI)."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1:
    return True
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE'):
    if int(os.environ.get(var, '1') or 1) > 1:
      return True
  return False


def slurm_local_device_ids(environ: Mapping[str, str] = os.environ) -> list[int] | None:
  """Every GPU of the node, where SLURM runs one task per node; None otherwise.

  Under SLURM, `jax.distributed.initialize` gives each process the one GPU numbered
  `SLURM_LOCALID`, which suits one task per GPU; with one task per node (as
  `launch/slurm.sbatch` runs) the other GPUs would sit idle. The node's GPUs are
  counted from `SLURM_GPUS_ON_NODE`, else `CUDA_VISIBLE_DEVICES`. `JAX_LOCAL_DEVICE_IDS`
  in the environment wins (None here).
  """
  if 'SLURM_JOB_ID' not in environ or environ.get('JAX_LOCAL_DEVICE_IDS'):
    return None
  tasks = environ.get('SLURM_STEP_NUM_TASKS') or environ.get('SLURM_NTASKS')
  nodes = environ.get('SLURM_STEP_NUM_NODES') or environ.get('SLURM_NNODES')
  if not tasks or not nodes or int(tasks) != int(nodes):
    return None
  if environ.get('SLURM_GPUS_ON_NODE'):
    count = int(environ['SLURM_GPUS_ON_NODE'])
  elif environ.get('CUDA_VISIBLE_DEVICES'):
    count = len(environ['CUDA_VISIBLE_DEVICES'].split(','))
  else:
    return None
  return list(range(count)) if count > 1 else None


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1) -> None:
  """`jax.distributed.initialize` when several hosts run; a no-op on one host.

  Explicit arguments win; otherwise JAX auto-detects TPU VMs, SLURM and MPI when the
  environment announces more than one process. Under SLURM with one task per node,
  each process takes all of its node's GPUs (`slurm_local_device_ids`).
  """
  local_device_ids = slurm_local_device_ids()
  if coordinator_address:
    if num_processes <= 0 or process_id < 0:
      raise ConfigError('--coordinator_address needs --num_processes and --process_id')
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)
  elif _cluster_detected():
    jax.distributed.initialize(local_device_ids=local_device_ids)


def to_host(x) -> np.ndarray:
  """A global array as one NumPy array, gathered from every host when there are several."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def primary_value(value: int) -> int:
  """Process 0's `value` on every host (`value` itself with one host); also a barrier."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
  return value


def sync(name: str) -> None:
  """A barrier across hosts (nothing with one host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
