"""Accelerator topologies by name (TPU slices, GPU hosts) and their devices, to compile for
them without the hardware."""

from __future__ import annotations

import jax

from decoderjax.runtime import chips

# Accelerator types (gcloud's names) -> topology. v4 and v5p count TensorCores (two per chip),
# v5e and v6e count chips.
_SHAPES_2D = {
  1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"
}  # fmt: skip


_SHAPES_3D = {
  4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
  512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip


_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def known_topologies() -> list[str]:
  names = []
  for gen, per_chip in _CORES_PER_CHIP.items():
    table = _SHAPES_3D if per_chip == 2 else _SHAPES_2D
    names += [f"{gen}-{chips_ * per_chip}" for chips_ in table]
  return names


GPUS = ("h100", "h200", "a100")


def parse_topology(name: str) -> tuple[str, str]:
  """'v5e-256' or 'v5e:16x16' -> (chip generation, libtpu topology name 'v5e:16x16');
  'h200:8' (GPUs, 8 to a host) -> ('h200', '1x1x8')."""
  gen, _, count = name.partition(":")
  if gen in GPUS and count.isdigit() and int(count) > 0:
    n = int(count)
    if n <= 8 or n % 8 == 0:
      return gen, f"1x{max(n // 8, 1)}x{min(n, 8)}"
  if ":" in name:
    gen, shape = name.split(":", 1)
    table = _SHAPES_3D if _CORES_PER_CHIP.get(gen) == 2 else _SHAPES_2D
    if gen in _CORES_PER_CHIP and shape in table.values():
      return gen, name
  else:
    gen, _, count = name.partition("-")
    if gen in _CORES_PER_CHIP and count.isdigit():
      per_chip = _CORES_PER_CHIP[gen]
      table = _SHAPES_3D if per_chip == 2 else _SHAPES_2D
      n = int(count) // per_chip
      if int(count) % per_chip == 0 and n in table:
        return gen, f"{gen}:{table[n]}"
  raise ValueError(
    f"unknown topology {name!r}; known: {', '.join(known_topologies())} "
    "(or GEN:SHAPE such as v5e:4x4, v5p:4x4x8; GPUs: h100:8, h200:16, ...)"
  )


def topology_devices(name: str, num_slices: int = 1, gpu_target_config: str = ""):
  """(chip, devices) of `num_slices` slices of a TPU topology, from libtpu, with no TPU; or of
  GPUs from the CUDA plugin and an XLA GPU target config (a GpuTargetConfigProto text)."""
  gen, topology = parse_topology(name)
  if num_slices < 1:
    raise ValueError(f"--num_slices must be >= 1, got {num_slices}")
  if gen in GPUS:
    return chips.CHIPS[gen], _gpu_devices(topology, num_slices, gpu_target_config)
  if gpu_target_config:
    raise ValueError("--gpu_target_config is for GPU topologies (h100:8, ...), not TPUs")
  try:
    import libtpu  # noqa: F401 (the compiler the topology needs)
  except ImportError:
    raise ImportError(
      f'compiling for TPU needs libtpu: pip install "jax[tpu]=={jax.__version__}"'
    ) from None
  from jax.experimental import topologies

  desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=num_slices)
  return chips.CHIPS[gen], list(desc.devices)


def _gpu_devices(topology: str, num_slices: int, target_config: str) -> list:
  if num_slices != 1:
    raise ValueError("--num_slices is for TPU topologies; GPU hosts are in the topology (h200:16)")
  if not target_config:
    raise ValueError(
      "GPU topologies need --gpu_target_config=FILE: XLA's GpuTargetConfigProto text for the "
      "GPU (xla/backends/gpu/target_config/specs/h200.txtpb, say, with the fields this jaxlib "
      "parses)"
    )
  try:
    import jax_plugins.xla_cuda12  # noqa: F401 (the CUDA compiler)
  except ImportError:
    raise ImportError(
      f'compiling for GPUs needs the CUDA plugin: pip install "jax[cuda12]=={jax.__version__}"'
    ) from None
  from jax.experimental import topologies

  with open(target_config) as f:
    text = f.read()
  desc = topologies.get_topology_desc(
    platform="cuda", topology_name="", target_config=text, topology=topology
  )
  return list(desc.devices)
