"""The decoder-only transformer (Flax Linen), with scanned layers and an explicit KV cache."""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from decoderjax import hostmem, quant
from decoderjax.attention import Attention, attention_mask, resolve_impl
from decoderjax.config import ModelConfig
from decoderjax.layers import (
  Mlp,
  Norm,
  constrain,
  contract_out_in,
  dtype_of,
  materialize,
  param,
  sinusoidal_positions,
  stored,
  weight,
)

Array = jax.Array

# Where cached calls of a per-layer (unscanned) model loop over layers with `lax.switch`
# (`switched_layers`) instead of unrolling them: XLA CPU runs an unrolled decode graph's matmuls
# one thread at a time, and a scan copies every layer's weights out of the stacked arrays. GPU
# conditionals read their branch index on the host, so accelerators keep the unrolled graph.
SWITCH_LAYERS_BACKENDS = ("cpu",)
# Where float32 generation contracts few rows weight-first (layers.contract_out_in), with
# projection weights stored [out, in] (`for_generation`): XLA CPU's kernels read them faster so.
OUT_IN_BACKENDS = ("cpu",)

REMAT_POLICIES = {
  "full": None,  # save nothing: recompute the whole layer in the backward pass
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values of every layer plus the metadata masks are built from.

  The layout follows the weights': stacked over layers for a scanned model, one array per layer
  for a per-layer one (generation, `for_generation`), which each layer then reads and writes in
  place. Keys hold their slots last ([B, K, H, S]) and values before the head dim ([B, K, S, H]),
  so both attention matmuls read the cache as stored. An int8 cache (`ModelConfig.kv_cache=
  "int8"`) holds each slot's key and value of each head as int8 with one float32 scale (max |x|
  / 127 over the head dim); attention applies the scales to its logits and probabilities, so
  the cache is never dequantized as a whole.
  """

  k: Array | tuple[Array, ...]  # [L, B, K, H, S] or L x [B, K, H, S]
  v: Array | tuple[Array, ...]  # [L, B, K, S, H] or L x [B, K, S, H]
  segment: Array  # [B, S] int32 document id of each slot; 0 marks empty or padding slots
  position: Array  # [B, S] int32 position of the token held in each slot
  index: Array  # [] int32 next slot to write
  k_scale: Array | tuple[Array, ...] | None = None  # [L, B, K, S] or L x [B, K, S]; int8 only
  v_scale: Array | tuple[Array, ...] | None = None

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
    """The new tokens' entries (stacked over L, laid out as the cache) written at `index`, in
    place."""
    index = self.index

    def write(full, new, slot_axis):  # slot_axis counted from the end
      start = [0] * full.ndim
      start[full.ndim + slot_axis] = index
      return jax.lax.dynamic_update_slice(full, new, start)

    def each(full, new_L, slot_axis):
      if not self.per_layer:
        return write(full, new_L, slot_axis)
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
      **scales,
    )

  def select_rows(self, rows: Array) -> KVCache:
    """The cache of rows `rows` (beam search reorders its beams)."""

    def per_row(x):
      if x is None:
        return None
      return tuple(layer[rows] for layer in x) if self.per_layer else x[:, rows]

    return self.replace(
      k=per_row(self.k),
      v=per_row(self.v),
      k_scale=per_row(self.k_scale),
      v_scale=per_row(self.v_scale),
      segment=self.segment[rows],
      position=self.position[rows],
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


def positions_from_segments(segment_ids_BT: Array) -> Array:
  """Positions that restart at 0 at the first token of each packed document."""
  t = jnp.arange(segment_ids_BT.shape[1])
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]],
    axis=1,
  )
  first_BT = jax.lax.cummax(jnp.where(starts, t[None, :], 0), axis=1)
  return t[None, :] - first_BT


class Block(nn.Module):
  """Pre-norm transformer layer: x + Attn(Norm(x)), then x + Mlp(Norm(x))."""

  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, kv=None, segment_ids_BT=None):
    cfg = self.config
    with jax.named_scope("attention"):
      h_BTD = Norm(cfg, name="attn_norm")(x_BTD)
      h_BTD, new_kv = Attention(cfg, self.deterministic, name="attn")(
        h_BTD, positions_BT, mask_BTS, kv, segment_ids_BT
      )
      x_BTD += nn.Dropout(cfg.resid_dropout)(h_BTD, deterministic=self.deterministic)
    with jax.named_scope("mlp"):
      h_BTD = Mlp(cfg, self.deterministic, name="mlp")(Norm(cfg, name="mlp_norm")(x_BTD))
      x_BTD += nn.Dropout(cfg.resid_dropout)(h_BTD, deterministic=self.deterministic)
    x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BTD, new_kv


class Decoder(nn.Module):
  """Token ids in, float32 next-token logits out; optionally reads and writes a KVCache."""

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BT: Array,
    positions_BT: Array | None = None,
    segment_ids_BT: Array | None = None,
    cache: KVCache | None = None,
    deterministic: bool = True,
    return_hidden: bool = False,
    start: bool = False,
    embed_delta_BTD: Array | None = None,
  ):
    """Returns (logits [B, T, V] float32, updated cache or None).

    Without a cache, `segment_ids_BT` (0 = padding) keeps packed documents apart and positions
    restart per document. With a cache, the tokens are written at `cache.index` and attend to
    every earlier slot of the same segment; `start` marks the first call of a sequence, into an
    empty cache (the tokens attend only to each other; a soft prompt goes first).
    `return_hidden` returns final hidden states instead of logits; `embed_delta_BTD` is added to
    the token embeddings (adversarial training). A classifier (`num_labels`) returns class
    logits [B, T, C] at every position.
    """
    cfg = self.config
    dtype = dtype_of(cfg.dtype)
    b, t = tokens_BT.shape
    p = cfg.prompt_tokens
    prepend = p > 0 and (cache is None or start)
    if t + (p if prepend else 0) > cfg.max_seq_len:
      soft = f" plus {p} soft-prompt tokens" if prepend else ""
      raise ValueError(
        f"sequence length {t}{soft} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}"
      )
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((b, t), jnp.int32)
    if positions_BT is None:
      if cache is None:
        positions_BT = positions_from_segments(segment_ids_BT)
      else:
        positions_BT = jnp.broadcast_to((cache.index + jnp.arange(t))[None, :], (b, t))

    table_shape = (cfg.vocab_size, cfg.embed_dim)
    embedding = stored(self, "embedding", table_shape, ("vocab", "embed"))
    x_BTD = materialize(cfg, "embedding", embedding, table_shape, rows=tokens_BT)
    if cfg.embed_scale:
      x_BTD *= jnp.asarray(cfg.embed_dim**0.5, dtype)
    if embed_delta_BTD is not None:
      x_BTD += embed_delta_BTD.astype(dtype)
    if p:  # text positions follow the soft prompt's, in every call
      positions_BT = positions_BT + p
    if prepend:  # the soft prompt takes the first p slots of every row
      prompt_PD = param(self, "soft_prompt", (p, cfg.embed_dim), (None, "embed"))
      x_BTD = jnp.concatenate(
        [jnp.broadcast_to(prompt_PD.astype(dtype)[None], (b, p, cfg.embed_dim)), x_BTD], axis=1
      )
      positions_BT = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(p)[None], (b, p)), positions_BT], axis=1
      )
      # Generation rows hold one sequence (segment 1); packed training rows see the prompt below.
      prompt_segment = 1 if cache is not None else 0
      segment_ids_BT = jnp.concatenate(
        [jnp.full((b, p), prompt_segment, segment_ids_BT.dtype), segment_ids_BT], axis=1
      )
      t += p
    if cfg.position == "learned":
      table = param(self, "position_embedding", (cfg.max_seq_len, cfg.embed_dim), (None, "embed"))
      x_BTD += jnp.take(table, positions_BT, axis=0).astype(dtype)
    elif cfg.position == "sinusoidal":
      x_BTD += sinusoidal_positions(positions_BT, cfg.embed_dim).astype(dtype)
    x_BTD = nn.Dropout(cfg.embed_dropout)(x_BTD, deterministic=deterministic)
    x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))

    q_slot_T = jnp.arange(t)
    dropout_active = cfg.attn_dropout > 0 and not deterministic
    if cache is None and not p and resolve_impl(cfg, dropout_active, t) == "splash":
      kv, index, mask_BTS = None, None, None  # the kernel masks by segment ids itself
    elif cache is None:
      kv, index = None, None
      mask_BTS = attention_mask(
        segment_ids_BT,
        positions_BT,
        q_slot_T,
        segment_ids_BT,
        positions_BT,
        q_slot_T,
        cfg.sliding_window,
      )
      if prepend:  # every packed document sees the soft prompt (causally, as prompt slots do)
        prompt_S = (q_slot_T < p)[None, None, :]
        mask_BTS |= (q_slot_T[None, :, None] >= q_slot_T[None, None, :]) & prompt_S
    else:  # attend to the cache's earlier slots and to the new tokens; write those after
      index = cache.index
      segment_ids_BT = segment_ids_BT.astype(jnp.int32)
      positions_BT = positions_BT.astype(jnp.int32)
      args = (segment_ids_BT, positions_BT, index + q_slot_T)
      old_BTS = None  # the first call of a sequence: the cache holds nothing to attend to
      if not start:
        old_BTS = attention_mask(
          *args, cache.segment, cache.position, jnp.arange(cache.length), cfg.sliding_window
        )
      new_BTT = attention_mask(*args, *args, cfg.sliding_window)
      mask_BTS = (old_BTS, new_BTT)
      if cache.per_layer == cfg.scan_layers:
        raise ValueError(
          f"a {'per-layer' if cache.per_layer else 'stacked'} KVCache for a model with "
          f"scan_layers={cfg.scan_layers}: build the cache with init_cache of the same config"
        )
      kv = cache.layers

    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BTD, new_kv = stack(cfg, deterministic, name="layers")(
        x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT
      )
    elif (
      kv is not None
      and deterministic
      and not self.is_initializing()
      and jax.default_backend() in SWITCH_LAYERS_BACKENDS
    ):
      layers = [self.variables["params"][f"layers_{i}"] for i in range(cfg.num_layers)]
      x_BTD, new_kv = switched_layers(
        cfg, layers, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT
      )
    else:
      new_layers = []
      for i in range(cfg.num_layers):
        layer_kv = None if kv is None else kv[i]
        x_BTD, layer_kv = block(cfg, deterministic, name=f"layers_{i}")(
          x_BTD, positions_BT, mask_BTS, layer_kv, segment_ids_BT
        )
        new_layers.append(layer_kv)
      new_kv = None if kv is None else jax.tree.map(lambda *z: jnp.stack(z), *new_layers)

    x_BTD = Norm(cfg, name="final_norm")(x_BTD)
    new_cache = None
    if cache is not None:
      new_cache = cache.written(new_kv, segment_ids_BT, positions_BT)
    if prepend:  # outputs of the text tokens only
      x_BTD = x_BTD[:, p:]
    if return_hidden:
      return x_BTD, new_cache
    if cfg.num_labels:  # a classifier: class logits at every position (pooled by the caller)
      head_DC = param(self, "cls_head", (cfg.embed_dim, cfg.num_labels), ("embed", None))
      bias_C = param(self, "cls_head_bias", (cfg.num_labels,), (None,), nn.initializers.zeros)
      logits_BTC = jnp.einsum(
        "BTD,DC->BTC", x_BTD, head_DC.astype(dtype), preferred_element_type=jnp.float32
      )
      return logits_BTC + bias_C.astype(jnp.float32)[None, None], new_cache
    if cfg.tie_embeddings:  # contracted as stored: a transposed copy of the table costs a step
      embedding_VD = materialize(cfg, "embedding", embedding, table_shape)
      if cache is not None and _out_in_applies(cfg):  # the table is stored [out, in] already
        # weight-first up to 128 rows, where it stops gaining on a table this wide
        logits_BTV = contract_out_in(x_BTD, embedding_VD, max_rows=128).astype(jnp.float32)
      else:
        logits_BTV = jnp.einsum(
          "BTD,VD->BTV", x_BTD, embedding_VD, preferred_element_type=jnp.float32
        )
    else:
      head_DV = weight(self, "head", (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"))
      logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, head_DV, preferred_element_type=jnp.float32)
    if cfg.final_logit_softcap is not None:
      cap = cfg.final_logit_softcap
      logits_BTV = cap * jnp.tanh(logits_BTV / cap)
    logits_BTV = constrain(
      logits_BTV, ("activation_batch", "activation_length", "activation_vocab")
    )
    return logits_BTV, new_cache


@functools.partial(jax.jit, static_argnums=0)
def _inference_block(cfg, params, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT):
  """One layer's inference call, jitted so that L calls with equal shapes trace it once."""
  return Block(cfg).apply({"params": params}, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT)


def switched_layers(cfg, layers, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT):
  """Inference layers as a loop whose step i runs layer i's own weights (`lax.switch` over L
  branches): one compiled layer body per layer, scheduled like a scan's, and no slicing of
  stacked weights. `kv` holds one cache tree per layer. Returns (x, the new tokens' keys and
  values stacked over L)."""

  def run(i, layers, x_BTD, kv):
    return _inference_block(cfg, layers[i], x_BTD, positions_BT, mask_BTS, kv[i], segment_ids_BT)

  branches = [functools.partial(run, i) for i in range(cfg.num_layers)]
  new = jax.eval_shape(branches[0], layers, x_BTD, kv)[1]
  stacked = jax.tree.map(lambda z: jnp.zeros((cfg.num_layers, *z.shape), z.dtype), new)

  def step(i, carry):
    x_BTD, stacked = carry
    x_BTD, new = jax.lax.switch(i, branches, layers, x_BTD, kv)
    put = lambda all_, one: jax.lax.dynamic_update_index_in_dim(all_, one, i, 0)
    return x_BTD, jax.tree.map(put, stacked, new)

  return jax.lax.fori_loop(0, cfg.num_layers, step, (x_BTD, stacked))


def unstack_layers(params: dict, num_layers: int, consume: bool = False) -> dict:
  """Scanned params (one 'layers' tree with a leading L axis) -> per-layer 'layers_i' trees.

  `consume` deletes each stacked array once it is split, so the peak is the weights plus one
  array rather than two copies of the layers."""
  params = dict(params)
  leaves, treedef = jax.tree.flatten(params.pop("layers"))
  per_layer = [[] for _ in range(num_layers)]
  for leaf in leaves:
    slices = [leaf[i] for i in range(num_layers)]
    for layer, piece in zip(per_layer, slices, strict=True):
      layer.append(piece)
    if consume and isinstance(leaf, jax.Array):
      jax.block_until_ready(slices)  # every slice read, then the stacked array goes
      leaf.delete()
  for i, layer in enumerate(per_layer):
    params[f"layers_{i}"] = jax.tree.unflatten(treedef, layer)
  return params


def for_generation(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, config) in the layout generation reads fastest: one array per layer and, for
  float32 on CPU, projection weights stored [out, in] (`weights_out_in`).

  Decoding a scanned model slices each layer's weights out of the stacked arrays at every step,
  which XLA CPU does by copying them (87 of 148 thread-ms of a SmolLM2 batch-8 decode step);
  MaxText likewise decodes from unscanned checkpoints. The price on CPU is compile time (one
  compiled body per layer, `switched_layers`). Consumes `params` when it converts them.
  """
  if cfg.scan_layers:
    params = unstack_layers(params, cfg.num_layers, consume=True)
    cfg = cfg.replace(scan_layers=False)
  if cfg.weights_out_in or cfg.quant != "none" or not _out_in_applies(cfg):
    return params, cfg
  params = transpose_projections(params, cfg.num_layers)
  hostmem.release_freed_memory()  # the originals, freed piecemeal, would stay resident
  return params, cfg.replace(weights_out_in=True)


def _out_in_applies(cfg: ModelConfig) -> bool:
  """Weight-first contraction helps float32 matmuls (quantized weights dequantize to float32);
  bfloat16 decoding measured no faster with it."""
  return jax.default_backend() in OUT_IN_BACKENDS and cfg.dtype == "float32"


def transpose_projections(params: dict, num_layers: int) -> dict:
  """Per-layer params with each projection weight [*in, *out] moved to [*out, *in], each
  stored array deleted once its transpose is made (the peak is the weights plus one)."""
  params = dict(params)
  for i in range(num_layers):

    def move(path, w):  # quant.QUANTIZED names every projection, with the dims after its inputs
      keep = quant.QUANTIZED.get(path[-1].key)
      if keep is None:
        return w
      n = quant.input_dims(w.ndim, keep)[1]  # inputs lead: [*in, *out]
      moved = jnp.transpose(w, (*range(n, w.ndim), *range(n))).block_until_ready()
      if isinstance(w, jax.Array):
        w.delete()
      return moved

    params[f"layers_{i}"] = jax.tree_util.tree_map_with_path(move, params[f"layers_{i}"])
  return params


def stack_layers(params: dict, num_layers: int) -> dict:
  """Per-layer 'layers_i' trees -> one scanned 'layers' tree with a leading L axis."""
  params = dict(params)
  layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
