"""The decoder-only transformer (Flax Linen): scanned or per-layer blocks, reading and writing
an explicit KV cache (kv_cache.py) when given one."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from decoderjax.model import layout
from decoderjax.model.attention import Attention, CrossAttention, attention_mask, resolve_impl
from decoderjax.model.config import ModelConfig
from decoderjax.model.kv_cache import KVCache
from decoderjax.model.layers import (
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
PAD_LOGIT = -1.0e9  # the logit of a padding id of the vocabulary: exp() of it is 0

REMAT_POLICIES = {
  "full": None,  # save nothing: recompute the whole layer in the backward pass
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _slots(index: Array, t: int) -> Array:
  """The cache slots t new tokens are written to: [T] from a shared index, [B, T] per row."""
  if index.ndim == 0:
    return index + jnp.arange(t)
  return index[:, None] + jnp.arange(t)[None, :]


def positions_from_segments(segment_ids_BT: Array) -> Array:
  """Positions that restart at 0 at the first token of each packed document."""
  t = jnp.arange(segment_ids_BT.shape[1])
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]],
    axis=1,
  )
  first_BT = jax.lax.cummax(jnp.where(starts, t[None, :], 0), axis=1)
  return t[None, :] - first_BT


def layer_masks(masks, sliding):
  """A layer's attention masks. A model whose sliding and global layers alternate builds both
  (global, sliding) and each layer takes its own: by `sliding`, a bool, or a traced one under
  the layer scan. None: the model's only masks (or none: the splash kernel masks itself)."""
  if sliding is None or masks is None:
    return masks
  global_masks, sliding_masks = masks
  if isinstance(sliding, bool):
    return sliding_masks if sliding else global_masks
  return jax.tree.map(lambda g, s: jnp.where(sliding, s, g), global_masks, sliding_masks)


class Block(nn.Module):
  """A transformer layer: attention, cross-attention to a memory (`cross_attention` models),
  then the MLP, each added to the residual stream with its norms placed as `norm_placement`
  says (pre: x + f(Norm(x)); post: x + Norm(f(x)); both; post_ln: Norm(x + f(x))). `causal`
  False: an encoder layer, whose tokens see the whole (unpadded) row."""

  config: ModelConfig
  deterministic: bool = True
  causal: bool = True

  @nn.compact
  def __call__(
    self, x_BTD, positions_BT, mask_BTS, kv=None, segment_ids_BT=None, sliding=None, memory=None,
    cross_kv=None,
  ):  # fmt: skip
    """`memory`: a cross-attention model's (memory [B, M, D], its mask [B, M]), or (None, the
    mask) with `cross_kv`, the memory's keys and values an earlier call projected. Returns (x,
    (the new tokens' keys and values, the memory's keys and values projected here for a cache,
    or None))."""
    cfg = self.config
    pre, post = cfg.norm_placement in ("pre", "both"), cfg.norm_placement in ("post", "both")
    dropout = lambda h_BTD: nn.Dropout(cfg.resid_dropout)(h_BTD, self.deterministic)

    def residual(name, f, x_BTD):
      if cfg.norm_placement == "post_ln":
        h_BTD, extra = f(x_BTD)
        return Norm(cfg, name=f"{name}_norm")(x_BTD + dropout(h_BTD)), extra
      h_BTD, extra = f(Norm(cfg, name=f"{name}_norm")(x_BTD) if pre else x_BTD)
      if post:
        h_BTD = Norm(cfg, name=f"{name}_post_norm")(h_BTD)
      return x_BTD + dropout(h_BTD), extra

    with jax.named_scope("attention"):
      attn = Attention(cfg, self.deterministic, self.causal, name="attn")
      mask_BTS = layer_masks(mask_BTS, sliding)
      x_BTD, new_kv = residual(
        "attn", lambda h: attn(h, positions_BT, mask_BTS, kv, segment_ids_BT, sliding), x_BTD
      )
    if cfg.cross_attention:
      with jax.named_scope("cross_attention"):
        cross = CrossAttention(cfg, self.deterministic, name="cross")
        x_BTD, cross_kv = residual("cross", lambda h: cross(h, *memory, cross_kv), x_BTD)
    with jax.named_scope("mlp"):
      mlp = Mlp(cfg, self.deterministic, name="mlp")
      x_BTD, _ = residual("mlp", lambda h: (mlp(h), None), x_BTD)
    x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
    keep = cfg.cross_attention and kv is not None  # (a cached call's, for the cache)
    return x_BTD, (new_kv, cross_kv if keep else None)


class Decoder(nn.Module):
  """Token ids in, float32 next-token logits out; optionally reads and writes a KVCache.

  The forward pass is four steps, each a method: `embed` (tokens, soft prompt and positions),
  `masks` (who attends to whom), `run_layers` and `head` (logits, class logits or hidden states).
  """

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
    logits_at_BN: Array | None = None,
    source_BM: Array | None = None,
    memory_BMD: Array | None = None,
    memory_mask_BM: Array | None = None,
  ):
    """Returns (logits [B, T, V] float32, updated cache or None).

    Without a cache, `segment_ids_BT` (0 = padding) keeps packed documents apart and positions
    restart per document. With a cache, the tokens are written at `cache.index` and attend to
    every earlier slot of the same segment; `start` marks the first call of a sequence, into an
    empty cache (the tokens attend only to each other; a soft prompt goes first).
    `logits_at_BN` keeps the outputs at those positions of each row only (prefill wants the
    last; scoring the continuation's), so the head's matmul runs on them alone.
    `return_hidden` returns final hidden states instead of logits; `embed_delta_BTD` is added to
    the token embeddings (adversarial training). A classifier (`num_labels`) returns class
    logits [B, T, C] at every position.
    A `cross_attention` model attends to `memory_BMD` ([B, M, D], an encoder's states), or to
    the encoding of the source token ids `source_BM` (`encode`); `memory_mask_BM` marks either's
    real slots (default: all). A cache's first call keeps the memory's keys and values, projected
    by each layer, for the calls after it.
    """
    cfg = self.config
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
        positions_BT = jnp.broadcast_to(_slots(cache.index, t), (b, t))
    x_BTD, positions_BT, segment_ids_BT, embedding = self.embed(
      tokens_BT, positions_BT, segment_ids_BT, embed_delta_BTD, prepend, cache, deterministic
    )
    if cache is not None:  # the cache records them as int32
      segment_ids_BT, positions_BT = (
        segment_ids_BT.astype(jnp.int32),
        positions_BT.astype(jnp.int32),
      )
    memory = self.memory(source_BM, memory_BMD, memory_mask_BM, cache, deterministic, embedding)
    cross_kv = None  # the memory's keys and values as projected at the cache's first call
    if memory is not None and memory[0] is None:
      cross_kv = (cache.cross_k, cache.cross_v)
    mask_BTS, kv = self.masks(segment_ids_BT, positions_BT, cache, start, prepend, deterministic)
    x_BTD, (new_kv, new_cross_kv) = self.run_layers(
      x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT, deterministic, memory, cross_kv
    )
    x_BTD = Norm(cfg, name="final_norm")(x_BTD)
    new_cache = None
    if cache is not None:
      new_cache = cache.written(new_kv, segment_ids_BT, positions_BT)
      if new_cross_kv is not None:
        k_LBMKH, v_LBMKH = new_cross_kv
        new_cache = new_cache.replace(cross_k=k_LBMKH, cross_v=v_LBMKH, memory_mask=memory[1])
    if prepend:  # outputs of the text tokens only
      x_BTD = x_BTD[:, p:]
    if logits_at_BN is not None:
      x_BTD = jnp.take_along_axis(x_BTD, logits_at_BN[..., None], axis=1)
    if return_hidden:
      return x_BTD, new_cache
    return self.head(x_BTD, embedding, decoding=cache is not None), new_cache

  def embed(
    self, tokens_BT, positions_BT, segment_ids_BT, embed_delta_BTD, prepend, cache, deterministic,
    embedding=None,
  ):  # fmt: skip
    """Token (and position) embeddings, with the soft prompt in front when `prepend`.

    Returns (x [B, T', D], positions, segment ids, the stored table for a tied head); T' counts
    the soft prompt's slots. `embedding`: the stored table, when a call made it already.
    """
    cfg = self.config
    dtype = dtype_of(cfg.dtype)
    b = tokens_BT.shape[0]
    p = cfg.prompt_tokens
    table_shape = (cfg.vocab_size, cfg.embed_dim)
    if embedding is None:
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
    if cfg.position == "learned":
      table = param(self, "position_embedding", (cfg.max_seq_len, cfg.embed_dim), (None, "embed"))
      x_BTD += jnp.take(table, positions_BT, axis=0).astype(dtype)
    elif cfg.position == "sinusoidal":
      x_BTD += sinusoidal_positions(positions_BT, cfg.embed_dim).astype(dtype)
    x_BTD = nn.Dropout(cfg.embed_dropout)(x_BTD, deterministic=deterministic)
    x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BTD, positions_BT, segment_ids_BT, embedding

  def memory(self, source_BM, memory_BMD, memory_mask_BM, cache, deterministic, embedding):
    """(memory [B, M, D], its mask [B, M] bool) that a cross-attention model's layers read; (None,
    the mask) when the cache holds the memory's projected keys and values; None for a model
    without cross-attention."""
    cfg = self.config
    if not cfg.cross_attention:
      if source_BM is not None or memory_BMD is not None:
        raise ValueError("a source or memory for a model without cross_attention")
      return None
    if source_BM is not None:
      if memory_BMD is not None:
        raise ValueError("give the source tokens or the memory, not both")
      memory_BMD = self.encode(source_BM, memory_mask_BM, deterministic, embedding)
    elif memory_BMD is None and cache is not None and cache.cross_k is not None:
      return None, cache.memory_mask
    if memory_BMD is None:
      raise ValueError("a cross_attention model attends to a memory: give source_BM or memory_BMD")
    if memory_BMD.shape[-1] != cfg.embed_dim:
      raise ValueError(f"memory width {memory_BMD.shape[-1]} is not embed_dim={cfg.embed_dim}")
    if memory_mask_BM is None:
      memory_mask_BM = jnp.ones(memory_BMD.shape[:2], bool)
    return memory_BMD, memory_mask_BM.astype(bool)

  def encode(self, source_BM, mask_BM, deterministic, embedding):
    """Source token ids [B, M] -> the memory [B, M, D]: their embeddings (the decoder's table,
    `embedding`, scaled and positioned as the decoder's tokens are), then `encoder_layers`
    bidirectional layers over the real tokens (`mask_BM`) and a norm."""
    cfg = self.config
    b, m = source_BM.shape
    if m > cfg.max_seq_len:
      raise ValueError(f"source length {m} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
    if mask_BM is None:
      mask_BM = jnp.ones((b, m), bool)
    positions_BM = jnp.broadcast_to(jnp.arange(m), (b, m))
    segment_ids_BM = mask_BM.astype(jnp.int32)
    args = (positions_BM, segment_ids_BM, None, False, None, deterministic, embedding)
    x_BMD, *_ = self.embed(source_BM, *args)
    if not cfg.encoder_layers:
      return x_BMD
    encoder_cfg = encoder_config(cfg)
    mask_BMM = jnp.broadcast_to(mask_BM.astype(bool)[:, None, :], (b, m, m))
    for i in range(cfg.encoder_layers):
      block = Block(encoder_cfg, deterministic, causal=False, name=f"encoder_{i}")
      x_BMD, _ = block(x_BMD, positions_BM, mask_BMM, None, segment_ids_BM)
    return Norm(cfg, name="encoder_norm")(x_BMD)

  def masks(self, segment_ids_BT, positions_BT, cache, start, prepend, deterministic):
    """(the attention mask, the cache's per-layer keys and values or None).

    Three cases: the splash kernel masks by segment ids itself (None); a training or scoring
    call builds [B, T, T]; a cached call builds (earlier slots [B, T, S] or None, new [B, T, T]).
    """
    cfg = self.config
    p = cfg.prompt_tokens
    q_slot_T = jnp.arange(segment_ids_BT.shape[1])
    dropout_active = cfg.attn_dropout > 0 and not deterministic
    if cache is None and not p and resolve_impl(cfg, dropout_active, len(q_slot_T)) == "splash":
      return None, None
    if cache is not None and cache.per_layer == cfg.scan_layers:
      raise ValueError(
        f"a {'per-layer' if cache.per_layer else 'stacked'} KVCache for a model with "
        f"scan_layers={cfg.scan_layers}: build the cache with init_cache of the same config"
      )

    def build(window):
      if cache is None:
        args = (segment_ids_BT, positions_BT, q_slot_T)
        mask_BTS = attention_mask(*args, *args, window)
        if prepend:  # every packed document sees the soft prompt (causally, as prompt slots do)
          prompt_S = (q_slot_T < p)[None, None, :]
          mask_BTS |= (q_slot_T[None, :, None] >= q_slot_T[None, None, :]) & prompt_S
        return mask_BTS
      # attend to the cache's earlier slots and to the new tokens; written after the layers
      args = (segment_ids_BT, positions_BT, _slots(cache.index, len(q_slot_T)))
      old_BTS = None  # the first call of a sequence: the cache holds nothing to attend to
      if not start:
        old_BTS = attention_mask(
          *args, cache.segment, cache.position, jnp.arange(cache.length), window
        )
      return old_BTS, attention_mask(*args, *args, window)

    # alternating layers: both kinds of masks, each layer picks its own (layer_masks)
    masks = (
      (build(None), build(cfg.sliding_window)) if cfg.layer_pattern else build(cfg.sliding_window)
    )
    return masks, None if cache is None else cache.layers

  def run_layers(
    self, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT, deterministic, memory, cross_kv=None
  ):  # fmt: skip
    """The layers, scanned, switched (cached CPU inference of a per-layer model) or unrolled.
    `cross_kv`: the memory's keys and values stacked over L ([L, B, M, K, H] each). Returns (x,
    (the new tokens' keys and values, or None without a cache; the memory's keys and values
    projected here, or None), each stacked over L)."""
    cfg = self.config
    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    sliding = [cfg.sliding_layer(i) if cfg.layer_pattern else None for i in range(cfg.num_layers)]
    if cfg.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, nn.broadcast, 0),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      sliding_L = jnp.asarray(sliding) if cfg.layer_pattern else None
      return stack(cfg, deterministic, name="layers")(
        x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT, sliding_L, memory, cross_kv
      )
    if (
      kv is not None
      and deterministic
      and not self.is_initializing()
      and jax.default_backend() in SWITCH_LAYERS_BACKENDS
    ):
      layers = [self.variables["params"][f"layers_{i}"] for i in range(cfg.num_layers)]
      return switched_layers(
        cfg, layers, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT, memory, cross_kv
      )
    new_layers = []
    for i in range(cfg.num_layers):
      layer_kv = None if kv is None else kv[i]
      x_BTD, new = block(cfg, deterministic, name=f"layers_{i}")(
        x_BTD, positions_BT, mask_BTS, layer_kv, segment_ids_BT, sliding[i], memory,
        _layer(cross_kv, i),
      )  # fmt: skip
      new_layers.append(new)
    return x_BTD, jax.tree.map(lambda *z: jnp.stack(z), *new_layers)

  def head(self, x_BTD, embedding, decoding: bool):
    """Final hidden states -> float32 logits: class logits [B, T, C] for a classifier, else
    token logits [B, T, V] from the tied table or the head, soft-capped when configured."""
    cfg = self.config
    dtype = dtype_of(cfg.dtype)
    if cfg.num_labels:  # a classifier: class logits at every position (pooled by the caller)
      head_DC = param(self, "cls_head", (cfg.embed_dim, cfg.num_labels), ("embed", None))
      bias_C = param(self, "cls_head_bias", (cfg.num_labels,), (None,), nn.initializers.zeros)
      logits_BTC = jnp.einsum(
        "BTD,DC->BTC", x_BTD, head_DC.astype(dtype), preferred_element_type=jnp.float32
      )
      return logits_BTC + bias_C.astype(jnp.float32)[None, None]
    if cfg.tie_embeddings:  # contracted as stored: a transposed copy of the table costs a step
      embedding_VD = materialize(cfg, "embedding", embedding, (cfg.vocab_size, cfg.embed_dim))
      if decoding and layout.out_in_applies(cfg):  # the table is stored [out, in] already
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
    if cfg.vocab_pad:  # padding rows: no probability, so never sampled and never in the loss
      real_V = jnp.arange(cfg.vocab_size) < cfg.real_vocab
      logits_BTV = jnp.where(real_V, logits_BTV, PAD_LOGIT)
    return constrain(logits_BTV, ("activation_batch", "activation_length", "activation_vocab"))


def _layer(stacked, i: int):
  """Layer i's slice of a tree stacked over L (None stays None)."""
  return jax.tree.map(lambda z: z[i], stacked)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _inference_block(
  cfg, params, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT, sliding, memory, cross_kv
):  # fmt: skip
  """One layer's inference call, jitted so that L calls with equal shapes trace it once (twice
  when sliding and global layers alternate)."""
  return Block(cfg).apply(
    {"params": params}, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT, sliding, memory,
    cross_kv,
  )  # fmt: skip


def encoder_config(cfg: ModelConfig) -> ModelConfig:
  """The config of a cross-attention model's encoder layers: the decoder's, without
  cross-attention, sliding windows or the generation layout (encoder weights stay as stored)."""
  return cfg.replace(
    cross_attention=False, encoder_layers=0, sliding_window=None, global_every=0,
    global_layers=(), local_rope_theta=None, weights_out_in=False,
  )  # fmt: skip


def switched_layers(
  cfg, layers, x_BTD, positions_BT, mask_BTS, kv, segment_ids_BT, memory=None, cross_kv=None
):  # fmt: skip
  """Inference layers as a loop whose step i runs layer i's own weights (`lax.switch` over L
  branches): one compiled layer body per layer, scheduled like a scan's, and no slicing of
  stacked weights. `kv` holds one cache tree per layer. Returns what `run_layers` does."""

  def run(i, layers, x_BTD, kv):
    sliding = cfg.sliding_layer(i) if cfg.layer_pattern else None
    return _inference_block(
      cfg, layers[i], x_BTD, positions_BT, mask_BTS, kv[i], segment_ids_BT, sliding, memory,
      _layer(cross_kv, i),
    )  # fmt: skip

  branches = [functools.partial(run, i) for i in range(cfg.num_layers)]
  new = jax.eval_shape(branches[0], layers, x_BTD, kv)[1]
  stacked = jax.tree.map(lambda z: jnp.zeros((cfg.num_layers, *z.shape), z.dtype), new)

  def step(i, carry):
    x_BTD, stacked = carry
    x_BTD, new = jax.lax.switch(i, branches, layers, x_BTD, kv)
    put = lambda all_, one: jax.lax.dynamic_update_index_in_dim(all_, one, i, 0)
    return x_BTD, jax.tree.map(put, stacked, new)

  return jax.lax.fori_loop(0, cfg.num_layers, step, (x_BTD, stacked))


def init_params(cfg: ModelConfig, rng) -> dict:
  """The model's (boxed: with logical axes) parameters, initialized from `rng`."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  source = tokens if cfg.cross_attention else None  # a cross-attention model's encoder too
  return Decoder(cfg).init(rng, tokens, source_BM=source)["params"]


def param_shapes(cfg: ModelConfig) -> dict:
  """The boxed parameters' shapes and dtypes: no memory, and nothing runs (the key is made
  inside eval_shape, so this works with no device, as for a TPU slice compiled for from CPU)."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
