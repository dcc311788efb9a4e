"""Weight-only int8 / int4 quantization: error bounds, logits close to float, the binary."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoderjax.checkpoints import modeldir
from decoderjax.data.tokenizer import ByteTokenizer
from decoderjax.model import calibration, int_weights
from decoderjax.model.decoder import Decoder
from decoderjax.model.presets import get_preset


@pytest.mark.parametrize("keep", [(0,), (1,), (1, 2), (0, 2)])
def test_int8_round_trip_error_is_at_most_half_a_step(keep):
  w = np.random.default_rng(0).standard_normal((6, 5, 4)).astype(np.float32)
  w[(slice(None),) * keep[0] + (0,)] = 0.0  # an all-zero channel gets scale 1, q 0
  q, scale = int_weights.quantize_int8(w, keep)
  assert q.dtype == np.int8 and scale.shape == tuple(w.shape[i] for i in keep)
  assert np.abs(q.astype(int)).max() <= 127
  step = np.expand_dims(scale, [i for i in range(w.ndim) if i not in keep])
  error = np.abs(int_weights.dequantize(q, scale, keep) - w)
  assert np.all(error <= step / 2 * (1 + 1e-6))
  reduce = tuple(i for i in range(w.ndim) if i not in keep)
  peaks = np.abs(q.astype(int)).max(axis=reduce)
  assert set(np.unique(peaks)) <= {0, 127}  # every non-zero channel uses the full range


@pytest.mark.parametrize("keep", [(0, 2), (0, 1), (1, 2)])
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(keep):
  w = np.random.default_rng(0).standard_normal((16, 32, 16)).astype(np.float32)
  a, b = int_weights.input_dims(w.ndim, keep)
  group = 16
  packed, scale = int_weights.quantize_int4(w, keep, group)
  want_packed, want_scale = int_weights.int4_shapes(w.shape, keep, group)
  assert packed.dtype == np.int8 and packed.shape == want_packed and scale.shape == want_scale
  back = np.asarray(int_weights.dequantize_int4(packed, scale, w.shape, keep))
  # Independent reference: the same groups, unpacked from the bytes with Python ints.
  inputs = int(np.prod(w.shape[a:b]))
  grouped = w.reshape(*w.shape[:a], inputs // group, group, *w.shape[b:])
  nibbles = packed.view(np.uint8).astype(int)
  values = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=a + 1)
  values = np.where(values > 7, values - 16, values)  # two's complement nibbles
  assert values.min() >= -8 and values.max() <= 7
  step = np.abs(np.expand_dims(scale, a + 1))
  np.testing.assert_allclose(values * np.expand_dims(scale, a + 1), back.reshape(grouped.shape))
  assert np.all(np.abs(back.reshape(grouped.shape) - grouped) <= step / 2 * (1 + 1e-6))
  full = (np.min(values, axis=a + 1) == -8) | (np.max(values, axis=a + 1) == 7)
  assert np.all(full)  # every group spans the whole range on one side


def test_gptq_is_round_to_nearest_without_correlations_and_better_with_them():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((64, 12)).astype(np.float32)  # [I, O]
  rtn_q, rtn_scale = int_weights.quantize_int4(w, (1,), 16)
  rtn = np.asarray(int_weights.dequantize_int4(rtn_q, rtn_scale, w.shape, (1,)))
  # Uncorrelated inputs: no error is worth spreading, GPTQ rounds to nearest.
  q, scale = int_weights.gptq_int4(w, np.eye(64) * 3.0, 16)
  np.testing.assert_allclose((q.reshape(4, 16, 12) * scale[:, None]).reshape(64, 12), rtn)
  # Correlated inputs X: the output error |X (W' - W)|^2 drops well below rounding's.
  x = rng.standard_normal((256, 8)) @ rng.standard_normal((8, 64)) + 0.1 * rng.standard_normal(
    (256, 64)
  )
  q, scale = int_weights.gptq_int4(w, x.T @ x, 16)
  gptq = (q.reshape(4, 16, 12) * scale[:, None]).reshape(64, 12)
  assert q.min() >= -8 and q.max() <= 7
  error = lambda v: float(np.sum((x @ (v - w)) ** 2))
  assert error(gptq) < 0.5 * error(rtn)


def test_calibration_grams_match_a_direct_computation():
  cfg = get_preset("tiny-llama", scan_layers=False)
  params = _init(cfg)
  model = modeldir.ModelDir(cfg, params, ByteTokenizer(), {})
  rows = calibration.text_rows(model, "to be or not to be, " * 10, 64, 16)
  assert rows.shape == (4, 16)
  grams = calibration.input_grams(model, rows, batch=3)
  # Layer 0 sees the embeddings through its RMS norm (independent numpy reference).
  x = np.asarray(params["embedding"])[rows]
  h = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.norm_eps)
  h = h * np.asarray(params["layers_0"]["attn_norm"]["scale"])
  flat = h.reshape(-1, cfg.embed_dim)
  np.testing.assert_allclose(grams["layers_0"]["attn"]["q"], flat.T @ flat, rtol=1e-4, atol=1e-4)
  first = h[:, 0]  # k and v: each row's first token counts as T / 2 = 8 tokens
  want = flat.T @ flat + 7 * first.T @ first
  np.testing.assert_allclose(grams["layers_0"]["attn"]["v"], want, rtol=1e-4, atol=1e-4)
  assert grams["layers_1"]["mlp"]["down"].shape == (cfg.mlp_dim, cfg.mlp_dim)
  assert grams["layers_1"]["attn"]["o"].shape == (cfg.embed_dim, cfg.embed_dim)
  with pytest.raises(ValueError, match="needs at least seq_len=16"):
    calibration.text_rows(model, "short", 64, 16)


def _init(cfg):
  return nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


@pytest.mark.parametrize(
  "name,scan,mode,tolerance,agree",
  [
    # int8 per channel: each weight within 1/254 of its channel's peak; logits within 2% of
    # their largest magnitude (0.4-0.6% measured). int4 in groups of 32: within 1/16 of the
    # group's peak; 15% (5.6-9% measured).
    ("tiny-llama", True, "int8", 0.02, 0.9),
    ("tiny-gpt2", False, "int8", 0.02, 0.9),
    ("tiny-llama", True, "int4", 0.15, 0.8),
    ("tiny-gpt2", False, "int4", 0.15, 0.8),
  ],
)
def test_quantized_logits_are_close_to_float(name, scan, mode, tolerance, agree):
  cfg = get_preset(name, scan_layers=scan)
  params = _init(cfg)
  qparams = int_weights.quantize_params(jax.tree.map(np.asarray, params), scan, mode, 32)
  qcfg = cfg.replace(quant=mode, quant_group=32)
  modeldir.check_shapes(qparams, modeldir.abstract_params(qcfg), "quantized")
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
  want, _ = Decoder(cfg).apply({"params": params}, tokens)
  got, _ = Decoder(qcfg).apply({"params": qparams}, tokens)
  assert float(jnp.abs(got - want).max()) <= tolerance * float(jnp.abs(want).max())
  assert float(jnp.mean(got.argmax(-1) == want.argmax(-1))) >= agree


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_quantize_binary_and_quantized_model_dirs(tmp_path):
  cfg = get_preset("tiny-llama", vocab_size=260, max_seq_len=64)
  float_dir, int8_dir = str(tmp_path / "f"), str(tmp_path / "q")
  modeldir.save_model_dir(float_dir, cfg, _init(cfg), ByteTokenizer(), {"temperature": 0})
  out = _run("decoderjax.quantize", f"--checkpoint={float_dir}", f"--output={int8_dir}")
  assert out.returncode == 0, out.stderr[-2000:]
  model = modeldir.load_model_dir(int8_dir)
  assert model.config.quant == "int8"
  assert model.params["layers"]["mlp"]["up"].dtype == jnp.int8
  int8_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(modeldir.load_model_dir(float_dir).params))
  assert int8_bytes < 0.3 * float_bytes

  text = tmp_path / "t.txt"
  text.write_text("to be or not to be, that is the question. " * 8)
  losses = {}
  for name, directory in (("float", float_dir), ("int8", int8_dir)):
    result = tmp_path / f"{name}.json"
    out = _run("decoderjax.evaluate", f"--checkpoint={directory}", f"--text_file={text}",
               f"--output_json={result}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    losses[name] = json.loads(result.read_text())["loss"]
  assert losses["int8"] == pytest.approx(losses["float"], rel=0.01)
  generated = tmp_path / "g.json"
  out = _run("decoderjax.generate", f"--checkpoint={int8_dir}", "--prompt=to be",
             "--max_new_tokens=8", "--ignore_eos", f"--output_json={generated}")  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert len(json.loads(generated.read_text())[0]["tokens"]) == 8

  int4_dir = str(tmp_path / "q4")
  out = _run("decoderjax.quantize", f"--checkpoint={float_dir}", f"--output={int4_dir}",
             "--mode=int4", "--group_size=32", f"--calibration_text={text}",
             "--seq_len=32")  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert "calibrating on" in out.stdout
  int4 = modeldir.load_model_dir(int4_dir)
  assert (int4.config.quant, int4.config.quant_group) == ("int4", 32)
  up4, up8 = int4.params["layers"]["mlp"]["up"], model.params["layers"]["mlp"]["up"]
  assert up4.dtype == jnp.int8 and up4.nbytes * 2 == up8.nbytes  # two weights a byte
  assert int4.params["embedding"].dtype == jnp.int8  # tables stay int8
  assert sum(x.nbytes for x in jax.tree.leaves(int4.params)) < 0.7 * int8_bytes
  result = tmp_path / "int4.json"
  out = _run("decoderjax.evaluate", f"--checkpoint={int4_dir}", f"--text_file={text}",
             f"--output_json={result}")  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(result.read_text())["loss"] == pytest.approx(losses["float"], rel=0.05)
  out = _run("decoderjax.generate", f"--checkpoint={int4_dir}", "--prompt=to be",
             "--max_new_tokens=8", "--ignore_eos", "--kv_cache=int8")  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  bad = _run("decoderjax.quantize", f"--checkpoint={float_dir}", f"--output={tmp_path / 'x'}",
             "--mode=int4", "--group_size=48")  # fmt: skip
  assert bad.returncode == 1 and "group size 48 must be even and divide the 64 inputs" in bad.stderr

  again = _run("decoderjax.quantize", f"--checkpoint={int8_dir}", f"--output={tmp_path / 'x'}")
  assert again.returncode == 1 and "already quantized" in again.stderr
  bad = _run("decoderjax.quantize", f"--checkpoint={float_dir}", f"--output={tmp_path / 'x'}",
             "--mode=int3")  # fmt: skip
  assert bad.returncode == 1 and "--mode must be one of" in bad.stderr
  bad = _run("decoderjax.quantize", f"--checkpoint={float_dir}", f"--output={tmp_path / 'x'}",
             "--group_size=32")  # fmt: skip
  assert bad.returncode == 1 and "--group_size applies to --mode=int4" in bad.stderr
  bad = _run("decoderjax.convert", "--to=hf", f"--input={float_dir}", f"--output={tmp_path / 'h'}",
             "--dtype=bfloat16")  # fmt: skip
  assert bad.returncode == 1 and "--dtype applies to --from=hf and --from=gguf" in bad.stderr
  hf = _run("decoderjax.convert", "--to=hf", f"--input={int8_dir}", f"--output={tmp_path / 'h'}")
  assert hf.returncode == 1 and "int8 model" in hf.stderr
  assert not (tmp_path / "x").exists() and not (tmp_path / "h").exists()
