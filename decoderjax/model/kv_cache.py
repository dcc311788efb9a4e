"""The explicit KV cache: preallocated keys and values of every layer, written in place."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from decoderjax.model.config import ModelConfig
from decoderjax.model.layers import dtype_of

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values of every layer plus the metadata masks are built from.

  The layout follows the weights': stacked over layers for a scanned model, one array per
  layer for a per-layer one (generation, `layout.for_generation`), which each layer then reads
  and writes in place. Keys hold their slots last ([B, K, H, S]) and values before the head
  dim ([B, K, S, H]), so both attention matmuls read the cache as stored. An int8 cache
  (`ModelConfig.kv_cache="int8"`) holds each slot's key and value of each head as int8 with one
  float32 scale (max |x| / 127 over the head dim); attention applies the scales to its logits
  and probabilities, so the cache is never dequantized as a whole.
  """

  k: Array | tuple[Array, ...]  # [L, B, K, H, S] or L x [B, K, H, S]
  v: Array | tuple[Array, ...]  # [L, B, K, S, H] or L x [B, K, S, H]
  segment: Array  # [B, S] int32 document id of each slot; 0 marks empty or padding slots
  position: Array  # [B, S] int32 position of the token held in each slot
  index: Array  # [] int32 next slot to write, or [B] one per row (continuous batching)
  k_scale: Array | tuple[Array, ...] | None = None  # [L, B, K, S] or L x [B, K, S]; int8 only
  v_scale: Array | tuple[Array, ...] | None = None
  # A cross-attention model's memory as the first call projected it for every layer (keys and
  # values [L, B, M, K, H]) and the memory's mask [B, M].
  cross_k: Array | None = None
  cross_v: Array | None = None
  memory_mask: Array | None = None

  @property
  def length(self) -> int:
    return self.segment.shape[1]

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)

  @property
  def layers(self):
    """What the layers read: (k, v), or ((k, k_scale), (v, v_scale)), stacked over L, or a list
    of one such tree per layer."""
    if not self.per_layer:
      return _reads(self.k, self.v, self.k_scale, self.v_scale)
    at = lambda x, i: None if x is None else x[i]
    return [
      _reads(self.k[i], self.v[i], at(self.k_scale, i), at(self.v_scale, i))
      for i in range(len(self.k))
    ]

  def written(self, new_kv, segment_BT: Array, positions_BT: Array) -> KVCache:
    """The new tokens' entries (stacked over L, laid out as the cache) written at `index` (each
    row at its own with a per-row index), in place."""
    index = self.index

    def at(full, new, slot_axis, i):  # slot_axis counted from the end
      start = [0] * full.ndim
      start[full.ndim + slot_axis] = i
      return jax.lax.dynamic_update_slice(full, new, start)

    def write(full, new, slot_axis, batch_axis=0):
      if index.ndim == 0:
        return at(full, new, slot_axis, index)
      per_row = lambda f, n, i: at(f, n, slot_axis, i)
      return jax.vmap(per_row, (batch_axis, batch_axis, 0), batch_axis)(full, new, index)

    def each(full, new_L, slot_axis):
      if not self.per_layer:  # [L, B, ...]
        return write(full, new_L, slot_axis, batch_axis=1)
      return tuple(write(layer, new_L[i], slot_axis) for i, layer in enumerate(full))

    (new_k, new_v), scales = new_kv, {}
    if self.k_scale is not None:  # int8: (values, scales) pairs
      (new_k, k_scale), (new_v, v_scale) = new_k, new_v
      scales = dict(
        k_scale=each(self.k_scale, k_scale, -1), v_scale=each(self.v_scale, v_scale, -1)
      )
    return KVCache(
      k=each(self.k, new_k, -1),
      v=each(self.v, new_v, -2),
      segment=write(self.segment, segment_BT, -1),
      position=write(self.position, positions_BT, -1),
      index=index + segment_BT.shape[1],
      cross_k=self.cross_k,
      cross_v=self.cross_v,
      memory_mask=self.memory_mask,
      **scales,
    )

  def with_row(self, row: KVCache, slot: Array) -> KVCache:
    """This per-row-index cache with row `slot` replaced by the one-row cache `row` (same
    length and layout): its keys, values, metadata and write index."""

    def put(full, one, batch_axis=0):
      if full is None:
        return None
      return jax.lax.dynamic_update_index_in_dim(
        full, jnp.take(one, 0, batch_axis), slot, batch_axis
      )

    def each(full, one):
      if full is None:
        return None
      if not self.per_layer:
        return put(full, one, batch_axis=1)
      return tuple(put(f, o) for f, o in zip(full, one, strict=True))

    return KVCache(
      k=each(self.k, row.k),
      v=each(self.v, row.v),
      segment=put(self.segment, row.segment),
      position=put(self.position, row.position),
      index=self.index.at[slot].set(row.index),
      k_scale=each(self.k_scale, row.k_scale),
      v_scale=each(self.v_scale, row.v_scale),
    )

  def select_rows(self, rows: Array) -> KVCache:
    """The cache of rows `rows` (beam search reorders its beams)."""

    def per_row(x, per_layer=self.per_layer):
      if x is None:
        return None
      return tuple(layer[rows] for layer in x) if per_layer else x[:, rows]

    return self.replace(
      k=per_row(self.k),
      v=per_row(self.v),
      k_scale=per_row(self.k_scale),
      v_scale=per_row(self.v_scale),
      segment=self.segment[rows],
      position=self.position[rows],
      cross_k=per_row(self.cross_k, False),
      cross_v=per_row(self.cross_v, False),
      memory_mask=None if self.memory_mask is None else self.memory_mask[rows],
    )

  def stacked(self) -> KVCache:
    """The same cache with each layer's arrays stacked over L (a copy when per layer)."""
    stack = lambda x: jnp.stack(x) if isinstance(x, tuple) else x
    return self.replace(
      k=stack(self.k), v=stack(self.v), k_scale=stack(self.k_scale), v_scale=stack(self.v_scale)
    )


def _reads(k, v, k_scale, v_scale):
  return (k, v) if k_scale is None else ((k, k_scale), (v, v_scale))


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  """An empty cache for `batch` rows of up to `length` tokens (prompt plus generation), laid out
  like the weights: stacked for a scanned model, per layer otherwise."""
  if length > cfg.max_seq_len:
    raise ValueError(f"cache length {length} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
  b, k, h = batch, cfg.kv_heads, cfg.head_size
  int8 = cfg.kv_cache == "int8"
  dtype = jnp.int8 if int8 else dtype_of(cfg.dtype)

  def layers(shape, dtype=dtype):
    if cfg.scan_layers:
      return jnp.zeros((cfg.num_layers, *shape), dtype)
    return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

  scale = lambda: layers((b, k, length), jnp.float32) if int8 else None
  return KVCache(
    k=layers((b, k, h, length)),
    v=layers((b, k, length, h)),
    segment=jnp.zeros((batch, length), jnp.int32),
    position=jnp.zeros((batch, length), jnp.int32),
    index=jnp.zeros((), jnp.int32),
    k_scale=scale(),
    v_scale=scale(),
  )
