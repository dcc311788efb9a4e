"""Attention: masks, grouped-query attention kernels, the causal self-attention layer and the
cross-attention layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from decoderjax.model.config import ModelConfig
from decoderjax.model.layers import (
  Norm,
  apply_rope,
  constrain,
  dtype_of,
  lora,
  output_init,
  param,
  projection,
  record_inputs,
)
from decoderjax.runtime.sharding import target_platform

Array = jax.Array


def attention_mask(
  q_segment_BT: Array,
  q_position_BT: Array,
  q_slot_T: Array,
  k_segment_BS: Array,
  k_position_BS: Array,
  k_slot_S: Array,
  sliding_window: int | None,
) -> Array:
  """Boolean [B, T, S]: causal by slot, same document (segment id), key not padding (id 0).
  A key of a negative segment id is a prefix every document of its row sees (scoring runs a
  shared context once). Slots are [T] and [S], or per row [B, T] and [B, S]."""
  q_slot_BT = jnp.broadcast_to(q_slot_T, q_segment_BT.shape)
  k_slot_BS = jnp.broadcast_to(k_slot_S, k_segment_BS.shape)
  mask = k_slot_BS[:, None, :] <= q_slot_BT[:, :, None]
  same_BTS = q_segment_BT[:, :, None] == k_segment_BS[:, None, :]
  mask &= same_BTS | (k_segment_BS < 0)[:, None, :]
  mask &= (k_segment_BS != 0)[:, None, :]
  if sliding_window is not None:
    mask &= (q_position_BT[:, :, None] - k_position_BS[:, None, :]) < sliding_window
  return mask


SPLASH_BLOCK = 128  # splash attention tiles; sequences must be a multiple of it


def resolve_impl(cfg: ModelConfig, dropout_active: bool, seq_len: int) -> str:
  """Picks the attention kernel for a call without a KV cache (cached calls: `cached_attention`).

  auto: Pallas splash attention on TPU (full sequences whose length tiles), XLA einsums on CPU,
  jax.nn.dot_product_attention (cuDNN flash attention) on GPU. Features a kernel lacks
  (attention dropout; soft-capping outside splash) fall back to XLA under auto, and are an error
  for a kernel asked for by name.
  """
  impl = cfg.attention_impl
  if impl == "auto":  # by the devices the program is for, not the host that traces it
    backend = target_platform()
    impl = {"tpu": "splash", "cpu": "xla"}.get(backend, "dot_product_attention")
    if impl == "splash" and seq_len % SPLASH_BLOCK:
      impl = "dot_product_attention"
  lacks = "attention dropout" if dropout_active else None
  if impl == "dot_product_attention" and cfg.attn_logit_softcap is not None:
    lacks = "attention logit soft-capping"
  if lacks and impl != "xla":
    if cfg.attention_impl != "auto":
      raise ValueError(
        f"ModelConfig.attention_impl={impl!r} has no {lacks}: use attention_impl=xla (or auto, "
        "which falls back to it)"
      )
    return "xla"
  return impl


def splash_attention(
  q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg: ModelConfig, window: int | None
) -> Array:
  """Pallas splash attention (TPU; interpreted elsewhere, for tests). Causal, by segment, over
  the last `window` keys when given."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, t, n, h = q_BTNH.shape
  k = k_BTKH.shape[2]
  if t % SPLASH_BLOCK:
    raise ValueError(f"splash attention needs a sequence length divisible by {SPLASH_BLOCK}")
  if window is None:
    mask = splash.CausalMask((t, t))
  else:  # window by slot equals window by position: packed documents are contiguous
    mask = splash.LocalMask((t, t), (window - 1, 0), offset=0)
  block = max(d for d in (512, 256, 128) if t % d == 0)
  sizes = dict(block_q=block, block_kv=block, block_kv_compute=block)
  block_sizes = splash.BlockSizes(
    **sizes,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  g = n // k
  kernel = splash.make_splash_mqa(
    splash.MultiHeadMask([mask] * g),
    block_sizes=block_sizes,
    head_shards=1,
    q_seq_shards=1,
    attn_logits_soft_cap=cfg.attn_logit_softcap,
    interpret=target_platform() != "tpu",
  )
  q_BKGTH = (q_BTNH * cfg.query_scale).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
  k_BKTH = k_BTKH.transpose(0, 2, 1, 3)
  v_BKTH = v_BTKH.transpose(0, 2, 1, 3)

  def one(q_GTH, k_TH, v_TH, segment_T):
    return kernel(q_GTH, k_TH, v_TH, segment_ids=splash.SegmentIds(q=segment_T, kv=segment_T))

  per_kv_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over K
  per_row = jax.vmap(per_kv_head)  # over B
  return (
    _by_shard(per_row, q_BKGTH, k_BKTH, v_BKTH, segment_ids_BT)
    .transpose(0, 3, 1, 2, 4)
    .reshape(b, t, n, h)
  )


def _by_shard(kernel, q_BKGTH, k_BKTH, v_BKTH, segment_ids_BT) -> Array:
  """Runs a Pallas kernel on each device's rows and kv heads (Mosaic kernels are not
  partitioned by XLA): shard_map over the batch axes, and the tensor axis where it divides the
  kv heads."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q_BKGTH, k_BKTH, v_BKTH, segment_ids_BT)
  batch, heads = nn.logical_to_mesh_axes(("activation_batch", "activation_heads"))
  names = (heads,) if isinstance(heads, str) else heads or ()
  ways = 1
  for name in names:
    ways *= mesh.shape[name]
  heads = heads if k_BKTH.shape[1] % ways == 0 else None
  spec = PartitionSpec(batch, heads)
  return jax.shard_map(
    kernel,
    in_specs=(spec, spec, spec, PartitionSpec(batch)),
    out_specs=spec,
    check_vma=False,
  )(q_BKGTH, k_BKTH, v_BKTH, segment_ids_BT)


CAUSAL_BLOCK_MIN, CAUSAL_BLOCKS_MAX = 64, 8  # xla_attention's query blocks


def xla_attention(
  q_BTNH: Array,
  k_BSKH: Array,
  v_BSKH: Array,
  mask_BTS: Array,
  softcap: float | None = None,
  dropout: callable = None,
  scale: float | None = None,
  causal: bool = True,
) -> Array:
  """Reference grouped-query attention in einsums; softmax in float32. Logits are scaled by
  `scale` (default H ** -0.5).

  Causal self-attention over a whole sequence (T == S >= 4 x CAUSAL_BLOCK_MIN) runs by blocks of
  queries, each over the keys up to its end: the mask is causal by slot, so the skipped scores
  are all masked. Blocks of T / 8 queries, at least 64, skip 3/8 of the score work and memory
  passes at T = 256 and 7/16 from T = 512 on, with at most 8 copies of the attention to compile.
  A row that sees nothing (padding) averages the values its block reaches, not all of them.
  """
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h) * (h**-0.5 if scale is None else scale)
  c = max(CAUSAL_BLOCK_MIN, -(-t // CAUSAL_BLOCKS_MAX))
  if not causal or t != k_BSKH.shape[1] or t < 4 * CAUSAL_BLOCK_MIN or dropout is not None:
    out_BTKGH = _attend(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, softcap, dropout)
  else:
    blocks = [
      _attend(q_BTKGH[:, i : i + c], k_BSKH[:, : i + c], v_BSKH[:, : i + c],
              mask_BTS[:, i : i + c, : i + c], softcap, None)
      for i in range(0, t, c)
    ]  # fmt: skip
    out_BTKGH = jnp.concatenate(blocks, axis=1)
  return out_BTKGH.reshape(b, t, n, h)


def _attend(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, softcap, dropout) -> Array:
  """Softmax attention of (pre-scaled) queries [B, T, K, G, H] -> [B, T, K, G, H]."""
  logits_BKGTS = jnp.einsum(
    "BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
  )
  if softcap is not None:
    logits_BKGTS = softcap * jnp.tanh(logits_BKGTS / softcap)
  big_neg = jnp.finfo(jnp.float32).min
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, big_neg)
  if dropout is not None:
    probs_BKGTS = dropout(jax.nn.softmax(logits_BKGTS, axis=-1))
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)
  # Softmax normalized after the value matmul: T x H divisions instead of T x S, one pass fewer
  # over the scores (the row max is a constant shift: no gradient flows through it).
  top_BKGT1 = jax.lax.stop_gradient(jnp.max(logits_BKGTS, axis=-1, keepdims=True))
  weights_BKGTS = jnp.exp(logits_BKGTS - top_BKGT1)
  total_BKGT = jnp.sum(weights_BKGTS, axis=-1)
  out_BTKGH = jnp.einsum(
    "BKGTS,BSKH->BTKGH",
    weights_BKGTS.astype(v_BSKH.dtype),
    v_BSKH,
    preferred_element_type=jnp.float32,
  )
  out_BTKGH = out_BTKGH / total_BKGT.transpose(0, 3, 1, 2)[..., None]
  return out_BTKGH.astype(v_BSKH.dtype)


def quantize_kv(x: Array, head_axis: int) -> tuple[Array, Array]:
  """Keys or values -> (int8, same layout; float32 scales without `head_axis`): one scale per
  slot and head, max |x| / 127 over the head dim."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=head_axis) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(x / jnp.expand_dims(scale, head_axis)), -127, 127).astype(jnp.int8)
  return q, scale


def cached_attention(q_BTNH: Array, old_kv, new_kv, masks, cfg: ModelConfig) -> Array:
  """Attention over the cache's earlier slots (keys [B, K, H, S], values [B, K, S, H]) and the
  new tokens ([B, T, K, H]), without copying the cache: one softmax over both key sets, values
  applied per set.

  An int8 cache comes as ((k, k_scale [B, K, S]), (v, v_scale)): the key scales multiply the
  logits of their slots, the value scales the probabilities. A None mask of the earlier slots
  (a fresh cache) leaves them out.
  """
  b, t, n, h = q_BTNH.shape
  (old_k, old_v), (k_BTKH, v_BTKH), (mask_BTS, mask_BTT) = old_kv, new_kv, masks
  dtype = q_BTNH.dtype
  k = k_BTKH.shape[2]
  q_BKGTH = q_BTNH.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4) * cfg.query_scale
  big_neg = jnp.finfo(jnp.float32).min
  f32 = jnp.float32

  def masked(logits_BKGTS, mask_BTS):
    if cfg.attn_logit_softcap is not None:
      cap = cfg.attn_logit_softcap
      logits_BKGTS = cap * jnp.tanh(logits_BKGTS / cap)
    return jnp.where(mask_BTS[:, None, None], logits_BKGTS, big_neg)

  parts = []  # (masked logits [B, K, G, T, S], values, value scales [B, K, S], values' axes)
  if mask_BTS is not None:
    k_scale = v_scale = None
    if isinstance(old_k, tuple):
      (old_k, k_scale), (old_v, v_scale) = old_k, old_v
    old_BKGTS = jnp.einsum(
      "BKGTH,BKHS->BKGTS", q_BKGTH, old_k.astype(dtype), preferred_element_type=f32
    )
    if k_scale is not None:
      old_BKGTS = old_BKGTS * k_scale[:, :, None, None, :]
    parts.append((masked(old_BKGTS, mask_BTS), old_v.astype(dtype), v_scale, "BKSH"))
  new_BKGTT = jnp.einsum("BKGTH,BSKH->BKGTS", q_BKGTH, k_BTKH, preferred_element_type=f32)
  parts.append((masked(new_BKGTT, mask_BTT), v_BTKH, None, "BSKH"))
  probs_BKGTX = jax.nn.softmax(jnp.concatenate([part[0] for part in parts], -1), axis=-1)
  out_BKGTH, offset = 0, 0
  for logits_BKGTS, values, scale_BKS, axes in parts:
    s = logits_BKGTS.shape[-1]
    probs_BKGTS = probs_BKGTX[..., offset : offset + s]
    offset += s
    if scale_BKS is not None:
      probs_BKGTS = probs_BKGTS * scale_BKS[:, :, None, None, :]
    out_BKGTH += jnp.einsum(f"BKGTS,{axes}->BKGTH", probs_BKGTS.astype(values.dtype), values)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with RoPE and an optional KV cache; `causal`
  False (an encoder's): the mask alone says who sees whom, through the XLA kernel."""

  config: ModelConfig
  deterministic: bool = True
  causal: bool = True

  @nn.compact
  def __call__(
    self,
    x_BTD: Array,
    positions_BT: Array,
    mask_BTS: Array,
    kv: tuple[Array, Array] | None = None,
    segment_ids_BT: Array | None = None,
    sliding: bool | Array | None = None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    """`sliding` (a bool, traced under the layer scan): whether this layer slides, in a model
    whose sliding and global layers alternate; it picks the RoPE base and the splash mask (the
    masks it is given are its own already)."""
    cfg = self.config
    dtype = dtype_of(cfg.dtype)
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
    x_BTD = x_BTD.astype(dtype)
    record_inputs(self, "in", x_BTD)  # of q
    record_inputs(self, "kv", x_BTD, sink=True)  # of k and v
    q_BTNH = heads_in(self, "q", x_BTD, n, "q_heads")
    k_BTKH = heads_in(self, "k", x_BTD, k, "kv_heads")
    v_BTKH = heads_in(self, "v", x_BTD, k, "kv_heads")
    if cfg.qk_norm and cfg.qk_norm_scope == "head":  # each head's H dims, one shared scale
      q_BTNH = Norm(cfg, name="q_norm")(q_BTNH)
      k_BTKH = Norm(cfg, name="k_norm")(k_BTKH)
    elif cfg.qk_norm:  # all heads' N x H dims together, a scale each
      b, t = x_BTD.shape[:2]
      q_BTNH = Norm(cfg, name="q_norm")(q_BTNH.reshape(b, t, n * h)).reshape(b, t, n, h)
      k_BTKH = Norm(cfg, name="k_norm")(k_BTKH.reshape(b, t, k * h)).reshape(b, t, k, h)
    if cfg.position == "rope":
      q_BTNH = apply_rope(q_BTNH, positions_BT, cfg, sliding)
      k_BTKH = apply_rope(k_BTKH, positions_BT, cfg, sliding)
    q_BTNH = constrain(q_BTNH, ("activation_batch", "activation_length", "activation_heads", None))

    new_kv = None
    if kv is not None:  # the caller writes the new entries into the cache, in place
      k_BKHT, v_BKTH = k_BTKH.transpose(0, 2, 3, 1), v_BTKH.transpose(0, 2, 1, 3)  # as cached
      if cfg.kv_cache == "int8":
        new_kv = (quantize_kv(k_BKHT, head_axis=2), quantize_kv(v_BKTH, head_axis=3))
      else:
        new_kv = (k_BKHT.astype(kv[0].dtype), v_BKTH.astype(kv[1].dtype))

    dropout_active = cfg.attn_dropout > 0 and not self.deterministic
    impl = "cached" if kv is not None else resolve_impl(cfg, dropout_active, x_BTD.shape[1])
    if not self.causal:
      impl = "xla"
    if impl == "cached":  # mask_BTS is (earlier cache slots [B, T, S], new tokens [B, T, T])
      out_BTNH = cached_attention(q_BTNH, kv, (k_BTKH, v_BTKH), mask_BTS, cfg)
    elif impl == "splash":
      run = lambda window: splash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg, window)
      if sliding is None or isinstance(sliding, bool):
        out_BTNH = run(cfg.sliding_window if sliding in (None, True) else None)
      else:  # a scanned layer of an alternating model: its kind is known when it runs
        out_BTNH = jax.lax.cond(sliding, lambda: run(cfg.sliding_window), lambda: run(None))
    elif impl == "xla":
      dropout = None
      if dropout_active:
        dropout = nn.Dropout(cfg.attn_dropout, deterministic=False)
      out_BTNH = xla_attention(
        q_BTNH, k_BTKH, v_BTKH, mask_BTS, cfg.attn_logit_softcap, dropout, cfg.query_scale,
        self.causal,
      )  # fmt: skip
    else:
      out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, mask=mask_BTS[:, None], scale=cfg.query_scale
      )

    return heads_out(self, out_BTNH), new_kv


def heads_in(module: nn.Module, name: str, x_BTD: Array, heads: int, axis: str) -> Array:
  """x's projection `name` to [B, T, heads, H] (its LoRA update and bias added where the model
  has them), a parameter of `module`."""
  cfg = module.config
  dtype = dtype_of(cfg.dtype)
  d, h = cfg.embed_dim, cfg.head_size
  y = projection(module, name, x_BTD, (d, heads, h), ("embed", axis, "head_dim"))  # BTD,DXH->BTXH
  delta = lora(module, name, x_BTD, (d,), (heads, h), ("embed",), (axis, "head_dim"))
  if delta is not None:
    y += delta
  if cfg.use_bias or cfg.qkv_bias:
    zeros = nn.initializers.zeros
    y += param(module, f"{name}_bias", (heads, h), (axis, "head_dim"), zeros).astype(dtype)[
      None, None
    ]
  return y


def heads_out(module: nn.Module, out_BTNH: Array) -> Array:
  """The heads' outputs projected back to the width by `module`'s `o` (LoRA and bias too)."""
  cfg = module.config
  dtype = dtype_of(cfg.dtype)
  n, h, d = cfg.num_heads, cfg.head_size, cfg.embed_dim
  out_BTNH = out_BTNH.astype(dtype)
  record_inputs(module, "o", out_BTNH, 2)
  o_axes = ("q_heads", "head_dim", "embed")
  y_BTD = projection(module, "o", out_BTNH, (n, h, d), o_axes, 2, output_init(cfg))  # BTNH,NHD->BTD
  delta = lora(module, "o", out_BTNH, (n, h), (d,), ("q_heads", "head_dim"), ("embed",))
  if delta is not None:
    y_BTD += delta
  if cfg.use_bias:
    y_BTD += param(module, "o_bias", (d,), ("embed",), nn.initializers.zeros).astype(dtype)[
      None, None
    ]
  return y_BTD


class CrossAttention(nn.Module):
  """Attention of the tokens to a memory (an encoder's states, [B, M, D]): queries from the
  tokens, keys and values from the memory, nothing rotated or causal
  (torch.nn.MultiheadAttention's, as TransformerDecoderLayer uses it)."""

  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: Array, memory_BMD, memory_mask_BM: Array, kv=None):
    """`memory_mask_BM` marks the memory's real slots; a row with none attends to all (its
    outputs are padding, and a softmax over nothing is undefined). `kv`: the memory's keys and
    values ([B, M, K, H] each) as an earlier call projected them, read in place of `memory_BMD`
    (a decoding step). Returns (output, the keys and values projected here, or None)."""
    cfg = self.config
    dtype = dtype_of(cfg.dtype)
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
    x_BTD = x_BTD.astype(dtype)
    q_BTNH = heads_in(self, "q", x_BTD, n, "q_heads")
    new_kv = None
    if kv is None:
      memory_BMD = memory_BMD.astype(dtype)
      kv = new_kv = tuple(heads_in(self, name, memory_BMD, k, "kv_heads") for name in "kv")
    k_BMKH, v_BMKH = kv
    b, t = x_BTD.shape[:2]
    seen_BM = memory_mask_BM.astype(bool)
    seen_BM |= ~jnp.any(seen_BM, axis=1, keepdims=True)
    mask_BTM = jnp.broadcast_to(seen_BM[:, None, :], (b, t, seen_BM.shape[1]))
    dropout = None
    if cfg.attn_dropout > 0 and not self.deterministic:
      dropout = nn.Dropout(cfg.attn_dropout, deterministic=False)
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h) * cfg.query_scale
    out_BTKGH = _attend(q_BTKGH, k_BMKH, v_BMKH, mask_BTM, cfg.attn_logit_softcap, dropout)
    return heads_out(self, out_BTKGH.reshape(b, t, n, h)), new_kv
