"""GGUF import beyond `llama`: qwen2, qwen3, gemma2, gemma3 and phi3 files written with the `gguf`
package (its own tensor-name map, llama.cpp's conventions), against transformers' GGUF loader and
the Hugging Face model they came from; plus the byte-level pre-tokenizers and refused files."""

import json
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_gguf import close, tokenizer_pieces  # noqa: E402
from test_hf import COMMON, V, assert_same_logits  # noqa: E402

from decoderjax.checkpoints import exchange, modeldir

# Shapes transformers' GGUF loader reads back whole: it takes Qwen3's head_dim, Gemma's query
# scale and soft-caps and Gemma 3's layer pattern and local RoPE base from its defaults.
FAMILIES = {
  "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2),
  "qwen3": lambda: transformers.Qwen3Config(
    **COMMON, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False
  ),
  "gemma2": lambda: transformers.Gemma2Config(
    **COMMON, num_key_value_heads=2, head_dim=256, query_pre_attn_scalar=256, sliding_window=5
  ),
  "gemma3": lambda: transformers.Gemma3TextConfig(
    **{**COMMON, "num_hidden_layers": 6},
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=5,
  ),  # fmt: skip
  "phi3": lambda: transformers.Phi3Config(
    **COMMON, num_key_value_heads=2, pad_token_id=0, eos_token_id=0, bos_token_id=0
  ),
}
ARCH = {"qwen2": "QWEN2", "qwen3": "QWEN3", "gemma2": "GEMMA2", "gemma3": "GEMMA3", "phi3": "PHI3"}


def hf_model(family):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
  with torch.no_grad():  # random norms and biases, so a swapped tensor cannot hide
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def write_gguf(path, model, family, qtype="Q8_0", pre=None, extra=None):
  """`model` as llama.cpp's converter writes it: metadata under the architecture's name, tensors
  named by gguf's own map, Gemma norms as 1 + w, 2-D tensors in `qtype`; returns the state dict
  with the same rounding, for a reference model."""
  cfg = model.config
  tokens, merges, _ = tokenizer_pieces()
  w = gguf.GGUFWriter(str(path), family)
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_dimension_count(head_dim)
  w.add_rope_freq_base(cfg.rope_parameters.get("full_attention", cfg.rope_parameters)["rope_theta"])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if family.startswith("gemma"):
    w.add_sliding_window(cfg.sliding_window)
  if family == "gemma2":
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
  w.add_vocab_size(V)
  w.add_tokenizer_model("gpt2")
  if pre is not None:
    w.add_tokenizer_pre(pre)
  w.add_token_list(tokens + [f"<pad{i}>" for i in range(V - len(tokens))])
  w.add_token_types([3] + [1] * (V - 1))
  w.add_token_merges(merges)
  w.add_eos_token_id(0)
  w.add_pad_token_id(0)  # transformers' Phi-3 default (32000) is past this vocabulary
  names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCH[family]), cfg.num_hidden_layers)
  reference = {}
  for name, p in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    x = p.numpy().astype(np.float32)
    stored = x + 1.0 if family.startswith("gemma") and name.endswith("norm.weight") else x
    kind = gguf.GGMLQuantizationType[qtype if x.ndim == 2 else "F32"]
    data = stored if kind.name == "F32" else gguf.quants.quantize(stored, kind)
    w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data, raw_dtype=kind)
    back = gguf.quants.dequantize(data, kind).reshape(x.shape) if x.ndim == 2 else x
    reference[name] = torch.from_numpy(np.ascontiguousarray(back, np.float32))
  if cfg.tie_word_embeddings:
    reference["lm_head.weight"] = reference["model.embed_tokens.weight"]
  if extra is not None:
    extra(w)
  close(w)
  return reference


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_family_matches_transformers(family, tmp_path):
  """Logits (16 tokens: past the sliding window of 5) equal those of the Hugging Face model on
  the file's rounded weights and of transformers' own GGUF loader; the model directory exports
  as the family it came from."""
  model = hf_model(family)
  reference = write_gguf(tmp_path / "m.gguf", model, family)
  rounded = transformers.AutoModelForCausalLM.from_config(model.config).eval()
  rounded.load_state_dict(reference)
  exchange.convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  tokens = np.random.default_rng(0).integers(0, V, (2, 16))
  assert_same_logits(rounded, ours, tokens)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  assert_same_logits(loaded.eval(), ours, tokens)
  exchange.export_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  assert exported.config.model_type == model.config.model_type
  assert_same_logits(exported, ours, tokens)


def test_gemma3_linear_rope_scaling_from_the_metadata(tmp_path):
  """Gemma 3 4B and larger: rope.scaling.type linear, factor 8, on the global layers only."""
  model = hf_model("gemma3")
  scaled = transformers.Gemma3TextConfig(
    **{**model.config.to_dict(), "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
  )
  model = transformers.AutoModelForCausalLM.from_config(scaled).eval()

  def extra(w):
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(8.0)

  reference = write_gguf(tmp_path / "m.gguf", model, "gemma3", extra=extra)
  model.load_state_dict(reference)
  exchange.convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  assert (ours.config.rope_scaling.kind, ours.config.rope_scaling.factor) == ("linear", 8.0)
  assert_same_logits(model, ours, np.random.default_rng(0).integers(0, V, (2, 16)))


@pytest.mark.parametrize("pattern", [None, [False, True, True, False]])
def test_gemma3_layer_pattern_from_the_metadata(pattern, tmp_path):
  """4 layers: without a sliding_window_pattern (llama.cpp's default, every 6th layer global)
  all slide, at the local RoPE base; a per-layer pattern (true: sliding) is taken as written."""
  kinds = ["sliding_attention" if p else "full_attention" for p in pattern or [True] * 4]
  config = transformers.Gemma3TextConfig(
    **{**FAMILIES["gemma3"]().to_dict(), "num_hidden_layers": 4, "layer_types": kinds}
  )
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()

  def extra(w):
    if pattern is not None:
      w.add_sliding_window_pattern(pattern)

  model.load_state_dict(write_gguf(tmp_path / "m.gguf", model, "gemma3", extra=extra))
  exchange.convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  assert [ours.config.sliding_layer(i) for i in range(4)] == (pattern or [True] * 4)
  assert ours.config.local_rope_theta == 10_000.0
  assert_same_logits(model, ours, np.random.default_rng(0).integers(0, V, (2, 16)))


def test_phi3_longrope_from_the_factor_tensors(tmp_path):
  """Phi-3 128k: the factors as rope_factors_long / _short tensors, the original context and
  the attention factor as metadata; logits past the original context (long factors) too."""
  from test_hf import LONGROPE

  model = hf_model("phi3")
  scaled = transformers.Phi3Config(
    **{**model.config.to_dict(), "original_max_position_embeddings": 16,
       "rope_scaling": {"rope_type": "longrope", "short_factor": LONGROPE[0],
                        "long_factor": LONGROPE[1]}},
  )  # fmt: skip
  model = transformers.AutoModelForCausalLM.from_config(scaled).eval()

  def extra(w):
    w.add_tensor("rope_factors_long.weight", np.asarray(LONGROPE[1], np.float32))
    w.add_tensor("rope_factors_short.weight", np.asarray(LONGROPE[0], np.float32))
    w.add_rope_scaling_orig_ctx_len(16)
    w.add_rope_scaling_attn_factors((1 + np.log(64 / 16) / np.log(16)) ** 0.5)

  model.load_state_dict(write_gguf(tmp_path / "m.gguf", model, "phi3", extra=extra))
  exchange.convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  assert ours.config.rope_scaling.kind == "longrope"
  for length in (12, 24):  # within and past the original context of 16
    assert_same_logits(model, ours, np.random.default_rng(0).integers(0, V, (2, length)))


QWEN2_TEXT = "(to be) or not 12345 to be, that's it\n\n  (question)"


def test_qwen2_pre_tokenizer_splits_as_transformers(tmp_path):
  """A vocabulary learned over Qwen2's split (digits alone, a symbol before a word kept with it)
  encodes as transformers' GGUF tokenizer encodes it, and not as GPT-2's split would."""
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

  from decoderjax.checkpoints import gguf_io

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(gguf_io.PRE_TOKENIZERS["qwen2"]), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])  # fmt: skip
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )  # fmt: skip
  tok.train_from_iterator([QWEN2_TEXT] * 20, trainer)
  model = json.loads(tok.to_str())["model"]
  tokens = sorted(model["vocab"], key=model["vocab"].get)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  path = tmp_path / "m.gguf"
  w = gguf.GGUFWriter(str(path), "qwen2")
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("qwen2")
  w.add_token_list(tokens)
  w.add_token_types([3] + [1] * (len(tokens) - 1))
  w.add_token_merges(merges)
  w.add_eos_token_id(0)
  close(w)
  ours = gguf_io.tokenizer_from_gguf(gguf_io._open(str(path)), str(path))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  for text in (QWEN2_TEXT, "not 2024 (be)", "to  be\n"):
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ours.encode(text)) == text
  gpt2_split = Tokenizer.from_str(ours.tok.to_str())
  gpt2_split.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  assert gpt2_split.encode(QWEN2_TEXT).ids != ours.encode(QWEN2_TEXT)


def test_refused_gguf_files_are_one_line_errors(tmp_path):
  """Architectures, RoPE scalings and pre-tokenizers we do not compute: exit 1, one line naming
  what is not supported and what is, nothing written."""
  model = hf_model("phi3")
  cases = {
    "yarn": (
      "phi3", None, lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
      "RoPE type 'yarn' is not supported",
    ),
    "pre": ("phi3", "jais", None, "pre-tokenizer 'jais' is not supported"),
  }  # fmt: skip
  for name, (family, pre, extra, _) in cases.items():
    write_gguf(tmp_path / f"{name}.gguf", model, family, "F32", pre=pre, extra=extra)
  w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "mamba")
  w.add_block_count(1)
  close(w)
  cases["arch"] = (None, None, None, "GGUF architecture 'mamba' is not supported (llama, qwen2")
  for name, (*_, message) in cases.items():
    result = subprocess.run(
      [sys.executable, "-m", "decoderjax.convert", "--from=gguf",
       f"--input={tmp_path / name}.gguf", f"--output={tmp_path / name}"],
      capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and message in result.stderr, (name, result.stderr[-500:])
    assert "Traceback" not in result.stderr and not (tmp_path / name).exists()
