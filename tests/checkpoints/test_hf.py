"""Hugging Face checkpoints convert to the same logits as `transformers` computes (float32)."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from decoderjax.checkpoints import exchange, modeldir
from decoderjax.model.decoder import Decoder  # noqa: E402

V = 256
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=64)  # fmt: skip
GPT2 = dict(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0,
            embd_pdrop=0, attn_pdrop=0)  # fmt: skip
LONGROPE = ([1.0 + 0.1 * i for i in range(8)], [1.5 + 0.7 * i for i in range(8)])  # per frequency
MODELS = {
  "gpt2": lambda: transformers.GPT2Config(**GPT2),
  # ... with ReLU and unscaled attention logits, both read from config.json
  "gpt2_relu": lambda: transformers.GPT2Config(
    **GPT2, activation_function="relu", scale_attn_weights=False
  ),
  "llama3": lambda: transformers.LlamaConfig(
    **COMMON,
    num_key_value_heads=2,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16,
    },
  ),  # fmt: skip
  "mistral": lambda: transformers.MistralConfig(
    **COMMON, num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False
  ),
  "gemma": lambda: transformers.GemmaConfig(
    **COMMON, num_key_value_heads=1, head_dim=32, hidden_activation="gelu_pytorch_tanh"
  ),
  "qwen2": lambda: transformers.Qwen2Config(
    **COMMON, num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-6
  ),
  "qwen3": lambda: transformers.Qwen3Config(
    **COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6
  ),
  # Layer 0 slides over 5 keys, layer 1 sees every key; logits scaled by 24 ** -0.5, soft-capped
  "gemma2": lambda: transformers.Gemma2Config(
    **COMMON,
    num_key_value_heads=2,
    head_dim=32,
    sliding_window=5,
    query_pre_attn_scalar=24,
    attn_logit_softcapping=2.0,
    final_logit_softcapping=3.0,
  ),  # fmt: skip
  # ... with q/k norms, RoPE bases of 1e6 (global) and 10 (sliding layers), and the global
  # layers' positions scaled linearly (Gemma 3 4B and larger: factor 8)
  "gemma3": lambda: transformers.Gemma3TextConfig(
    **COMMON,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=5,
    layer_types=["sliding_attention", "full_attention"],
    rope_theta=1e6,
    rope_local_base_freq=10.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    query_pre_attn_scalar=24,
  ),  # fmt: skip
  "olmo2": lambda: transformers.Olmo2Config(
    **COMMON, num_key_value_heads=2, eos_token_id=1, pad_token_id=1
  ),
  # ... with LongRoPE (Phi-3 128k): short factors up to position 16, long ones past it
  "phi3": lambda: transformers.Phi3Config(
    **COMMON,
    num_key_value_heads=2,
    sliding_window=5,
    eos_token_id=1,
    pad_token_id=1,
    bos_token_id=0,
    original_max_position_embeddings=16,
    rope_scaling={"rope_type": "longrope", "short_factor": LONGROPE[0], "long_factor": LONGROPE[1]},
  ),  # fmt: skip
}
NEW_FAMILIES = ("gemma2", "gemma3", "olmo2", "phi3")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>"])
  tok.train_from_iterator(["to be or not to be, that is the question"] * 50, trainer)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return path.read_text()


def save_hf(name, directory, tokenizer_json, scale=1.0, **config_changes):
  """A random model of MODELS[name] (or of the config `name`) saved as a checkpoint; `scale`
  multiplies every weight (3.0: sharper logits than the 0.02 init, no near-ties for greedy)."""
  torch.manual_seed(0)
  config = MODELS[name]() if isinstance(name, str) else name
  for key, value in config_changes.items():
    setattr(config, key, value)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  model.eval()
  with torch.no_grad():  # random norms and biases, so a swapped tensor cannot hide
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
      p.mul_(scale)
  model.save_pretrained(directory, safe_serialization=True)
  (directory / "tokenizer.json").write_text(tokenizer_json)
  return model


def converted(name, tmp_path, tokenizer_json, **kw):
  """(save_hf's model, our conversion of it, loaded)."""
  model = save_hf(name, tmp_path / "hf", tokenizer_json, **kw)
  exchange.convert_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  return model, modeldir.load_model_dir(str(tmp_path / "ours"))


def assert_same_logits(torch_model, ours, tokens, atol=1e-4):
  """Our converted model directory and a PyTorch model give the same logits on `tokens`."""
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(tokens)).logits.numpy()
  got, _ = Decoder(ours.config).apply({"params": ours.params}, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), expected, atol=atol, rtol=atol)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_logits_match_transformers(name, tmp_path, tokenizer_json):
  model = save_hf(name, tmp_path / "hf", tokenizer_json)
  exchange.convert_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  assert_same_logits(model, ours, np.random.default_rng(0).integers(0, V, (2, 24)))
  assert ours.tokenizer.kind == "hf" and ours.tokenizer.encode("to be") == model_tok(tokenizer_json)


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_scanned_and_unrolled_generate_as_transformers(name, tmp_path, tokenizer_json):
  """Logits of the converted model, its layers scanned and unrolled, and 32 greedy tokens from a
  prompt longer than the sliding window (5), generated by the generate binary's Generator with
  the cache laid out as on CPU (per-layer weights looped by lax.switch), equal transformers'."""
  from decoderjax.inference import offline as generator_lib
  from decoderjax.inference import sampling
  from decoderjax.model.layout import unstack_layers

  model, ours = converted(name, tmp_path, tokenizer_json, scale=3.0)
  assert ours.config.scan_layers
  tokens = np.random.default_rng(0).integers(0, V, (2, 24))
  assert_same_logits(model, ours, tokens)
  unrolled = ours.config.replace(scan_layers=False)
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens)).logits.numpy()
  params = unstack_layers(ours.params, unrolled.num_layers)
  got, _ = Decoder(unrolled).apply({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)

  prompt = [[11, 200, 7, 42, 3, 99, 150, 8, 17, 60]]
  with torch.no_grad():
    out = model.generate(
      torch.tensor(prompt),
      attention_mask=torch.ones(1, 10, dtype=int),
      max_new_tokens=32,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    )
  expected = out[:, 10:].numpy()  # fmt: skip
  # The Generator, as the generate binary runs it (Phi-3's LongRoPE re-prefills at 17 tokens)
  ready = generator_lib.for_generation(ours)
  greedy = sampling.SamplingConfig(temperature=0)
  results, _ = generator_lib.Generator(ready, generator_lib.GenerateConfig(32, greedy))(prompt)
  np.testing.assert_array_equal(results[0]["tokens"], expected[0])


# Gemma 3's layer_types as written, 4 layers: the default pattern (every 6th global) leaves all
# four sliding (at rope_local_base_freq, not rope_theta), all global, and an irregular mix.
GEMMA3_LAYERS = {
  "all_sliding": ({}, dict(sliding_window=5, global_every=0, global_layers=())),
  "all_global": ({"layer_types": ["full_attention"] * 4}, dict(sliding_window=None)),
  "irregular": (
    {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]},
    dict(sliding_window=5, global_every=0, global_layers=(0, 3)),
  ),
}


@pytest.mark.parametrize("pattern", sorted(GEMMA3_LAYERS))
def test_gemma3_layer_types_convert_as_written(pattern, tmp_path, tokenizer_json):
  """Logits past the window, 16 greedy tokens through the Generator, and the round trip equal
  transformers' for each layer pattern."""
  from decoderjax.inference import offline as generator_lib
  from decoderjax.inference import sampling

  layer_types, fields = GEMMA3_LAYERS[pattern]
  config = transformers.Gemma3TextConfig(
    **{**COMMON, "num_hidden_layers": 4}, num_key_value_heads=1, head_dim=32, sliding_window=5,
    query_pre_attn_scalar=24, **layer_types,
  )  # fmt: skip
  model, ours = converted(config, tmp_path, tokenizer_json, scale=3.0)
  assert {f: getattr(ours.config, f) for f in fields} == fields
  assert ours.config.local_rope_theta == (None if pattern == "all_global" else 10_000.0)
  assert_same_logits(model, ours, np.random.default_rng(0).integers(0, V, (2, 24)))
  prompt = [[11, 200, 7, 42, 3, 99, 150, 8, 17, 60]]
  with torch.no_grad():
    expected = model.generate(
      torch.tensor(prompt), attention_mask=torch.ones(1, 10, dtype=int), max_new_tokens=16,
      do_sample=False, eos_token_id=None, pad_token_id=0,
    )[0, 10:].numpy()  # fmt: skip
  ready = generator_lib.for_generation(ours)
  greedy = sampling.SamplingConfig(temperature=0)
  results, _ = generator_lib.Generator(ready, generator_lib.GenerateConfig(16, greedy))(prompt)
  np.testing.assert_array_equal(results[0]["tokens"], expected)
  exchange.export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  assert again.config.layer_types == model.config.layer_types
  assert_same_logits(again, ours, np.random.default_rng(1).integers(0, V, (2, 24)))
  exchange.convert_hf(str(tmp_path / "back"), str(tmp_path / "ours2"))
  assert modeldir.read_config(str(tmp_path / "ours2")) == modeldir.read_config(
    str(tmp_path / "ours")
  )


def model_tok(tokenizer_json):
  from tokenizers import Tokenizer

  return Tokenizer.from_str(tokenizer_json).encode("to be").ids


def test_convert_cli_and_bad_input(tmp_path, tokenizer_json):
  save_hf("llama3", tmp_path / "hf", tokenizer_json)
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "decoderjax.convert", *a], capture_output=True, text=True, timeout=300
  )
  ok = run("--from=hf", f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'm'}",
           "--dtype=bfloat16")  # fmt: skip
  assert ok.returncode == 0, ok.stderr
  assert modeldir.read_config(str(tmp_path / "m")).param_dtype == "bfloat16"
  again = run("--from=hf", f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'm'}")
  assert again.returncode == 1 and "already exists" in again.stderr

  import shutil

  shutil.copytree(tmp_path / "hf", tmp_path / "bare")  # as model.save_pretrained alone writes it
  os.remove(tmp_path / "bare" / "tokenizer.json")
  bare = run("--from=hf", f"--input={tmp_path / 'bare'}", f"--output={tmp_path / 'b'}")
  assert bare.returncode == 1 and "--tokenizer=DIR" in bare.stderr, bare.stderr
  given = run("--from=hf", f"--input={tmp_path / 'bare'}", f"--output={tmp_path / 'b'}",
              f"--tokenizer={tmp_path / 'hf'}", "--dtype=bfloat16")  # fmt: skip
  assert given.returncode == 0, given.stderr
  for name in ("config.json", "generation.json", "tokenizer/tokenizer.json"):
    assert (tmp_path / "b" / name).read_text() == (tmp_path / "m" / name).read_text()
  full, from_bare = (modeldir.load_model_dir(str(tmp_path / d)) for d in ("m", "b"))
  jax.tree.map(np.testing.assert_array_equal, full.params, from_bare.params)

  (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
  bad = run("--from=hf", f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'n'}")
  assert bad.returncode == 1 and "model.safetensors" in bad.stderr
  assert "Traceback" not in bad.stderr
  assert not os.path.exists(tmp_path / "n")  # nothing partial left behind
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".staging-")]

  (tmp_path / "odd").mkdir()
  (tmp_path / "odd" / "config.json").write_text('{"model_type": "bloom"}')
  unknown = run("--from=hf", f"--input={tmp_path / 'odd'}", f"--output={tmp_path / 'o'}")
  assert unknown.returncode == 1 and "unknown architecture model_type='bloom'" in unknown.stderr


@pytest.mark.parametrize(
  "name,changes,message",
  [
    ("phi3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "RoPE type 'yarn' is not supported ('default', 'llama3', 'linear', 'longrope')"),
    ("gemma3", {"layer_types": ["full_attention", "chunked_attention"]},
     "layer_types must give one of full_attention, sliding_attention for each of the 2 layers, "
     "got 2 entries with ['chunked_attention']"),
    ("llama3", {"hidden_act": "relu"}, "hidden_act 'relu' is not supported (silu only)"),
    ("gpt2", {"activation_function": "gelu"}, "GPT-2 activation_function 'gelu' is not supported"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
  ],
)  # fmt: skip
def test_unsupported_hf_configs_are_named(name, changes, message, tmp_path, tokenizer_json):
  """A config.json whose options we do not compute: one line naming it, nothing written."""
  import json

  save_hf(name, tmp_path / "hf", tokenizer_json)
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **changes}))
  with pytest.raises(ValueError, match=re.escape(message)):
    exchange.convert_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  assert not os.path.exists(tmp_path / "ours")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_back_to_transformers(name, tmp_path, tokenizer_json):
  model = save_hf(name, tmp_path / "hf", tokenizer_json)
  exchange.convert_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  exchange.export_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  again = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / "back", attn_implementation="eager"
  )
  tokens = torch.from_numpy(np.random.default_rng(1).integers(0, V, (2, 20)))
  with torch.no_grad():
    np.testing.assert_allclose(again(tokens).logits.numpy(), model(tokens).logits.numpy(),
                               atol=1e-5)  # fmt: skip
  exchange.convert_hf(str(tmp_path / "back"), str(tmp_path / "ours2"))
  assert modeldir.read_config(str(tmp_path / "ours2")) == modeldir.read_config(
    str(tmp_path / "ours")
  )


def test_multimodal_gemma3_converts_its_language_model(tmp_path, tokenizer_json):
  """A Gemma3ForConditionalGeneration checkpoint (config `gemma3` with its text_config, tensors
  under language_model.*, a vision tower beside them): the text model's logits."""
  text = MODELS["gemma3"]().to_dict()
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=28, patch_size=14)  # fmt: skip
  config = transformers.Gemma3Config(
    text_config=text, vision_config=vision, image_token_index=V - 1, boi_token_index=V - 3,
    eoi_token_index=V - 2, mm_tokens_per_image=4,
  )  # fmt: skip
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p)) if p.ndim == 1 else p.mul_(3.0)
  model.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text(tokenizer_json)
  exchange.convert_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  assert ours.config.rope_scaling.kind == "linear" and ours.config.rope_scaling.factor == 8.0
  assert_same_logits(model, ours, np.random.default_rng(0).integers(0, V - 3, (2, 24)))


class _Exploit:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_pytorch_bin_checkpoints_load_weights_only(tmp_path, tokenizer_json):
  model = save_hf("llama3", tmp_path / "hf", tokenizer_json)
  (tmp_path / "hf" / "model.safetensors").unlink()
  torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
  exchange.convert_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  assert_same_logits(model, ours, np.random.default_rng(0).integers(0, V, (1, 16)))

  torch.save({"model.embed_tokens.weight": _Exploit()}, tmp_path / "hf" / "pytorch_model.bin")
  with pytest.raises(ValueError, match="not a weights-only PyTorch checkpoint"):
    exchange.convert_hf(str(tmp_path / "hf"), str(tmp_path / "bad"))


def test_lora_finetuned_model_exports_to_transformers(tmp_path, tokenizer_json):
  """Fine-tune a converted model with LoRA, then export: transformers computes the merged
  model's logits, which differ from the base model's."""
  from conftest import REPO

  base = save_hf("llama3", tmp_path / "hf", tokenizer_json)
  exchange.convert_hf(str(tmp_path / "hf"), str(tmp_path / "base"))
  text = tmp_path / "text.txt"
  text.write_text("to be or not to be, that is the question. " * 400)
  result = subprocess.run(
    [sys.executable, "-m", "decoderjax.train", f"--config={REPO}/configs/finetune_lm_full.py",
     f"--workdir={tmp_path / 'tuned'}", f"--config.init_from={tmp_path / 'base'}",
     f"--config.data.path={text}", "--config.finetune.method=lora",
     "--config.finetune.lora_targets=q,k,v,o,up,gate,down", "--config.data.seq_len=32",
     "--config.train.steps=8", "--config.eval.every_steps=0", "--config.eval.at_start=false",
     "--config.optimizer.learning_rate=1e-2", "--config.optimizer.warmup_steps=0",
     "--config.train.batch_size=4", "--config.train.sample_tokens=4"],
    capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  exchange.export_hf(str(tmp_path / "tuned"), str(tmp_path / "back"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / "back", attn_implementation="eager"
  )
  tuned = modeldir.load_model_dir(str(tmp_path / "tuned"))
  assert tuned.config.lora_rank == 0  # merged on load
  tokens = np.random.default_rng(2).integers(0, V, (2, 20))
  assert_same_logits(exported, tuned, tokens)
  with torch.no_grad():
    moved = exported(torch.from_numpy(tokens)).logits - base(torch.from_numpy(tokens)).logits
  assert float(moved.abs().max()) > 1e-2
