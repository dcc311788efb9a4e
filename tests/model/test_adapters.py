"""Fine-tuning building blocks: LoRA merge, soft prompts in training and decoding, freezing,
adversarial perturbations, classification metrics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decoderjax.inference import sampling
from decoderjax.model import adapters
from decoderjax.model.config import ModelConfig
from decoderjax.model.decoder import Decoder
from decoderjax.model.presets import get_preset


def init(cfg, seed=0):
  return nn.unbox(Decoder(cfg).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])


def perturb_lora_b(params, seed=1):
  """B starts at zero (adapter = identity); random B makes the adapters matter."""

  def one(path, x):
    if "lora_b" in jax.tree_util.keystr(path):
      return 0.05 * jax.random.normal(jax.random.key(seed), x.shape)
    return x

  return jax.tree_util.tree_map_with_path(one, params)


@pytest.mark.parametrize(
  "preset,scan,targets",
  [
    ("tiny-llama", True, "q,k,v,o,up,gate,down"),
    ("tiny-llama", False, "q,v"),
    ("tiny-gpt2", True, "q,k,v,o,up,down"),
  ],
)
def test_merged_lora_equals_adapters(preset, scan, targets):
  cfg = get_preset(preset, vocab_size=61, scan_layers=scan).replace(
    lora_rank=4, lora_alpha=8.0, lora_targets=targets
  )
  params = perturb_lora_b(init(cfg))
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 61)
  adapted, _ = Decoder(cfg).apply({"params": params}, tokens)
  merged_params, merged_cfg = adapters.merge_lora(params, cfg)
  assert merged_cfg.lora_rank == 0
  assert not any("_lora_" in jax.tree_util.keystr(p) for p, _ in _leaves(merged_params))
  merged, _ = Decoder(merged_cfg).apply({"params": merged_params}, tokens)
  base, _ = Decoder(merged_cfg).apply(
    {"params": adapters.split_trainable(params, "lora")[1]}, tokens
  )
  assert float(jnp.max(jnp.abs(adapted - base))) > 1e-3  # the adapters change the outputs
  np.testing.assert_allclose(merged, adapted, atol=2e-5)


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_fresh_adapters_leave_the_model_unchanged_and_split_cleanly():
  base_cfg = get_preset("tiny-llama", vocab_size=61)
  cfg = base_cfg.replace(lora_rank=2)
  params = init(cfg)
  trainable, frozen = adapters.split_trainable(params, "lora")
  names = {jax.tree_util.keystr(p) for p, _ in _leaves(trainable)}
  assert names and all("_lora_" in n for n in names)
  base_params = init(base_cfg)
  assert jax.tree.structure(frozen) == jax.tree.structure(base_params)
  tokens = jnp.arange(10)[None] % 61
  a, _ = Decoder(cfg).apply({"params": params}, tokens)
  b, _ = Decoder(base_cfg).apply({"params": frozen}, tokens)
  np.testing.assert_allclose(a, b, atol=1e-6)  # B = 0 at the start
  assert adapters.combine(trainable, frozen).keys() == params.keys()


@pytest.mark.parametrize(
  "changes,message",
  [
    (dict(lora_rank=2, lora_targets="q,query"), "match no module"),
    (dict(lora_rank=2, lora_targets=""), "match no module"),
    (dict(lora_rank=2, lora_targets="gate", mlp="gelu"), "GELU MLP has no gate"),
    (dict(num_labels=1), "at least 2 labels"),
  ],
)
def test_bad_adapter_settings_are_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**changes)


def test_soft_prompt_decoding_equals_full_forward():
  """Greedy decoding through the KV cache (prompt written at prefill) equals recomputation."""
  cfg = get_preset("tiny-llama", vocab_size=61, max_seq_len=64).replace(prompt_tokens=5)
  params = init(cfg)
  params["soft_prompt"] = jax.random.normal(jax.random.key(3), params["soft_prompt"].shape)
  prompts = [[3, 9, 4, 7], [8, 1]]
  tokens, mask = sampling.left_pad(prompts, 8)
  out, lengths = sampling.generate_tokens(
    params, cfg, tokens, mask, jax.random.key(0), 10, sampling.SamplingConfig(temperature=0), []
  )
  for row, prompt in enumerate(prompts):
    seq = list(prompt)
    for token in out[row][: int(lengths[row])]:
      logits, _ = Decoder(cfg).apply({"params": params}, jnp.asarray([seq]))
      assert int(token) == int(jnp.argmax(logits[0, -1]))
      seq.append(int(token))
  # The soft prompt matters, and every packed document sees it.
  plain, _ = Decoder(cfg.replace(prompt_tokens=0)).apply(
    {"params": {k: v for k, v in params.items() if k != "soft_prompt"}}, jnp.asarray([prompts[0]])
  )
  prompted, _ = Decoder(cfg).apply({"params": params}, jnp.asarray([prompts[0]]))
  assert float(jnp.max(jnp.abs(plain - prompted))) > 1e-3
  packed, _ = Decoder(cfg).apply(
    {"params": params},
    jnp.asarray([prompts[1] + prompts[0]]),
    None,
    jnp.asarray([[1, 1, 2, 2, 2, 2]]),
  )
  np.testing.assert_allclose(packed[0, 2:], prompted[0], atol=1e-5)


def test_frozen_layers_and_embeddings_do_not_move():
  cfg = get_preset("tiny-llama", vocab_size=61, num_layers=3)
  params = init(cfg)
  opt = optax.chain(optax.adamw(1e-2, weight_decay=0.5), adapters.freeze_updates(cfg, 2, True))
  state = opt.init(params)
  tokens = jnp.arange(12)[None] % 61

  def loss(p):
    logits, _ = Decoder(cfg).apply({"params": p}, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  new = params
  for _ in range(3):
    updates, state = opt.update(jax.grad(loss)(new), state, new)
    new = optax.apply_updates(new, updates)
  np.testing.assert_array_equal(new["embedding"], params["embedding"])
  for old, moved in zip(
    jax.tree.leaves(params["layers"]), jax.tree.leaves(new["layers"]), strict=True
  ):
    np.testing.assert_array_equal(moved[:2], old[:2])  # layers 0 and 1 frozen
    assert not np.array_equal(moved[2], old[2])  # layer 2 trains
