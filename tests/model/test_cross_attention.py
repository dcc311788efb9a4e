"""The cross-attention decoder (ModelConfig.cross_attention): its layer against
torch.nn.TransformerDecoderLayer, its encoder, cache and layouts, and the seq2seq task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoderjax.data import examples
from decoderjax.model.config import ModelConfig
from decoderjax.model.decoder import Block, Decoder, init_params

torch = pytest.importorskip("torch")

D, N, F = 32, 4, 64


def torch_layer_params(layer) -> dict:
  """Our Block's parameters from a TransformerDecoderLayer's (torch Linear is [out, in])."""
  t = lambda x: x.detach().numpy().astype(np.float32)
  h = D // N

  def attention(mha):
    w, b = t(mha.in_proj_weight), t(mha.in_proj_bias)
    out = {}
    for i, name in enumerate("qkv"):
      out[name] = w[i * D : (i + 1) * D].T.reshape(D, N, h)
      out[f"{name}_bias"] = b[i * D : (i + 1) * D].reshape(N, h)
    out["o"] = t(mha.out_proj.weight).T.reshape(N, h, D)
    out["o_bias"] = t(mha.out_proj.bias)
    return out

  norm = lambda n: {"scale": t(n.weight), "bias": t(n.bias)}
  return {
    "attn": attention(layer.self_attn),
    "cross": attention(layer.multihead_attn),
    "mlp": {
      "up": t(layer.linear1.weight).T,
      "up_bias": t(layer.linear1.bias),
      "down": t(layer.linear2.weight).T,
      "down_bias": t(layer.linear2.bias),
    },
    "attn_norm": norm(layer.norm1),
    "cross_norm": norm(layer.norm2),
    "mlp_norm": norm(layer.norm3),
  }


def layer_config(**changes) -> ModelConfig:
  return ModelConfig(
    vocab_size=64, embed_dim=D, num_heads=N, mlp_dim=F, mlp="relu", norm="layernorm",
    use_bias=True, position="none", cross_attention=True, **changes,
  )  # fmt: skip


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_equals_torch_transformer_decoder_layer(norm_first):
  """Causal self-attention, cross-attention with padded memory slots, ReLU feed-forward, post-
  (norm_first=False) or pre-norm, in eval mode with the same weights: within 1e-5."""
  torch.manual_seed(0)
  layer = torch.nn.TransformerDecoderLayer(
    D, N, F, dropout=0.1, batch_first=True, norm_first=norm_first
  ).eval()
  with torch.no_grad():  # norms away from 1 and 0, so a swapped one shows
    for norm in (layer.norm1, layer.norm2, layer.norm3):
      norm.weight.add_(0.3 * torch.randn_like(norm.weight))
      norm.bias.add_(0.3 * torch.randn_like(norm.bias))
  rng = np.random.default_rng(0)
  tgt = rng.normal(size=(2, 7, D)).astype(np.float32)
  memory = rng.normal(size=(2, 5, D)).astype(np.float32)
  memory_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  with torch.no_grad():
    expected = layer(
      torch.from_numpy(tgt),
      torch.from_numpy(memory),
      tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(7),
      memory_key_padding_mask=torch.from_numpy(~memory_mask),
      tgt_is_causal=True,
    ).numpy()
  cfg = layer_config(norm_placement="pre" if norm_first else "post_ln")
  causal = np.broadcast_to(np.tril(np.ones((7, 7), bool)), (2, 7, 7))
  got, _ = Block(cfg).apply(
    {"params": torch_layer_params(layer)},
    jnp.asarray(tgt), jnp.zeros((2, 7), jnp.int32), jnp.asarray(causal), None, None, None,
    (jnp.asarray(memory), jnp.asarray(memory_mask)),
  )  # fmt: skip
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


def model_config(**changes) -> ModelConfig:
  """The seed article's decoder: sinusoidal positions, embeddings x sqrt(D), post-LN."""
  return ModelConfig(
    vocab_size=64, max_seq_len=32, num_layers=2, embed_dim=D, num_heads=N, mlp_dim=F,
    position="sinusoidal", embed_scale=True, norm="layernorm", norm_placement="post_ln",
    mlp="relu", use_bias=True, cross_attention=True, encoder_layers=1, **changes,
  )  # fmt: skip


def test_decoder_reads_the_memory_and_ignores_its_padding():
  """The logits depend on the source; padded source slots change nothing; cached decoding of
  the target, token by token, equals the full forward pass; scanned equals unrolled."""
  from decoderjax.inference import sampling
  from decoderjax.model import layout
  from decoderjax.model.kv_cache import init_cache

  cfg = model_config()
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                        init_params(cfg, jax.random.key(0)))  # fmt: skip
  params = jax.tree.map(lambda x: x * 3.0, params)  # sharper than the init's 0.02
  model = Decoder(cfg)
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.integers(0, 64, (2, 9)))
  source = jnp.asarray(rng.integers(0, 64, (2, 6)))
  logits, _ = model.apply({"params": params}, target, source_BM=source)
  other, _ = model.apply({"params": params}, target, source_BM=source.at[:, 0].add(1))
  assert np.abs(np.asarray(logits - other)).max() > 1e-3
  padded = jnp.concatenate([source, jnp.zeros((2, 3), source.dtype)], axis=1)
  mask = jnp.arange(9)[None, :] < 6
  same, _ = model.apply({"params": params}, target, source_BM=padded, memory_mask_BM=mask)
  np.testing.assert_allclose(np.asarray(same), np.asarray(logits), atol=1e-5)
  # Cached, scanned and per layer (switched on CPU): the first call encodes the source and
  # keeps each layer's keys and values of the memory; the rest read them.
  per_layer, per_layer_cfg = layout.for_generation(jax.tree.map(jnp.copy, params), cfg)
  for p, c in ((params, cfg), (per_layer, per_layer_cfg)):
    cache = init_cache(c, 2, 9)
    ones = jnp.ones((2, 1), jnp.int32)
    step, cache = sampling.cached_forward(
      p, c, target[:, :4], None, jnp.ones((2, 4), jnp.int32), cache, True, source_BM=source
    )
    assert cache.cross_k.shape == (c.num_layers, 2, 6, c.kv_heads, c.head_size)
    outs = [step]
    for i in range(4, 9):
      step, cache = sampling.cached_forward(p, c, target[:, i : i + 1], None, ones, cache)
      outs.append(step)
    np.testing.assert_allclose(
      np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(logits), atol=1e-4, rtol=1e-4
    )
  unrolled, _ = Decoder(per_layer_cfg).apply({"params": per_layer}, target, source_BM=source)
  np.testing.assert_allclose(np.asarray(unrolled), np.asarray(logits), atol=1e-4, rtol=1e-4)


def test_cross_attention_errors_are_clear():
  cfg = model_config()
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="attends to a memory"):
    Decoder(cfg).apply({"params": params}, tokens)
  plain = ModelConfig(vocab_size=64, embed_dim=D, num_heads=N)
  with pytest.raises(ValueError, match="without cross_attention"):
    Decoder(plain).apply(
      {"params": init_params(plain, jax.random.key(0))}, tokens, source_BM=tokens
    )
  with pytest.raises(ValueError, match="set cross_attention=True"):
    ModelConfig(encoder_layers=2)


def test_seq2seq_rows_and_the_builtin_task():
  """A row each: the target from the start token to EOS, every pair weighted, the source right-
  padded with its mask; the built-in task reverses each line's words."""
  from decoderjax.data.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  pairs = [{"source": "ab c", "target": "c ab"}, {"source": "x", "target": "y"}]
  records = [("f", n, r) for n, r in enumerate(pairs, 1)]
  rows, truncated = examples.seq2seq_rows(records, tok, 8)
  assert truncated == 0
  np.testing.assert_array_equal(rows["inputs"][0, :5], [tok.bos_id, *b"c ab"])
  np.testing.assert_array_equal(rows["targets"][0, :5], [*b"c ab", tok.eos_id])
  np.testing.assert_array_equal(rows["weights"][1], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows["source"][0], [*b"ab c", 0, 0, 0, 0])
  np.testing.assert_array_equal(rows["source_mask"][1], [1, 0, 0, 0, 0, 0, 0, 0])
  built = examples.reversal_records(
    ["To be, or not to be\nAy\n  To be,  or not to be  \nGo on now"]
  )
  assert [r["target"] for _, _, r in built] == ["be to not or be, To", "now on Go"]


def test_seq2seq_trains_generates_and_evaluates_from_the_cli(tmp_path):
  """configs/seq2seq_shakespeare.py (shrunk) trains on {source, target} records, the workdir
  generates from --source, and evaluate scores the records' targets and greedy generations."""
  import json
  import subprocess
  import sys

  lines = ["to be or not to be", "the rest is silence", "all the world's a stage",
           "now is the winter of our discontent", "brevity is the soul of wit"]  # fmt: skip
  records = [r for _, _, r in examples.reversal_records(lines)]
  for name in ("train", "val"):
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", *args], capture_output=True, text=True, timeout=600
  )
  work = tmp_path / "work"
  train = run(
    "decoderjax.train", "--config=configs/seq2seq_shakespeare.py", f"--workdir={work}",
    "--config.data.source=jsonl", f"--config.data.path={tmp_path / 'train.jsonl'}",
    f"--config.data.eval_path={tmp_path / 'val.jsonl'}", "--config.model.embed_dim=32",
    "--config.model.mlp_dim=64", "--config.model.encoder_layers=1", "--config.train.steps=12",
    "--config.train.batch_size=4", "--config.eval.every_steps=6", "--config.train.log_every=6",
    "--config.train.sample_tokens=8", "--config.optimizer.warmup_steps=2",
  )  # fmt: skip
  assert train.returncode == 0, train.stderr[-3000:]
  metrics = [json.loads(line) for line in open(work / "metrics.jsonl")]
  losses = [m["val_loss"] for m in metrics if "val_loss" in m]
  assert len(losses) == 2 and losses[-1] < losses[0]
  assert "to be or not to be -> " in train.stdout  # the sample reads the first source
  out = tmp_path / "g.json"
  generate = run(
    "decoderjax.generate", f"--checkpoint={work}", "--temperature=0", "--max_new_tokens=6",
    "--source=to be or not", "--source=the rest", f"--output_json={out}",
  )  # fmt: skip
  assert generate.returncode == 0, generate.stderr[-3000:]
  got = json.loads(out.read_text())
  assert [g["source"] for g in got] == ["to be or not", "the rest"]
  assert all(len(g["tokens"]) <= 6 for g in got)
  evaluate = run(
    "decoderjax.evaluate", f"--checkpoint={work}", f"--data_path={tmp_path / 'val.jsonl'}",
    "--generate", "--batch_size=2",
  )  # fmt: skip
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  result = json.loads(evaluate.stdout.strip().splitlines()[-1])
  assert result["examples"] == 5 and np.isfinite(result["loss"]) and "exact_match" in result
  assert abs(result["loss"] - losses[-1]) < 1e-3  # the run's own validation loss
  refused = run("decoderjax.generate", f"--checkpoint={work}", "--prompt=to be")
  assert refused.returncode == 1 and "give --source=TEXT" in refused.stderr
