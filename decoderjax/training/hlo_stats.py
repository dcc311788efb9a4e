"""What a compiled program's HLO text says: collectives with their bytes and mesh axes, and
custom kernels."""

from __future__ import annotations

import math
import re

import numpy as np

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


def kernels(hlo: str) -> list[str]:
  """The kernels a compiled program calls outside XLA's own fusions: Pallas / Mosaic kernels
  on TPU (splash attention's, say), cuDNN's on GPU (its fused attention)."""
  names = {m.group(1) for line in hlo.splitlines() if (m := _KERNEL.match(line))}
  return sorted(names | set(re.findall(r'custom_call_target="(__cudnn\$[^"]+)"', hlo)))
