"""Building blocks of the decoder: parameters with logical axes, norms, positions, MLP.

Dimension alphabet used in names and einsum strings across the package:
  B batch, T query length, S key length, D model width, N query heads, K kv heads,
  G query heads per kv head, H head dim, F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.model import int_weights
from decoderjax.model.config import ModelConfig

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def param(module: nn.Module, name: str, shape, axes, init=None):
  """Declares a parameter with logical axis names (sharded later by rules alone)."""
  cfg = module.config
  init = init or nn.initializers.normal(stddev=cfg.init_std)
  return module.param(
    name, nn.with_logical_partitioning(init, axes), shape, dtype_of(cfg.param_dtype)
  )


def stored(module: nn.Module, name: str, shape, axes, init=None) -> tuple[Array, Array | None]:
  """Declares a matmul or embedding weight (one of quant.QUANTIZED) as stored: (weight, None),
  or in a quantized model (int8 values, float32 scales).

  int8 values are the weight's shape, int4 ones two a byte in groups of `quant_group` inputs
  (tables stay int8); the scales run along the dims quant.QUANTIZED[name] keeps (a
  projection's output channels, an embedding's rows).
  """
  cfg = module.config
  if cfg.quant == "none":
    return param(module, name, shape, axes, init), None
  keep, mode = int_weights.QUANTIZED[name], int_weights.mode_of(name, cfg.quant)
  boxed = nn.with_logical_partitioning
  if mode == "int8":
    q_shape, q_axes = shape, axes
    scale_shape, scale_axes = tuple(shape[i] for i in keep), tuple(axes[i] for i in keep)
  else:  # int4: the inputs become [groups, bytes per group], not sharded
    q_shape, scale_shape = int_weights.int4_shapes(shape, keep, cfg.quant_group)
    a, b = int_weights.input_dims(len(shape), keep)
    q_axes = (*axes[:a], None, None, *axes[b:])
    scale_axes = (*axes[:a], None, *axes[b:])
  q = module.param(name, boxed(nn.initializers.zeros, q_axes), q_shape, jnp.int8)
  scale = module.param(
    f"{name}_scale", boxed(nn.initializers.ones, scale_axes), scale_shape, jnp.float32
  )
  return q, scale


def materialize(cfg: ModelConfig, name: str, weight_, shape, rows=None) -> Array:
  """A stored weight in the compute dtype, dequantized inside the compiled step (where XLA
  fuses the conversion into its use). `rows` [B, T]: only those rows of a table, gathered
  before any conversion -> [B, T, D]."""
  dtype = dtype_of(cfg.dtype)
  w, scale = weight_
  if rows is not None:
    w = jnp.take(w, rows, axis=0)
    if scale is not None:  # tables are per-row int8
      return w.astype(dtype) * jnp.take(scale, rows, axis=0).astype(dtype)[..., None]
    return w.astype(dtype)
  if scale is None:
    return w.astype(dtype)
  keep = int_weights.QUANTIZED[name]
  if int_weights.mode_of(name, cfg.quant) == "int8":
    return int_weights.dequantize(w, scale, keep, dtype)
  return int_weights.dequantize_int4(w, scale, shape, keep, dtype)


def weight(module: nn.Module, name: str, shape, axes, init=None) -> Array:
  """A matmul weight (stored, then materialized) in the compute dtype."""
  return materialize(module.config, name, stored(module, name, shape, axes, init), shape)


# Matmuls of few rows (decoding) run fastest on XLA CPU weight-first, w [O, I] @ x^T [I, R] then
# transposed; up to this many rows it is no slower than x @ w, beyond it x @ w^T is faster
# (benchmarks/NOTES.md, "Weight-first contraction").
WEIGHT_FIRST_MAX_ROWS = 512


def contract_out_in(
  x: Array, w: Array, x_axes: int = 1, max_rows: int = WEIGHT_FIRST_MAX_ROWS
) -> Array:
  """Contracts the last `x_axes` dims of x with the last `x_axes` dims of w, a weight stored
  [*out, *in] as PyTorch stores a Linear (or a tied embedding table [V, D]) -> [..., *out].

  Up to `max_rows` rows contract weight-first; optimization barriers keep XLA's simplifier from
  folding the transposes back into the x @ w^T form that more rows use.
  """
  k = math.prod(x.shape[x.ndim - x_axes :])
  lead, out = x.shape[: x.ndim - x_axes], w.shape[: w.ndim - x_axes]
  x_RK, w_OK = x.reshape(-1, k), w.reshape(-1, k)
  if x_RK.shape[0] <= max_rows:
    barrier = jax.lax.optimization_barrier
    y_RO = barrier(w_OK @ barrier(x_RK.T)).T
  else:
    y_RO = x_RK @ w_OK.T
  return y_RO.reshape(*lead, *out)


def projection(module: nn.Module, name: str, x: Array, shape, axes, in_dims: int = 1, init=None):
  """x [..., *in] times the matmul weight `name` of `shape` (*in, *out) -> [..., *out].

  With `weights_out_in` (generation on CPU, layout.for_generation) the weight is stored
  transposed, [*out, *in], and contracted by contract_out_in.
  """
  if not module.config.weights_out_in:
    return contract(x, weight(module, name, shape, axes, init), in_dims, in_dims)
  perm = (*range(in_dims, len(shape)), *range(in_dims))
  w = weight(module, name, tuple(shape[i] for i in perm), tuple(axes[i] for i in perm), init)
  return contract_out_in(x, w, in_dims)


def contract(x: Array, w: Array, x_axes: int = 1, w_axes: int = 1) -> Array:
  """Contracts the last `x_axes` dims of x with the first `w_axes` dims of w.

  Written as one 2-D matmul on flattened operands: XLA's CPU backend runs those (and their
  gradients) markedly faster than the equivalent multi-axis dot_general.
  """
  lead, kept = x.shape[: x.ndim - x_axes], w.shape[w_axes:]
  k = w.shape[:w_axes]
  y = x.reshape(-1, int(np.prod(k))) @ w.reshape(int(np.prod(k)), -1)
  return y.reshape(*lead, *kept)


def record_inputs(module: nn.Module, name: str, x: Array, in_dims: int = 1, sink: bool = False):
  """Calibration (decoderjax.model.calibration): sows the Gram matrix X^T X [I, I] of a projection's
  inputs (the last `in_dims` dims of x [B, T, ...], flattened) when "intermediates" is mutable.

  `sink`: the first token of each row counts as T / 2 tokens. In a causal LM most queries put a
  large share of their attention on the first position (the attention sink), so errors in its
  key and value reach nearly every output; by count alone it would be 1 / T of the sample.
  """
  if module.is_mutable_collection("intermediates"):
    x = x.astype(jnp.float32)
    if sink:
      weight_T = jnp.ones(x.shape[1]).at[0].set(math.sqrt(x.shape[1] / 2))
      x = x * weight_T.reshape(1, -1, *(1,) * (x.ndim - 2))
    x = x.reshape(-1, math.prod(x.shape[x.ndim - in_dims :]))
    module.sow("intermediates", f"{name}_gram", x.T @ x)


def lora(module: nn.Module, name: str, x: Array, in_dims, out_dims, in_axes, out_axes):
  """The low-rank update (alpha / rank) x A B of projection `name`; None where not adapted.

  A [*in, r] starts uniform in +-1/sqrt(fan in) (peft's, torch.nn.Linear's default) and
  B [r, *out] at zero, so an adapted model starts as its base.
  """
  cfg = module.config
  if not cfg.lora_rank or name not in cfg.lora_target_set:
    return None
  r, dtype = cfg.lora_rank, dtype_of(cfg.dtype)
  fan_in = tuple(range(len(in_dims)))
  a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=fan_in, out_axis=-1)
  a = param(module, f"{name}_lora_a", (*in_dims, r), (*in_axes, None), a_init)
  b = param(module, f"{name}_lora_b", (r, *out_dims), (None, *out_axes), nn.initializers.zeros)
  if cfg.lora_dropout:
    x = nn.Dropout(cfg.lora_dropout)(x, deterministic=module.deterministic)
  h = contract(x, a.astype(dtype), len(in_dims), len(in_dims))  # [..., r]
  return contract(h, b.astype(dtype)) * jnp.asarray(cfg.lora_alpha / r, dtype)


def output_init(cfg: ModelConfig):
  """GPT-2 style: projections into the residual stream start smaller in deeper models."""
  return nn.initializers.normal(stddev=cfg.init_std / math.sqrt(2 * cfg.num_layers))


def constrain(x: Array, axes) -> Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, axes)


class Norm(nn.Module):
  """LayerNorm or RMSNorm, computed in float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.config
    d = x_BTD.shape[-1]
    x = x_BTD.astype(jnp.float32)
    if cfg.norm == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
    lead = (1,) * (x.ndim - 1)  # explicit broadcasting over leading axes
    scale = param(self, "scale", (d,), ("norm",), init).astype(jnp.float32).reshape(*lead, d)
    x = x * (1.0 + scale if cfg.norm_offset else scale)
    if cfg.norm == "layernorm" and cfg.use_bias:  # nanoGPT's bias=False drops these too
      bias = param(self, "bias", (d,), ("norm",), nn.initializers.zeros)
      x = x + bias.astype(jnp.float32).reshape(*lead, d)
    return x.astype(dtype_of(cfg.dtype))


def rope_frequencies(cfg: ModelConfig, long: bool = False) -> Array:
  """Inverse frequencies of rotary embeddings, [H/2], scaled as `rope_scaling` says (longrope:
  by its short factors, or by its long ones with `long`)."""
  h = cfg.head_size
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  if s.kind == "linear":
    return inv_freq / s.factor
  if s.kind == "longrope":
    return inv_freq / jnp.asarray(s.long_factors if long else s.short_factors, jnp.float32)
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = s.original_max_position / s.low_freq_factor
  high_freq_wavelen = s.original_max_position / s.high_freq_factor
  smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
  return jnp.where(medium, blended, scaled)


def layer_rope_frequencies(cfg: ModelConfig, sliding=None) -> Array:
  """A layer's RoPE frequencies: the sliding layers of a model with `local_rope_theta` rotate
  at that base, unscaled (Gemma 3); `sliding` may be traced (the layer scan), and is None where
  all layers are of one kind (then they all slide or none does)."""
  if cfg.local_rope_theta is None or (sliding is None and cfg.sliding_window is None):
    return rope_frequencies(cfg)
  local = rope_frequencies(cfg.replace(rope_theta=cfg.local_rope_theta, rope_scaling=None))
  return local if sliding is None else jnp.where(sliding, local, rope_frequencies(cfg))


def apply_rope(x_BTNH: Array, positions_BT: Array, cfg: ModelConfig, sliding=None) -> Array:
  """Rotates pairs (i, i + H/2) of each head by position-dependent angles (HF layout), at the
  frequencies of the layer (`sliding`: layer_rope_frequencies). LongRoPE takes its long factors
  in a call whose positions pass the original context (transformers' rule: the cache keeps
  the keys as they were rotated) and scales the rotations by its attention factor."""
  inv_freq_h = layer_rope_frequencies(cfg, sliding)
  scale, s = 1.0, cfg.rope_scaling
  if s is not None and s.kind == "longrope":
    beyond = jnp.max(positions_BT) + 1 > s.original_max_position
    inv_freq_h = jnp.where(beyond, rope_frequencies(cfg, long=True), inv_freq_h)
    scale = s.attention_factor
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_h[None, None]
  sin, cos = (scale * f(angles_BTh)[:, :, None, :] for f in (jnp.sin, jnp.cos))
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


def sinusoidal_positions(positions_BT: Array, dim: int) -> Array:
  """Vaswani et al. encodings: sin on even, cos on odd channels, [B, T, D] in float32."""
  inv_freq = 1.0 / (10_000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq[None, None]
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions_BT.shape, dim)


class Mlp(nn.Module):
  """GELU (GPT-2) or ReLU (the original Transformer) MLP, or gated SwiGLU / GeGLU (Llama /
  Gemma)."""

  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.config
    dtype = dtype_of(cfg.dtype)
    d, f = cfg.embed_dim, cfg.mlp_dim
    x_BTD = x_BTD.astype(dtype)

    def project(name, x, shape, in_axis, out_axis):  # x @ w, plus its LoRA update if adapted
      init = output_init(cfg) if name == "down" else None
      y = projection(self, name, x, shape, (in_axis, out_axis), init=init)
      delta = lora(self, name, x, shape[:1], shape[1:], (in_axis,), (out_axis,))
      return y if delta is None else y + delta

    record_inputs(self, "in", x_BTD)  # of up and gate
    h_BTF = project("up", x_BTD, (d, f), "embed", "mlp")  # BTD,DF->BTF
    if cfg.use_bias:
      h_BTF += param(self, "up_bias", (f,), ("mlp",), nn.initializers.zeros).astype(dtype)[
        None, None
      ]
    if cfg.mlp == "gelu":
      h_BTF = nn.gelu(h_BTF, approximate=True)
    elif cfg.mlp == "relu":
      h_BTF = nn.relu(h_BTF)
    else:
      g_BTF = project("gate", x_BTD, (d, f), "embed", "mlp")  # BTD,DF->BTF
      act = nn.silu if cfg.mlp == "swiglu" else lambda g: nn.gelu(g, approximate=True)
      h_BTF = act(g_BTF) * h_BTF
    h_BTF = constrain(h_BTF, ("activation_batch", "activation_length", "activation_mlp"))
    record_inputs(self, "down", h_BTF)
    y_BTD = project("down", h_BTF, (f, d), "mlp", "embed")  # BTF,FD->BTD
    if cfg.use_bias:
      y_BTD += param(self, "down_bias", (d,), ("embed",), nn.initializers.zeros).astype(dtype)[
        None, None
      ]
    return y_BTD
