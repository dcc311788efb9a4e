"""The model directory: written, read back bit-identically, and served by the generate binary."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.checkpoints import modeldir
from decoderjax.data.tokenizer import ByteTokenizer
from decoderjax.model.decoder import Decoder
from decoderjax.model.presets import get_preset


def test_model_directory_round_trip_and_generate_cli(tmp_path):
  cfg = get_preset("tiny-llama", vocab_size=258, max_seq_len=64)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  modeldir.save_model_dir(str(tmp_path / "m"), cfg, params, ByteTokenizer(), {"temperature": 0})
  loaded = modeldir.load_model_dir(str(tmp_path / "m"))
  assert loaded.config == cfg and loaded.generation["temperature"] == 0
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)

  out = tmp_path / "out.json"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "decoderjax.generate",
      f"--checkpoint={tmp_path / 'm'}",
      "--prompt=Hello",
      "--max_new_tokens=8",
      f"--output_json={out}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  [record] = json.loads(out.read_text())
  # Greedy decoding must equal the argmax of a full forward pass at every step.
  seq = list(b"Hello")
  for token in record["tokens"]:
    logits, _ = Decoder(cfg).apply({"params": params}, jnp.asarray([seq]))
    assert token == int(jnp.argmax(logits[0, -1]))
    seq.append(token)
  assert len(record["tokens"]) == 8

  # Raw token ids give the same continuation; --ignore_eos always runs to max_new_tokens.
  raw = subprocess.run(
    [sys.executable, "-m", "decoderjax.generate", f"--checkpoint={tmp_path / 'm'}",
     "--prompt_tokens=72,101,108,108,111", "--max_new_tokens=8", "--ignore_eos",
     f"--output_json={out}"],
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert raw.returncode == 0, raw.stderr
  assert json.loads(out.read_text())[0]["tokens"][:8] == record["tokens"]
  assert "prefill 5 tokens" in raw.stdout and "compile" in raw.stdout
  bad = subprocess.run(
    [sys.executable, "-m", "decoderjax.generate", f"--checkpoint={tmp_path / 'm'}",
     "--prompt=x", "--chat"], capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert bad.returncode == 1 and "has no chat template" in bad.stderr


def test_a_loaded_directory_carries_its_config_json(tmp_path):
  cfg = get_preset("tiny-gpt2", vocab_size=258, max_seq_len=32)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  directory = str(tmp_path / "m")
  modeldir.write_metadata(directory, cfg, ByteTokenizer(), None, {"seq_len": 16, "labels": None})
  modeldir.save_params(directory, params)
  loaded = modeldir.load_model_dir(directory)
  assert loaded.metadata == modeldir.read_metadata(directory)
  assert loaded.metadata["seq_len"] == 16 and "labels" not in loaded.metadata
  assert loaded.metadata["model"] == cfg
