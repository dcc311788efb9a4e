"""The decoder against an independent float64 reference, and its structural properties."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from decoderjax.model import attention, layout
from decoderjax.model import decoder as model_lib
from decoderjax.model.attention import xla_attention
from decoderjax.model.config import ModelConfig, RopeScaling
from decoderjax.model.decoder import Decoder, count_params
from decoderjax.model.kv_cache import init_cache
from decoderjax.model.layers import WEIGHT_FIRST_MAX_ROWS, contract_out_in, rope_frequencies
from decoderjax.model.layout import stack_layers, unstack_layers
from decoderjax.model.presets import get_preset

GEMMA = get_preset(
  "tiny-llama",
  norm_offset=True,
  mlp="geglu",
  embed_scale=True,
  num_kv_heads=1,
  head_dim=8,
  attn_logit_softcap=5.0,
  final_logit_softcap=3.0,
)
ALTERNATING = dict(norm_placement="both", sliding_window=3, global_every=2)  # layer 0 slides
VARIANTS = {
  "gpt2": get_preset("tiny-gpt2", num_layers=2),
  "llama-gqa": get_preset("tiny-llama"),
  "mistral-window": get_preset("tiny-llama", sliding_window=3, tie_embeddings=False),
  "qwen2-qkv-bias": get_preset("tiny-llama", qkv_bias=True),
  "qwen3-qk-norm": get_preset("tiny-llama", qk_norm=True, head_dim=8),
  "gemma": GEMMA,
  "sinusoidal": get_preset("tiny-gpt2", position="sinusoidal"),
  # Norms before and after each sublayer; layer 0 slides over 3 keys, layer 1 sees all
  "gemma2-alternating": GEMMA.replace(**ALTERNATING, attn_scale=0.2),
  # ... with per-head q/k norms and a RoPE base of its own for the sliding layers
  "gemma3-alternating": GEMMA.replace(
    **ALTERNATING, qk_norm=True, rope_theta=1e6, local_rope_theta=10.0, final_logit_softcap=None
  ),
  "olmo2-post-norm": get_preset(
    "tiny-llama", norm_placement="post", qk_norm=True, qk_norm_scope="all", tie_embeddings=False
  ),
}


def init_params(cfg, seed=0, t=8):
  params = Decoder(cfg).init(jax.random.key(seed), jnp.zeros((1, t), jnp.int32))["params"]
  # Perturb norms and biases so that a mix-up between them cannot hide behind ones and zeros.
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), nn.unbox(params)
  )


def tokens(cfg, b=2, t=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, toks, segment_ids_BT):
  return Decoder(cfg).apply({"params": params}, toks, segment_ids_BT=segment_ids_BT)[0]


def forward(cfg, params, toks, segment_ids_BT=None):
  return _forward(cfg, params, toks, segment_ids_BT)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_float64_reference(name):
  cfg = VARIANTS[name]
  params = init_params(cfg)
  toks = np.asarray(tokens(cfg, b=1, t=9))
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3]])
  got = forward(cfg, params, toks, segment_ids_BT=segments)
  ref = reference.forward(unstack_layers(params, cfg.num_layers), cfg, toks[0], segments[0])
  np.testing.assert_allclose(got[0], ref, atol=2e-5, rtol=1e-4)


def test_causality():
  cfg = VARIANTS["llama-gqa"]
  params = init_params(cfg)
  toks = tokens(cfg)
  base = forward(cfg, params, toks)
  for t in (3, 7):
    changed = toks.at[:, t].set((toks[:, t] + 1) % cfg.vocab_size)
    out = forward(cfg, params, changed)
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-4


def test_packed_documents_are_isolated_and_positions_restart():
  cfg = VARIANTS["gpt2"]
  params = init_params(cfg)
  a, b = tokens(cfg, 1, 5, seed=2), tokens(cfg, 1, 7, seed=3)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  out = forward(cfg, params, packed, segment_ids_BT=segments)
  np.testing.assert_allclose(out[:, :5], forward(cfg, params, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:], forward(cfg, params, b), atol=1e-5)


def test_padding_does_not_change_real_tokens():
  cfg = VARIANTS["llama-gqa"]
  params = init_params(cfg)
  toks = tokens(cfg, 1, 6)
  padded = jnp.concatenate([toks, jnp.zeros((1, 4), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 6 + [0] * 4])
  out = forward(cfg, params, padded, segment_ids_BT=segments)
  np.testing.assert_allclose(out[:, :6], forward(cfg, params, toks), atol=1e-5)
  assert np.isfinite(out).all()


@pytest.mark.parametrize(
  "name",
  ["gpt2", "llama-gqa", "mistral-window", "gemma", "qwen3-qk-norm", "gemma3-alternating",
   "olmo2-post-norm"],
)  # fmt: skip
def test_cache_decoding_equals_full_forward(name):
  cfg = VARIANTS[name]
  params = init_params(cfg)
  toks = tokens(cfg, b=2, t=12)
  full = forward(cfg, params, toks)
  model = Decoder(cfg)
  cache = init_cache(cfg, 2, 16)
  logits, cache = model.apply({"params": params}, toks[:, :5], cache=cache)  # prefill
  steps = [logits]
  for t in range(5, 12):
    logits, cache = model.apply({"params": params}, toks[:, t : t + 1], cache=cache)
    steps.append(logits)
  assert int(cache.index) == 12
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize(
  "name,kv_cache",
  [("llama-gqa", "auto"), ("llama-gqa", "int8"), ("gemma3-alternating", "auto")],
)
def test_generation_layouts_decode_alike(monkeypatch, name, kv_cache):
  """Scanned weights (nn.scan), per-layer weights looped by lax.switch (CPU generation) and
  per-layer weights unrolled (accelerators) give the same logits and caches (alternating
  sliding and global layers too: scanned, each layer's kind is a traced flag)."""
  cfg = VARIANTS[name].replace(kv_cache=kv_cache)
  params = init_params(cfg)
  toks = tokens(cfg, b=2, t=12)
  want, want_cache = _decode(cfg, params, toks)
  copy = jax.tree.map(jnp.array, params)
  per_layer, per_layer_cfg = layout.for_generation(copy, cfg)
  assert not per_layer_cfg.scan_layers and "layers_1" in per_layer
  assert per_layer_cfg.weights_out_in  # on CPU, projections stored [out, in]
  n, h, d = cfg.num_heads, cfg.head_size, cfg.embed_dim
  assert per_layer["layers_1"]["attn"]["q"].shape == (n, h, d)
  assert per_layer["layers_1"]["attn"]["o"].shape == (d, n, h)
  assert per_layer["layers_1"]["mlp"]["down"].shape == (d, cfg.mlp_dim)
  np.testing.assert_array_equal(
    per_layer["layers_1"]["mlp"]["up"], np.asarray(params["layers"]["mlp"]["up"][1]).T
  )
  assert all(x.is_deleted() for x in jax.tree.leaves(copy["layers"]))  # consumed as it went
  got = {"switch": _decode(per_layer_cfg, per_layer, toks)}
  with pytest.raises(ValueError, match="per-layer KVCache for a model with scan_layers=True"):
    Decoder(cfg).apply({"params": params}, toks, cache=init_cache(per_layer_cfg, 2, 16))
  monkeypatch.setattr(model_lib, "SWITCH_LAYERS_BACKENDS", ())
  got["unrolled"] = _decode(per_layer_cfg, per_layer, toks)
  for logits, cache in got.values():
    np.testing.assert_allclose(logits, want, atol=1e-5)
    assert cache.per_layer and len(cache.k) == cfg.num_layers
    for a, b in zip(jax.tree.leaves(cache.stacked()), jax.tree.leaves(want_cache), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 8, WEIGHT_FIRST_MAX_ROWS + 1])
def test_contract_out_in_matches_matmul(rows):
  """Weight-first (few rows) and x @ w^T (many) both equal the plain product, over one and over
  two contracted dims."""
  rng = np.random.default_rng(rows)
  x = rng.standard_normal((rows, 1, 3, 8), np.float32)
  w = rng.standard_normal((5, 3, 8), np.float32)  # [out, *in]
  got = jax.jit(contract_out_in, static_argnums=2)(x, w, 2)
  np.testing.assert_allclose(got, np.einsum("btnh,onh->bto", x, w), rtol=1e-5, atol=1e-5)
  got = contract_out_in(x[..., 0, :], w[:, 0])
  np.testing.assert_allclose(got, x[..., 0, :] @ w[:, 0].T, rtol=1e-5, atol=1e-5)


def test_out_in_weights_are_for_float32_generation_only():
  cfg = VARIANTS["llama-gqa"].replace(scan_layers=False)
  quantized, bf16 = cfg.replace(quant="int8"), cfg.replace(dtype="bfloat16")
  assert not layout.for_generation({}, quantized)[1].weights_out_in
  assert not layout.for_generation({}, bf16)[1].weights_out_in
  with pytest.raises(ValueError, match="weights_out_in: applies to float weights"):
    quantized.replace(weights_out_in=True)
  assert "weights_out_in" not in cfg.to_dict()  # model directories stay readable by older versions
  with pytest.raises(ValueError, match="transposed generation weights"):
    cfg.replace(weights_out_in=True).to_dict()


def test_scan_equals_unrolled_and_remat_equals_plain():
  cfg = VARIANTS["llama-gqa"]
  params = init_params(cfg)
  toks = tokens(cfg)
  scanned = forward(cfg, params, toks)
  unrolled_cfg = cfg.replace(scan_layers=False)
  unrolled = forward(unrolled_cfg, unstack_layers(params, cfg.num_layers), toks)
  np.testing.assert_allclose(unrolled, scanned, atol=1e-5)
  assert jax.tree.structure(stack_layers(unstack_layers(params, 2), 2)) == jax.tree.structure(
    params
  )

  def loss(p, c):
    return forward(c, p, toks).sum()

  g_plain = jax.grad(loss)(params, cfg)
  g_remat = jax.grad(loss)(params, cfg.replace(remat="full"))
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dot_product_attention_impl_matches_xla():
  cfg = VARIANTS["mistral-window"]
  params = init_params(cfg)
  toks = tokens(cfg)
  segments = jnp.array([[1] * 6 + [2] * 6, [1] * 12])
  xla = forward(cfg.replace(attention_impl="xla"), params, toks, segment_ids_BT=segments)
  dpa = forward(
    cfg.replace(attention_impl="dot_product_attention"), params, toks, segment_ids_BT=segments
  )
  np.testing.assert_allclose(dpa, xla, atol=1e-5)


def test_a_kernel_asked_for_by_name_refuses_what_it_lacks():
  """auto falls back to XLA for attention dropout and for soft-capping outside splash; a kernel
  named in attention_impl says it lacks them instead of being replaced silently."""
  from decoderjax.model.attention import resolve_impl

  cfg = VARIANTS["mistral-window"]
  assert resolve_impl(cfg.replace(attn_dropout=0.1), True, 128) == "xla"  # auto on CPU: xla
  for impl in ("splash", "dot_product_attention"):
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' has no attention dropout"):
      resolve_impl(cfg.replace(attention_impl=impl, attn_dropout=0.1), True, 128)
    assert resolve_impl(cfg.replace(attention_impl=impl, attn_dropout=0.1), False, 128) == impl
  capped = cfg.replace(attention_impl="dot_product_attention", attn_logit_softcap=30.0)
  with pytest.raises(ValueError, match="has no attention logit soft-capping"):
    resolve_impl(capped, False, 128)


@pytest.mark.parametrize("blocks", [None, (2, 3)])
def test_xla_attention_matches_softmax_attention_and_its_gradients(blocks, monkeypatch):
  """Softmax normalized after the value matmul equals plain softmax attention, values and
  gradients, with rows that see nothing (padding); also by causal query blocks (10 rows: blocks
  of 4, 4 and 2)."""
  if blocks:
    monkeypatch.setattr(attention, "CAUSAL_BLOCK_MIN", blocks[0])
    monkeypatch.setattr(attention, "CAUSAL_BLOCKS_MAX", blocks[1])
  rng = np.random.default_rng(0)
  t = 10
  q, k, v = (jnp.asarray(rng.standard_normal((2, t, n, 8)), jnp.float32) for n in (4, 2, 2))
  mask = jnp.tril(jnp.ones((t, t), bool))[None].repeat(2, 0).at[1, :2].set(False)

  def plain(q, k, v):
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(2, t, 2, 2, 8) / 8**0.5, k)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(logits, axis=-1), v)
    return out.reshape(2, t, 4, 8)

  ours = lambda q, k, v: xla_attention(q, k, v, mask)
  jaxpr = str(jax.make_jaxpr(ours)(q, k, v))
  assert jaxpr.count("dot_general") == (6 if blocks else 2)  # scores and values per block
  seen = mask.any(-1)[..., None, None]  # rows that see nothing average whatever keys they get
  np.testing.assert_allclose(ours(q, k, v) * seen, plain(q, k, v) * seen, atol=1e-6)
  loss = lambda f: lambda *x: jnp.sum(jnp.sin(f(*x)) * seen)
  grads = (jax.grad(loss(f), (0, 1, 2))(q, k, v) for f in (ours, plain))
  for got, want in zip(*grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bfloat16_close_to_float32():
  cfg = VARIANTS["llama-gqa"]
  params = init_params(cfg)
  toks = tokens(cfg)
  f32 = forward(cfg, params, toks)
  bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  bf16 = forward(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), bf16_params, toks)
  assert bf16.dtype == jnp.float32  # logits always float32
  assert np.abs(np.asarray(bf16) - np.asarray(f32)).max() < 0.1 * np.abs(f32).max()
  assert (np.argmax(bf16, -1) == np.argmax(f32, -1)).mean() > 0.8


def test_gradients_finite_with_dropout():
  cfg = VARIANTS["gpt2"].replace(embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  params = init_params(cfg)
  toks = tokens(cfg)

  def loss(p):
    out, _ = Decoder(cfg).apply(
      {"params": p}, toks, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    return jnp.mean(jax.nn.logsumexp(out, -1))

  grads = jax.grad(loss)(params)
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  assert not np.allclose(loss(params), jnp.mean(jax.nn.logsumexp(forward(cfg, params, toks), -1)))


PUBLISHED_COUNTS = {
  "gpt2": 124_439_808,
  "gpt2-medium": 354_823_168,
  "smollm2-135m": 134_515_008,
  "llama-3.2-1b": 1_235_814_400,
  "mistral-7b": 7_241_732_096,
  "llama-3.1-8b": 8_030_261_248,  # meta-llama/Llama-3.1-8B
  "llama-3.1-70b": 70_553_706_496,  # meta-llama/Llama-3.1-70B
  "qwen2.5-0.5b": 494_032_768,
  # Qwen/Qwen3-0.6B: 0.44B without the tied embedding (its safetensors also hold the tied head)
  "qwen3-0.6b": 596_049_920,
  "qwen3-8b": 8_190_735_360,  # Qwen/Qwen3-8B
  "gemma-2b": 2_506_172_416,
  "gemma-2-2b": 2_614_341_888,  # google/gemma-2-2b
  "gemma-3-1b": 999_885_952,  # google/gemma-3-1b-pt
  "phi-3-mini": 3_821_079_552,  # microsoft/Phi-3-mini-4k-instruct
  "olmo-2-1b": 1_484_916_736,  # allenai/OLMo-2-0425-1B
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_preset_parameter_counts(name):
  cfg = get_preset(name)
  shapes = jax.eval_shape(
    lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )  # costs no memory or compute
  assert count_params(nn.unbox(shapes["params"])) == PUBLISHED_COUNTS[name]


def test_llama3_rope_scaling_matches_published_formula():
  cfg = get_preset("llama-3.2-1b")
  s = cfg.rope_scaling
  h = cfg.head_size
  expected = []
  for i in range(0, h, 2):
    freq = 1.0 / cfg.rope_theta ** (i / h)
    wavelen = 2 * np.pi / freq
    if wavelen < s.original_max_position / s.high_freq_factor:
      expected.append(freq)
    elif wavelen > s.original_max_position / s.low_freq_factor:
      expected.append(freq / s.factor)
    else:
      smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
      )
      expected.append((1 - smooth) * freq / s.factor + smooth * freq)
  np.testing.assert_allclose(rope_frequencies(cfg), expected, rtol=1e-5)


@pytest.mark.parametrize(
  "changes, field",
  [
    (dict(embed_dim=65, num_heads=4), "num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(position="alibi"), "position"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(attn_dropout=1.5), "attn_dropout"),
  ],
)
def test_inconsistent_configs_name_the_field(changes, field):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    ModelConfig(**changes)


def test_unknown_preset_and_long_sequence_fail_clearly():
  with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
    get_preset("gpt5")
  cfg = get_preset("tiny-gpt2", max_seq_len=8)
  with pytest.raises(ValueError, match="max_seq_len=8"):
    Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))


def test_config_json_round_trip():
  cfg = get_preset("llama-3.2-1b")
  assert ModelConfig.from_json(cfg.to_json()) == cfg
  assert isinstance(ModelConfig.from_json(cfg.to_json()).rope_scaling, RopeScaling)
  with pytest.raises(ValueError, match="unknown field"):
    ModelConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


@pytest.mark.parametrize("name,layers", [("llama-gqa", 1), ("gemma", 1), ("gemma3-alternating", 2)])
def test_splash_attention_matches_xla(name, layers):
  """Pallas splash attention (interpreted on CPU) against the XLA reference, with its gradient
  (alternating layers: the scanned layer's kind picks the sliding or the causal kernel)."""
  cfg = VARIANTS[name].replace(max_seq_len=128, sliding_window=40, num_layers=layers)
  params = init_params(cfg)
  toks = tokens(cfg, b=1, t=128)
  segments = jnp.array([[1] * 50 + [2] * 78])

  def loss(p, impl):
    c = cfg.replace(attention_impl=impl)
    out = Decoder(c).apply({"params": p}, toks, segment_ids_BT=segments)[0]
    return jnp.mean(jnp.square(out)), out

  (xla_loss, xla_out), xla_grad = jax.value_and_grad(loss, has_aux=True)(params, "xla")
  (sp_loss, sp_out), sp_grad = jax.value_and_grad(loss, has_aux=True)(params, "splash")
  np.testing.assert_allclose(sp_out, xla_out, atol=2e-5)
  for a, b in zip(jax.tree.leaves(sp_grad), jax.tree.leaves(xla_grad), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def _decode(cfg, params, toks, prompt=5):
  """Prefill `prompt` tokens, then one token at a time -> (logits [B, T, V], final cache)."""
  model = Decoder(cfg)
  cache = init_cache(cfg, toks.shape[0], 16)
  logits, cache = model.apply({"params": params}, toks[:, :prompt], cache=cache)
  steps = [logits]
  for t in range(prompt, toks.shape[1]):
    logits, cache = model.apply({"params": params}, toks[:, t : t + 1], cache=cache)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("name,scan", [("llama-gqa", True), ("mistral-window", False)])
def test_int8_cache_decoding_is_close_to_float_cache(name, scan):
  cfg = VARIANTS[name].replace(scan_layers=scan)
  params = init_params(VARIANTS[name])
  if not scan:
    params = unstack_layers(params, cfg.num_layers)
  toks = tokens(cfg, b=2, t=12)
  want, float_cache = _decode(cfg, params, toks)
  got, cache = _decode(cfg.replace(kv_cache="int8"), params, toks)
  assert cache.per_layer == (not scan)
  cache, float_cache = cache.stacked(), float_cache.stacked()
  assert cache.k.dtype == jnp.int8 and cache.v_scale.shape == cache.v.shape[:-1]
  slots_last = lambda keys: jnp.swapaxes(keys, -1, -2)  # keys are cached as [..., H, S]
  for q, scale, ref in (
    (slots_last(cache.k), cache.k_scale, slots_last(float_cache.k)),
    (cache.v, cache.v_scale, float_cache.v),
  ):
    # Each stored key / value is within half a step (its head's peak / 254) of the float one:
    # checked where both runs saw the same inputs (the prompt's slots, every slot of layer 0).
    error = jnp.abs(q.astype(jnp.float32) * scale[..., None] - ref)
    within = error <= scale[..., None] / 2 * (1 + 1e-5) + 1e-7
    assert bool(jnp.all(within[:, :, :, :5])) and bool(jnp.all(within[0]))
    assert int(jnp.abs(q).max()) == 127
  # hence logits within 1% of their largest magnitude (about 0.1% measured), and not identical
  difference = float(jnp.abs(got - want).max())
  assert 0 < difference <= 0.01 * float(jnp.abs(want).max())


def test_padded_vocabulary_predicts_real_tokens_only():
  """A char vocabulary of 85 ids padded to 128 rows: the logits of real ids and the loss are the
  unpadded model's; padding rows, even large ones, get no probability and are never sampled."""
  from decoderjax.checkpoints import exchange
  from decoderjax.inference import sampling
  from decoderjax.inference.sampling import SamplingConfig
  from decoderjax.training import steps

  cfg = get_preset("tiny-llama").replace(vocab_size=85, tie_embeddings=False)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  padded_cfg, padded = exchange.pad_vocab(cfg, jax.tree.map(np.asarray, params))
  assert (padded_cfg.vocab_size, padded_cfg.vocab_pad, padded_cfg.real_vocab) == (128, 43, 85)
  padded["head"][:, 85:] = 50.0  # unmasked, a padding id would win every step
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 85, (2, 24)))
  plain_BTV, _ = Decoder(cfg).apply({"params": params}, tokens)
  padded_BTV, _ = Decoder(padded_cfg).apply({"params": padded}, tokens)
  np.testing.assert_array_equal(padded_BTV[..., :85], plain_BTV)
  assert np.all(np.asarray(padded_BTV[..., 85:]) == model_lib.PAD_LOGIT)
  targets, weights = tokens[:, 1:], jnp.ones((2, 23))
  for smoothing in (0.0, 0.1):
    want = steps.cross_entropy(plain_BTV[:, :-1], targets, weights, 1e-4, smoothing)
    got = steps.cross_entropy(padded_BTV[:, :-1], targets, weights, 1e-4, smoothing, 43)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  prompt, mask = sampling.left_pad([[1, 2, 3]] * 8)
  out, _ = sampling.generate_tokens(
    padded, padded_cfg, prompt, mask, jax.random.key(1), 40, SamplingConfig(temperature=1.5)
  )
  assert out.max() < 85
  unpadded_cfg, unpadded = exchange.unpad_vocab(padded_cfg, padded)
  assert unpadded_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, unpadded, jax.tree.map(np.asarray, params))
