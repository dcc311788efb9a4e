"""Device meshes and logical-axis sharding rules (data / FSDP / tensor parallel, multi-slice).

The model names the logical axes of every parameter and key activation; the rules below (config
data, checked for collisions) map them onto mesh axes. Nothing else in the package names a mesh
axis except the batch, which is split over `data` and `fsdp`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. FSDP shards every matrix's `embed` side and gathers it per layer
# inside the scanned step; tensor parallelism splits heads and the MLP width (Megatron column /
# row splits) and the vocabulary.
DEFAULT_RULES = (
  ("activation_batch", BATCH_AXES),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("norm", None),
  ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: whatever the other axes leave
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1  # across slices / hosts over the data-center network (multi-slice TPU)
  dcn_fsdp: int = 1
  # CPU hosts only: split the host into this many JAX devices so that data parallelism keeps
  # every core busy (XLA runs one small step on few threads). 0: JAX's one device; -1: one per
  # core, as many as the batch sizes divide over. Read by the train binary before JAX starts.
  cpu_devices: int = -1
  rules: tuple = DEFAULT_RULES

  def __post_init__(self):
    if isinstance(self.rules, list | tuple):
      rules = tuple((r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in self.rules)
      object.__setattr__(self, "rules", rules)
    check_rules(self.rules)


def check_rules(rules) -> None:
  """Refuses rules that map one logical axis twice or name an unknown mesh axis."""
  seen = set()
  for logical, mesh_axes in rules:
    if logical in seen:
      raise ValueError(f"mesh.rules: logical axis {logical!r} is mapped twice")
    seen.add(logical)
    for axis in (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ():
      if axis not in AXES:
        raise ValueError(f"mesh.rules: {logical!r} maps to unknown mesh axis {axis!r}")


def mesh_shape(cfg: MeshConfig, device_count: int) -> dict[str, int]:
  """Axis sizes (ICI x DCN) with one -1 resolved; their product must be the device count."""
  ici = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
  dcn = {"data": cfg.dcn_data, "fsdp": cfg.dcn_fsdp, "tensor": 1}
  per_slice = device_count // math.prod(dcn.values())
  free = [a for a, n in ici.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {free}")
  if free:
    known = math.prod(n for n in ici.values() if n != -1)
    ici[free[0]] = max(per_slice // known, 1)
  shape = {a: ici[a] * dcn[a] for a in AXES}
  if math.prod(shape.values()) != device_count:
    raise ValueError(
      f"mesh: data={shape['data']} x fsdp={shape['fsdp']} x tensor={shape['tensor']} = "
      f"{math.prod(shape.values())} devices, but there are {device_count} devices"
    )
  return shape


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(cfg, len(devices))
  ici = [shape[a] // d for a, d in zip(AXES, (cfg.dcn_data, cfg.dcn_fsdp, 1), strict=True)]
  dcn = [cfg.dcn_data, cfg.dcn_fsdp, 1]
  if math.prod(dcn) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, AXES)


def inference_mesh(data: int = 0, fsdp: int = 0, tensor: int = 0):
  """The mesh an inference tool runs on: None when every size is 0 (one device, unsharded);
  else the sizes given, 1 for the others, and data taking the remaining devices if not given."""
  sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
  if not any(sizes.values()):
    return None
  values = {axis: size or 1 for axis, size in sizes.items()}
  if not sizes["data"]:
    values["data"] = -1
  return make_mesh(MeshConfig(**values))


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Traces inside this see the mesh and the logical rules (activation constraints apply)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def target_platform() -> str:
  """The platform traced code compiles for: the active mesh's devices (a TPU slice compiled
  ahead of time from a CPU host, say), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def logical_shardings(mesh: Mesh, rules, boxed_tree):
  """NamedShardings for a tree whose leaves may be nn.Partitioned (logical axis names)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def strip_boxes(tree):
  """The values inside nn.Partitioned boxes (no sharding constraint applied, unlike unbox)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def abstract_sharded(boxed_shapes, mesh: Mesh, rules):
  """(shardings, ShapeDtypeStructs carrying them) for eval_shape output with logical boxes."""
  shardings = logical_shardings(mesh, rules, boxed_shapes)
  shapes = strip_boxes(boxed_shapes)
  check_divisible(shapes, shardings)
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )
  return shardings, abstract


def check_divisible(abstract_tree, shardings) -> None:
  """Every sharded dimension must split evenly: name the array, dimension and mesh axis."""
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, flat_shardings, strict=True):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec, strict=False)):
      names = (axes,) if isinstance(axes, str) else axes or ()
      ways = math.prod(sharding.mesh.shape[a] for a in names)
      if size % ways:
        raise ValueError(
          f"{jax.tree_util.keystr(path)}: dimension {dim} of size {size} does not divide over "
          f"mesh axis {'x'.join(names)} of size {ways}"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch splits: the mesh's data x fsdp devices."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def local_batch_rows(mesh: Mesh, global_batch: int) -> slice:
  """The rows of the global batch that this process's devices hold (contiguous)."""
  if global_batch % batch_shards(mesh):
    raise ValueError(
      f"train.batch_size={global_batch} does not divide over mesh data x fsdp = "
      f"{batch_shards(mesh)} devices"
    )
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [idx[0].stop if idx[0].stop is not None else global_batch for idx in index_map.values()]
  return slice(min(starts), max(stops))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def fetch(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host sharded) array, whole, on every host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# From this many matmul parameters in the model, `cpu_devices=-1` keeps the CPU as one device:
# a large model's matmuls already keep all cores busy inside one device, while each
# data-parallel device repeats the optimizer update, exchanges every gradient and multiplies
# fewer rows (benchmarks/NOTES.md, "One CPU device for large models"). Adapters count their
# frozen base: its matmuls, forward and backward, are most of the step.
CPU_SPLIT_MAX_PARAMS = 20_000_000


def split_cpu(cpu_devices: int, batch_sizes=(), num_params: int = 0) -> int:
  """Sets how many devices the CPU backend shows (before JAX starts); returns the count set.

  `-1` takes one device per core this process may run on, lowered to the largest count every
  batch size divides by, when the model has fewer than CPU_SPLIT_MAX_PARAMS matmul parameters
  (`num_params`); otherwise one device. An explicit `--xla_force_host_platform_device_count`
  wins.
  """
  if cpu_devices == 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0
  if cpu_devices < 0:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu_devices = devices_per_core(cores or 1, batch_sizes, num_params)
  jax.config.update("jax_num_cpu_devices", cpu_devices)
  return cpu_devices


def devices_per_core(cores: int, batch_sizes=(), num_params: int = 0) -> int:
  """The most devices, at most one per core, that every batch size divides over; one for a
  model of CPU_SPLIT_MAX_PARAMS or more matmul parameters."""
  if num_params >= CPU_SPLIT_MAX_PARAMS:
    return 1
  step = math.gcd(*batch_sizes) if batch_sizes else 1
  return max(n for n in range(1, cores + 1) if step % n == 0)


def sync_hosts(name: str) -> None:
  """A barrier across processes (a no-op on one host): orders file writes between hosts."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id=-1):
  """jax.distributed for multi-host runs: explicit flags, or the cluster's environment.

  Cloud TPU pod slices, SLURM (srun with several tasks) and GKE set variables JAX reads itself;
  on one host nothing happens. CPU runs use gloo collectives.
  """
  if jax.config.jax_platforms in (None, "", "cpu") and (coordinator or num_processes > 1):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _cluster_detected():
    jax.distributed.initialize()  # JAX reads the coordinator and process ids from the cluster


def _cluster_detected() -> bool:
  """Whether JAX's own cluster detection (Cloud TPU, GKE, SLURM, Kubernetes) sees a cluster."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  try:
    from jax._src.clusters import ClusterEnv  # the registry jax.distributed.initialize() uses
  except ImportError:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1
  return any(c.is_env_present() for c in ClusterEnv._cluster_types if not c.opt_in_only_method)
