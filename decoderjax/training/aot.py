"""Ahead-of-time compilation for TPU slices without the hardware, and what the compiler says.

libtpu compiles for a topology's devices from any host (`jax.experimental.topologies`): the
train step, generation's prefill and decode steps lower over a mesh of those devices exactly as
they would on the pod. From the compiled program come bytes per chip (XLA's memory analysis,
parameters and optimizer state counted from their shardings), every collective with its bytes,
kind and mesh axes (a loop body's counted by its trip count), and XLA's FLOP count; beside them
our analytic model FLOPs and a roofline step time over the chip's published figures
(runtime/chips.py).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from decoderjax.inference import sampling
from decoderjax.inference.sampling import SamplingConfig
from decoderjax.model.decoder import param_shapes
from decoderjax.runtime import sharding
from decoderjax.runtime.topology import topology_devices
from decoderjax.training import metrics
from decoderjax.training import state as state_lib
from decoderjax.training.experiment import Experiment
from decoderjax.training.hlo_stats import collectives, kernels

MODES = ("train", "prefill", "decode")


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
  reference = state.params if state_lib.holds_reference(exp) else {}  # DPO's frozen copy
  lowered = state_lib.jit_train_step(exp, optimizer, layout, mesh).lower(
    state, batch, layout["frozen_abstract"], reference
  )
  frozen = per_chip_bytes(layout["frozen_abstract"]) + per_chip_bytes(reference)
  parts = {
    "parameters": per_chip_bytes(state.params) + frozen,
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
