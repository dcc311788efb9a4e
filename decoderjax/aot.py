"""Ahead-of-time compilation for TPU slices without the hardware, and what the compiler says.

libtpu compiles for a topology's devices from any host (`jax.experimental.topologies`): the
train step, generation's prefill and decode steps lower over a mesh of those devices exactly as
they would on the pod. From the compiled program come bytes per chip (XLA's memory analysis,
parameters and optimizer state counted from their shardings), every collective with its bytes,
kind and mesh axes (a loop body's counted by its trip count), and XLA's FLOP count; beside them
our analytic model FLOPs and a roofline step time over the chip's published figures (chips.py).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from decoderjax import chips, metrics, sampling, sharding
from decoderjax import state as state_lib
from decoderjax.experiment import Experiment
from decoderjax.model import param_shapes
from decoderjax.sampling import SamplingConfig

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
MODES = ("train", "prefill", "decode")


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


# Collectives in optimized HLO.

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
_OP = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")"
  r"(?P<start>-start)?\((?P<rest>.*)$"
)
_CALLS = re.compile(
  r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.-]+)"
)
_BRANCHES = re.compile(r"(?:branch|called)_computations=\{([^}]*)\}")
_MESH_GROUPS = re.compile(
  r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
  r"\s*\{([^}]*)\}"
)
_KERNEL = re.compile(
  r'^\s*(?:ROOT\s+)?%?([\w-]+?)(?:\.\d+)?\s*=.*custom_call_target="tpu_custom_call"'
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple's elements summed)."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  comps, name, entry = {}, None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      name = header.group(2)
      comps[name] = []
      if header.group(1):
        entry = name
    elif name is not None and line.startswith(" "):
      comps[name].append(line)
  return comps, entry


def _multipliers(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry (while bodies x trip count)."""
  times: dict[str, int] = {}

  def visit(name: str, t: int) -> None:
    times[name] = times.get(name, 0) + t
    for line in comps.get(name, ()):
      trip = _TRIP.search(line)
      loop = int(trip.group(1)) if trip else _bound(comps, line)
      callees = [(key in ("body", "condition"), c) for key, c in _CALLS.findall(line)]
      for group in _BRANCHES.findall(line):
        callees += [(False, c.strip().lstrip("%")) for c in group.split(",")]
      for in_loop, callee in callees:
        visit(callee, t * (loop if in_loop else 1))

  visit(entry, 1)
  return times


def _bound(comps: dict[str, list[str]], line: str) -> int:
  """A while loop's trip count from its condition `i < constant` (when XLA dropped its
  known_trip_count annotation); 1 for anything else."""
  condition = re.search(r"condition=%?([\w.-]+)", line)
  if " while(" not in line or not condition:
    return 1
  body = comps.get(condition.group(1), [])
  constants = dict(re.findall(r"%([\w.-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(body)))
  for cond in body:
    compare = re.search(r"compare\(%[\w.-]+, %([\w.-]+)\), direction=LT", cond)
    if compare and compare.group(1) in constants:
      return int(constants[compare.group(1)])
  return 1


def _groups(rest: str, op: str) -> list[list[int]]:
  """The device groups of a collective: explicit lists, iota form `[G,S]<=[N]T(...)`, or
  collective-permute's source-target pairs."""
  if op == "collective-permute":
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", rest)
    if not pairs:
      return []
    return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)", pairs.group(0))]
  over_mesh = _MESH_GROUPS.search(rest)
  if over_mesh:  # mesh['axis_0'=A,...], device_ids=([dims]T(perm)) {'axis_i',...}
    axes = [(n, int(k)) for n, k in re.findall(r"'(\w+)'=(\d+)", over_mesh.group(1))]
    sizes = [k for _, k in axes]
    ids = np.arange(math.prod(sizes))
    if over_mesh.group(2):
      ids = ids.reshape([int(x) for x in over_mesh.group(2).split(",")])
      if over_mesh.group(3):
        ids = ids.transpose([int(x) for x in over_mesh.group(3).split(",")])
    ids = ids.reshape(sizes)
    inside = [i for i, (n, _) in enumerate(axes) if f"'{n}'" in over_mesh.group(4)]
    outside = [i for i in range(len(axes)) if i not in inside]
    width = math.prod(sizes[i] for i in inside)
    return ids.transpose(outside + inside).reshape(-1, width).tolist()
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
  if iota:
    shape = [int(x) for x in iota.group(1).split(",")]
    dims = [int(x) for x in iota.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(3):
      ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
    return ids.reshape(-1, shape[-1]).tolist()
  explicit = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", rest)
  if explicit:
    return [
      [int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))
    ]
  return []


def _axes(group: list[int], mesh) -> tuple[str, ...]:
  """The mesh axes along which a group's devices (flat indices of the mesh) differ."""
  if len(group) < 2:
    return ()
  coords = np.array(np.unravel_index(np.asarray(group), mesh.devices.shape)).T
  return tuple(a for a, col in zip(mesh.axis_names, coords.T, strict=True) if len(set(col)) > 1)


def _crosses_slices(group: list[int], mesh) -> bool:
  flat = mesh.devices.reshape(-1)
  return len({getattr(flat[i], "slice_index", 0) for i in group}) > 1


_DCN_SEND = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.-]+\s*=\s*\((?P<data>[a-z]+\d*\[[\d,]*\]).*?\s+send\(.*"
  r'_xla_megascale_transfer_type="(?P<kind>\w+)"'
)


def _sent(op: str, nbytes: float, n: int) -> float:
  """Bytes one chip sends for a collective of `nbytes` (its result) over a group of n."""
  return {
    "all-reduce": 2 * nbytes * (n - 1) / n,
    "all-gather": nbytes * (n - 1) / n,
    "reduce-scatter": nbytes * (n - 1),
    "all-to-all": nbytes * (n - 1) / n,
  }.get(op, nbytes)


def collectives(hlo: str, mesh) -> list[dict]:
  """Every collective of an optimized HLO module, per chip per call: kind, mesh axes, group
  size, result bytes, times it runs (loop trip counts), and bytes each chip sends. Between
  slices, XLA's multi-slice runtime sends over DCN (`send` ops it tags with the collective)."""
  comps, entry = _computations(hlo)
  times = _multipliers(comps, entry)
  slices = len({getattr(d, "slice_index", 0) for d in mesh.devices.reshape(-1)})
  out = []
  for name, lines in comps.items():
    for line in lines:
      dcn = _DCN_SEND.match(line)
      if dcn:
        op, nbytes = dcn.group("kind").lower().replace("_", "-"), shape_bytes(dcn.group("data"))
        out.append({
          "kind": op, "axes": "slices", "group": slices, "dcn": True, "bytes": nbytes,
          "times": times.get(name, 1), "sent_bytes": _sent(op, nbytes, slices),
        })  # fmt: skip
        continue
      m = _OP.match(line)  # an async pair counts once, at its -start
      if not m:
        continue
      op, nbytes = m.group("op"), shape_bytes(m.group("shape"))
      if m.group("start"):  # async start: (operand, result, ...) -> the result
        parts = re.findall(r"\b[a-z]+\d*\[[\d,]*\]", m.group("shape"))
        nbytes = shape_bytes(parts[1] if op != "all-reduce" and len(parts) > 1 else parts[0])
      groups = _groups(m.group("rest"), op)
      group = groups[0] if groups else []
      n = 2 if op == "collective-permute" else max(len(group), 1)
      sent = _sent(op, nbytes, n)
      out.append({
        "kind": op, "axes": "+".join(_axes(group, mesh)) or "-", "group": n,
        "dcn": _crosses_slices(group, mesh) if group else False,
        "bytes": nbytes, "times": times.get(name, 1), "sent_bytes": sent,
      })  # fmt: skip
  return out


# Compiling the steps.


def _replicated(mesh, shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _batch(mesh, shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))


def lower_train(exp: Experiment, mesh):
  """(lowered train step, per-chip bytes of its parameters and optimizer state, model FLOPs)."""
  optimizer = state_lib.experiment_optimizer(exp)
  layout = state_lib.state_shardings(exp, optimizer, mesh)
  b, t = exp.train.batch_size, exp.data.seq_len
  fields = ("inputs", "targets", "segment_ids", "positions")
  batch = {k: _batch(mesh, (b, t), jnp.int32) for k in fields}
  batch["weights"] = _batch(mesh, (b, t), jnp.float32)
  state = layout["state_abstract"]
  lowered = state_lib.jit_train_step(exp, optimizer, layout, mesh).lower(
    state, batch, layout["frozen_abstract"]
  )
  parts = {
    "parameters": per_chip_bytes(state.params) + per_chip_bytes(layout["frozen_abstract"]),
    "optimizer_state": per_chip_bytes(state.opt_state),
  }
  weight_grads = exp.finetune.method == "full"
  flops = metrics.flops_per_token(exp.model, t, weight_grads) * b * t
  return lowered, parts, flops


def abstract_params(cfg, mesh, rules):
  boxed = param_shapes(cfg)
  return sharding.abstract_sharded(boxed, mesh, rules)[1]


def forward_flops(cfg, tokens: int, context: int, causal: bool) -> float:
  """Inference FLOPs: 2 x matmul parameters per token, plus attention over `context` keys."""
  attention = 2 * 2 * cfg.num_layers * context * cfg.num_heads * cfg.head_size
  return tokens * (2 * metrics.matmul_params(cfg) + (attention / 2 if causal else attention))


def lower_prefill(exp: Experiment, mesh, batch: int, prompt_len: int, max_new: int, params=None):
  """(lowered prefill, per-chip bytes, model FLOPs); `params`: their sharded shapes, if built."""
  cfg = exp.model
  params = params or abstract_params(cfg, mesh, exp.mesh.rules)
  rng = _replicated(mesh, (), jax.eval_shape(lambda: jax.random.key(0)).dtype)
  prompt = _batch(mesh, (batch, prompt_len), jnp.int32)
  lowered = sampling.prefill.lower(params, cfg, prompt, prompt, rng, max_new, SamplingConfig())
  parts = {"parameters": per_chip_bytes(params), "optimizer_state": 0}
  return lowered, parts, forward_flops(cfg, batch * prompt_len, prompt_len, causal=True)


def lower_decode(exp: Experiment, mesh, batch: int, prompt_len: int, max_new: int):
  """One decode step (the decode loop's body runs once per token) over a full-length cache."""
  cfg = exp.model
  params = abstract_params(cfg, mesh, exp.mesh.rules)
  prefill, parts, _ = lower_prefill(exp, mesh, batch, prompt_len, max_new, params)
  compiled = prefill.compile()
  state = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    prefill.out_info,
    compiled.output_shardings,
  )
  until = _replicated(mesh, (), jnp.int32)
  stops = _replicated(mesh, (1,), jnp.int32)
  lowered = sampling.decode.lower(params, cfg, state, until, stops, SamplingConfig())
  context = prompt_len + max_new
  return lowered, parts, forward_flops(cfg, batch, context, causal=False)


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class Report:
  mode: str
  topology: str
  chips: int
  mesh: dict
  fits: bool
  hbm_bytes: float
  memory: dict  # bytes per chip: parameters, optimizer_state, temporaries, arguments, ...
  collectives: dict  # kind -> axes -> {"count", "bytes", "sent_bytes"} per step, per chip
  model_flops: float  # per step, all chips
  xla_flops: float | None  # per chip, XLA's count (a loop body counted once)
  roofline: dict
  attention_kernels: list[str]
  error: str = ""

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds the memory|Ran out of memory")


def report(exp: Experiment, topology: str, num_slices: int = 1, mode: str = "train",
           batch: int = 0, prompt_len: int = 0, max_new: int = 128,
           gpu_target_config: str = "") -> Report:  # fmt: skip
  """Compiles `mode`'s step of `exp` for the topology and reads the compiled program."""
  if mode not in MODES:
    raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
  chip, devices = topology_devices(topology, num_slices, gpu_target_config)
  mesh_cfg = exp.mesh
  if num_slices > 1 and mesh_cfg.dcn_data * mesh_cfg.dcn_fsdp == 1:
    mesh_cfg = dataclasses.replace(mesh_cfg, dcn_data=num_slices)  # slices split the batch
  if mesh_cfg.dcn_data * mesh_cfg.dcn_fsdp != num_slices:
    raise ValueError(
      f"mesh.dcn_data x mesh.dcn_fsdp = {mesh_cfg.dcn_data * mesh_cfg.dcn_fsdp}, "
      f"but --num_slices={num_slices}"
    )
  mesh = sharding.make_mesh(mesh_cfg, devices)
  exp = dataclasses.replace(exp, mesh=mesh_cfg)
  batch = batch or exp.train.batch_size
  prompt_len = prompt_len or exp.data.seq_len
  with sharding.activate(mesh, mesh_cfg.rules):
    ways = sharding.batch_shards(mesh)
    if batch % ways:
      raise ValueError(f"batch {batch} does not divide over mesh data x fsdp = {ways} chips")
    if mode == "train":
      lowered, parts, flops = lower_train(exp, mesh)
    elif mode == "prefill":
      lowered, parts, flops = lower_prefill(exp, mesh, batch, prompt_len, max_new)
    else:
      lowered, parts, flops = lower_decode(exp, mesh, batch, prompt_len, max_new)
    shape = {k: int(v) for k, v in mesh.shape.items()}
    try:
      compiled = lowered.compile()
    except Exception as e:  # XLA's out-of-memory is an answer, not a crash
      if not OOM.search(str(e)):
        raise
      message = " ".join(str(e).split())[:600]
      return Report(mode, topology, len(devices), shape, False, chip.hbm_bytes, parts, {}, flops,
                    None, {}, [], message)  # fmt: skip
  return _read(compiled, mode, topology, devices, shape, chip, parts, flops, mesh, exp.model)


def kernels(hlo: str) -> list[str]:
  """The kernels a compiled program calls outside XLA's own fusions: Pallas / Mosaic kernels
  on TPU (splash attention's, say), cuDNN's on GPU (its fused attention)."""
  names = {m.group(1) for line in hlo.splitlines() if (m := _KERNEL.match(line))}
  return sorted(names | set(re.findall(r'custom_call_target="(__cudnn\$[^"]+)"', hlo)))


def recompute_factor(cfg, mode: str) -> float:
  """Hardware over model FLOPs of a train step: full remat runs each layer's forward twice
  (8 instead of 6 x its matmul parameters per token); saved matmuls (dots policies) do not."""
  if mode != "train" or cfg.remat != "full":
    return 1.0
  layers = metrics.matmul_params(cfg) - cfg.embed_dim * cfg.vocab_size  # all layers
  return (8 * layers + 6 * cfg.embed_dim * cfg.vocab_size) / (6 * metrics.matmul_params(cfg))


def _read(compiled, mode, topology, devices, shape, chip, parts, flops, mesh, exp_cfg) -> Report:
  hlo = compiled.as_text()
  mem = compiled.memory_analysis()
  memory = {
    **parts,
    "arguments": mem.argument_size_in_bytes,
    "outputs": mem.output_size_in_bytes,
    "aliased": mem.alias_size_in_bytes,
    "temporaries": mem.temp_size_in_bytes,
    "code": mem.generated_code_size_in_bytes,
  }
  memory["total"] = (
    memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    + memory["code"]
  )  # fmt: skip
  table: dict = {}
  for c in collectives(hlo, mesh):
    row = table.setdefault(c["kind"], {}).setdefault(
      c["axes"], {"count": 0, "bytes": 0, "sent_bytes": 0.0, "dcn": c["dcn"]}
    )
    row["count"] += c["times"]
    row["bytes"] += c["bytes"] * c["times"]
    row["sent_bytes"] += c["sent_bytes"] * c["times"]
    row["dcn"] = row["dcn"] or c["dcn"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", 0.0)) if cost else None
  n = len(devices)
  hardware = flops * recompute_factor(exp_cfg, mode)
  compute_s = hardware / (n * chip.bf16_flops)
  ici = sum(r["sent_bytes"] for k in table.values() for r in k.values() if not r["dcn"])
  dcn = sum(r["sent_bytes"] for k in table.values() for r in k.values() if r["dcn"])
  comm_s = ici / chip.ici_bytes_s + dcn / chip.dcn_bytes_s
  # HBM traffic: XLA's count (a loop body counted once) or, at least, every argument read once.
  accessed = max(float(cost.get("bytes accessed", 0.0)) if cost else 0.0, memory["arguments"])
  hbm_s = accessed / chip.hbm_bytes_s
  overlapped, serial = max(compute_s, comm_s, hbm_s), compute_s + comm_s + hbm_s
  model_s = flops / (n * chip.bf16_flops)
  roofline = {
    "hardware_flops": hardware, "compute_s": compute_s, "collective_s": comm_s,
    "ici_bytes": ici, "dcn_bytes": dcn, "hbm_bytes": accessed, "hbm_s": hbm_s,
    "step_s": overlapped, "step_s_no_overlap": serial,
    "mfu": model_s / overlapped if overlapped else 0.0,
    "mfu_no_overlap": model_s / serial if serial else 0.0,
    "bound": max(
      (("compute", compute_s), ("collectives", comm_s), ("memory", hbm_s)), key=lambda x: x[1]
    )[0],
  }  # fmt: skip
  fits = memory["total"] <= chip.hbm_bytes
  return Report(mode, topology, n, shape, fits, chip.hbm_bytes, memory, table, flops, xla_flops,
                roofline, kernels(hlo))  # fmt: skip
