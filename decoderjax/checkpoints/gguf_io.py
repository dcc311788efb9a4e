"""llama.cpp GGUF files -> decoderjax: metadata, dequantized tensors, and the tokenizer.

Reads the `llama` (Llama, Mistral, SmolLM, ...), `qwen2`, `qwen3`, `gemma2`, `gemma3` and `phi3`
architectures with the `gguf` package. The metadata becomes the config.json of the same model
(then hfconfig's translation), tensors get their Hugging Face names (then hf's tables), and what
llama.cpp's converter changed is undone: the row permutation of `llama`'s Q and K projections,
Gemma's RMSNorm weights stored as 1 + w. Tensors are dequantized from F32/F16/BF16/Q8_0/Q4_0/
Q4_1/Q5_0/Q5_1 and the K-quants. The tokenizer (byte-level BPE with the vocabulary's
pre-tokenizer, or SentencePiece for `llama`-model vocabularies) and chat template are rebuilt
from the metadata.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from decoderjax.checkpoints import hf_config, hf_weights
from decoderjax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from decoderjax.model.config import ModelConfig, RopeScaling

SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
             "Q4_K", "Q5_K", "Q6_K")  # fmt: skip
# llama.cpp's architecture -> the Hugging Face model_type of the same model.
ARCHITECTURES = {
  "llama": "llama",
  "qwen2": "qwen2",
  "qwen3": "qwen3",
  "gemma2": "gemma2",
  "gemma3": "gemma3_text",
  "phi3": "phi3",
}
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_PERMUTED = ("llama",)  # llama.cpp interleaves the two RoPE halves of each Q and K head's rows
_GEMMAS = ("gemma2", "gemma3")  # llama.cpp stores their norm weights w as 1 + w; GELU (tanh) MLPs
# Metadata (after "{architecture}.") -> config.json keys.
_HF_KEYS = {
  "context_length": "max_position_embeddings",
  "block_count": "num_hidden_layers",
  "embedding_length": "hidden_size",
  "feed_forward_length": "intermediate_size",
  "attention.head_count": "num_attention_heads",
  "attention.head_count_kv": "num_key_value_heads",
  "attention.key_length": "head_dim",
  "attention.layer_norm_rms_epsilon": "rms_norm_eps",
  "attention.sliding_window": "sliding_window",
  "rope.freq_base": "rope_theta",
  "rope.freq_base_swa": "rope_local_base_freq",
  "attn_logit_softcapping": "attn_logit_softcapping",
  "final_logit_softcapping": "final_logit_softcapping",
}
# The layer count of the 27B models, whose query scale llama.cpp takes from the width per head.
_SCALE_BY_WIDTH = {"gemma2": 46, "gemma3": 62}


def _open(path: str):
  import gguf

  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises assorted errors on truncated or foreign files
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


class GGUFTensors:
  """Hugging Face-named, dequantized float32 tensors of a GGUF file (read lazily)."""

  def __init__(self, reader, path: str, cfg: ModelConfig, arch: str):
    self.path, self.arch, self.by_hf = path, arch, {}
    self.heads = {"self_attn.q_proj.weight": cfg.num_heads, "self_attn.k_proj.weight": cfg.kv_heads}
    global_names, layer_names = hf_weights.gguf_names(cfg, ARCHITECTURES[arch])
    for t in reader.tensors:
      name = t.name
      if name in global_names:
        self.by_hf[global_names[name]] = t
      elif name.startswith("blk.") and name.split(".", 2)[2] in layer_names:
        _, i, rest = name.split(".", 2)
        self.by_hf[f"model.layers.{i}.{layer_names[rest]}"] = t
      elif name not in ROPE_TENSORS:
        raise ValueError(f"{path}: unexpected tensor {name!r} for a {arch} model")

  def keys(self) -> set[str]:
    return set(self.by_hf)

  def get(self, hf_name: str) -> np.ndarray:
    import gguf

    if hf_name not in self.by_hf:
      raise ValueError(f"{self.path}: tensor for {hf_name!r} is missing")
    t = self.by_hf[hf_name]
    kind = t.tensor_type.name
    if kind not in SUPPORTED:
      raise ValueError(f"{self.path}: tensor {t.name!r} has unsupported type {kind}")
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dim first
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    except Exception as e:
      raise ValueError(f"{self.path}: cannot dequantize {t.name!r} ({kind}): {e}") from None
    suffix = hf_name.split(".", 3)[-1]
    if self.arch in _PERMUTED and suffix in self.heads:
      n = self.heads[suffix]
      x = x.reshape(n, x.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(shape)
    if self.arch in _GEMMAS and hf_name.endswith("norm.weight"):
      x = x - 1.0
    return x


def _meta(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def hf_config_from_gguf(reader, path: str) -> dict:
  """The config.json of the model a GGUF file holds, from its metadata (and, for what the
  metadata leaves out, llama.cpp's own rules)."""
  arch = _meta(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(
      f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)})"
    )
  config = {"model_type": ARCHITECTURES[arch]}
  for key, name in _HF_KEYS.items():
    value = _meta(reader, f"{arch}.{key}")
    if isinstance(value, list):  # per-layer values (OpenELM and others)
      if len(set(value)) != 1:
        raise ValueError(f"{path}: {arch}.{key} varies by layer, which is not supported")
      value = value[0]
    if value is not None:
      config[name] = value
  names = {t.name for t in reader.tensors}
  config["vocab_size"] = _meta(reader, f"{arch}.vocab_size") or len(
    _meta(reader, "tokenizer.ggml.tokens", [])
  )
  config["tie_word_embeddings"] = "output.weight" not in names
  heads, width = config["num_attention_heads"], config["hidden_size"]
  head_dim = config.setdefault("head_dim", width // heads)
  value_dim = _meta(reader, f"{arch}.attention.value_length", head_dim)
  if value_dim != head_dim:
    raise ValueError(f"{path}: value heads of {value_dim} dims differ from key heads of {head_dim}")
  rotated = _meta(reader, f"{arch}.rope.dimension_count", head_dim)
  if rotated != head_dim:  # hfconfig names what it cannot compute
    config["partial_rotary_factor"] = rotated / head_dim
  kind = _meta(reader, f"{arch}.rope.scaling.type", "none")
  if "rope_factors_long.weight" in names:
    config["rope_scaling"] = _longrope(reader, arch, path)
  elif kind != "none":
    factor = _meta(reader, f"{arch}.rope.scaling.factor", 1.0)
    config["rope_scaling"] = {"rope_type": kind, "factor": factor}
  if arch in _GEMMAS:
    config["hidden_activation"] = "gelu_pytorch_tanh"
  if arch == "gemma2":  # llama.cpp's defaults where older files lack them
    config.setdefault("attn_logit_softcapping", 50.0)
    config.setdefault("final_logit_softcapping", 30.0)
  if arch in _SCALE_BY_WIDTH:
    wide = config["num_hidden_layers"] == _SCALE_BY_WIDTH[arch]
    config["query_pre_attn_scalar"] = width // heads if wide else head_dim
  pattern = _meta(reader, f"{arch}.attention.sliding_window_pattern")
  if isinstance(pattern, list):  # one flag a layer: sliding or not
    config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
  elif pattern is not None:
    config["sliding_window_pattern"] = int(pattern)
  return config


def _longrope(reader, arch: str, path: str) -> dict:
  """Phi-3 128k's LongRoPE: llama.cpp keeps its per-frequency factors as the tensors
  rope_factors_long / rope_factors_short, the original context and attention factor as
  metadata."""
  tensors = {t.name: t for t in reader.tensors}
  if "rope_factors_short.weight" not in tensors:
    raise ValueError(f"{path}: rope_factors_long.weight without rope_factors_short.weight")
  factors = lambda kind: np.asarray(tensors[f"rope_factors_{kind}.weight"].data, np.float32)
  scaling = {
    "rope_type": "longrope",
    "long_factor": factors("long").reshape(-1).tolist(),
    "short_factor": factors("short").reshape(-1).tolist(),
    "original_max_position_embeddings": _meta(
      reader, f"{arch}.rope.scaling.original_context_length"
    ),
  }
  attention = _meta(reader, f"{arch}.rope.scaling.attn_factor")
  if attention is not None:
    scaling["attention_factor"] = attention
  return scaling


def config_from_gguf(reader, path: str) -> ModelConfig:
  cfg = hf_config.config_from_hf(hf_config_from_gguf(reader, path), path)
  factors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  if factors is not None:
    cfg = cfg.replace(rope_scaling=rope_scaling_from_factors(np.asarray(factors.data), cfg, path))
  return cfg


def rope_scaling_from_factors(factors, cfg: ModelConfig, path: str) -> RopeScaling | None:
  """Llama-3 RoPE scaling recovered from llama.cpp's per-frequency divisors (rope_freqs).

  llama.cpp stores 1 for short wavelengths, `factor` for long ones and 1 / ((1 - s) / factor
  + s) between, with s = a / wavelength - b linear in the inverse wavelength. a and b fix the
  function: (original_max_position, low, high) = (a / b, 1, 1 + 1 / b) reproduce it exactly.
  """
  from decoderjax.model.layers import rope_frequencies

  factors = np.asarray(factors, np.float64).reshape(-1)
  base = np.asarray(rope_frequencies(cfg.replace(rope_scaling=None)), np.float64)
  if factors.shape != base.shape:
    raise ValueError(f"{path}: rope_freqs.weight has {factors.size} factors, expected {base.size}")
  factor = float(factors.max())
  if np.allclose(factors, 1.0):
    return None
  medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
  if medium.sum() < 2:
    raise ValueError(f"{path}: rope_freqs.weight does not follow Llama-3 scaling (too few bands)")
  smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
  a, minus_b = np.polyfit(base[medium] / (2 * np.pi), smooth, 1)  # s = a / wavelength - b
  b = -minus_b
  # Scaled so low_freq_factor is 1, as in every Llama-3 release (8192, 1, 4 come back).
  low, high, original = (1.0, 1.0 + 1.0 / b, a / b) if b > 1e-6 else (b, b + 1.0, a)
  if abs(original - round(original)) < 1e-3 * original:
    original = round(original)
  scaling = RopeScaling(factor, float(low), float(round(high, 6)), original)
  rebuilt = np.asarray(rope_frequencies(cfg.replace(rope_scaling=scaling)), np.float64)
  if not np.allclose(rebuilt, base / factors, rtol=1e-4):
    raise ValueError(f"{path}: rope_freqs.weight does not follow Llama-3 scaling")
  return scaling


# How byte-level vocabularies split text before BPE (tokenizer.ggml.pre, as llama.cpp names
# them): the regex of the tokenizer the vocabulary was trained with; None is GPT-2's own.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
  "default": None,
  "gpt-2": None,
  "gpt2": None,
  "smollm": None,  # and each digit alone
  "llama-bpe": _LLAMA3_SPLIT,
  "llama3": _LLAMA3_SPLIT,
  "dbrx": _LLAMA3_SPLIT,
  "smaug-bpe": _LLAMA3_SPLIT,
  "falcon3": _LLAMA3_SPLIT,
  "qwen2": _QWEN2_SPLIT,
  "deepseek-r1-qwen": _QWEN2_SPLIT,
  "tekken": _TEKKEN_SPLIT,
}


def _pre_tokenizer(pre: str | None, path: str):
  from tokenizers import Regex, pre_tokenizers

  if pre is not None and pre not in PRE_TOKENIZERS:
    raise ValueError(
      f"{path}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})"
    )
  split = PRE_TOKENIZERS.get(pre)
  if split is None:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre != "smollm":
      return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  return pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(split), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])  # fmt: skip


def tokenizer_from_gguf(reader, path: str) -> Tokenizer:
  """The file's tokenizer: byte-level BPE (`tokenizer.ggml.model == gpt2`) as tokenizer.json, or
  SentencePiece (`llama`: pieces, scores and types from a tokenizer.model) as a model proto.
  Control tokens are special; user-defined ones (`<think>`) are matched whole, as llama.cpp does."""
  kind = _meta(reader, "tokenizer.ggml.model")
  if kind == "llama":
    return _sentencepiece(reader, path)
  if kind != "gpt2":
    raise ValueError(
      f"{path}: GGUF tokenizer model {kind!r} is not supported (gpt2 BPE, llama SentencePiece)"
    )
  from tokenizers import AddedToken, Tokenizer, decoders, models

  tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges", [])]
  types = list(_meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  tok.pre_tokenizer = _pre_tokenizer(_meta(reader, "tokenizer.ggml.pre"), path)
  tok.decoder = decoders.ByteLevel()
  added = lambda wanted: [t for t, kind in zip(tokens, types, strict=True) if kind == wanted]
  tok.add_special_tokens([AddedToken(t, special=True) for t in added(3)])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added(4)])
  eos = _meta(reader, "tokenizer.ggml.eos_token_id")
  bos = _meta(reader, "tokenizer.ggml.bos_token_id")
  if bos is not None and _meta(reader, "tokenizer.ggml.add_bos_token", False):
    from tokenizers import processors  # what llama.cpp adds, the tokenizer adds (Llama 3)

    b = tokens[int(bos)]
    tok.post_processor = processors.TemplateProcessing(
      single=f"{b} $A", pair=f"{b} $A {b} $B:1", special_tokens=[(b, int(bos))]
    )
  return HFTokenizer(
    tok.to_str(), None if eos is None else int(eos), None if bos is None else int(bos)
  )


def _sentencepiece(reader, path: str) -> SentencePieceTokenizer:
  """A SentencePiece BPE model proto rebuilt from the vocabulary llama.cpp copied out of one.

  GGUF token types are SentencePiece's piece types (1 normal, 2 unknown, 3 control, 4 user
  defined, 5 unused, 6 byte); byte pieces mean byte fallback. Normalization is Llama's: no
  rule, whitespace as U+2581, a dummy prefix unless `tokenizer.ggml.add_space_prefix` is false.
  """
  try:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
  except ImportError:
    raise ImportError("SentencePiece GGUF vocabularies need `pip install protobuf`") from None

  tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
  scores = list(_meta(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
  types = list(_meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  if not len(tokens) == len(scores) == len(types):
    raise ValueError(f"{path}: tokenizer tokens, scores and types differ in length")
  proto = spm_pb2.ModelProto()
  proto.trainer_spec.model_type = spm_pb2.TrainerSpec.BPE
  proto.trainer_spec.vocab_size = len(tokens)
  proto.trainer_spec.byte_fallback = 6 in types
  special = {
    "unk_id": _meta(reader, "tokenizer.ggml.unknown_token_id"),
    "bos_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
    "eos_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
    "pad_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
  }
  for field, value in special.items():
    setattr(proto.trainer_spec, field, -1 if value is None else int(value))
  add_prefix = _meta(reader, "tokenizer.ggml.add_space_prefix", True)
  proto.normalizer_spec.name = "identity"
  proto.normalizer_spec.add_dummy_prefix = bool(add_prefix)
  proto.normalizer_spec.remove_extra_whitespaces = False
  proto.normalizer_spec.escape_whitespaces = True
  known = set(tokens)
  for token, score, kind in zip(tokens, scores, types, strict=True):
    spaces = "\u2581" * len(token)
    if token and not token.strip(" ") and spaces not in known:  # Gemma's runs of spaces
      token = spaces
    if kind not in (1, 2, 3, 4, 5, 6):
      raise ValueError(f"{path}: token {token!r} has unknown type {kind}")
    proto.pieces.add(piece=token, score=float(score), type=int(kind))
  return SentencePieceTokenizer(proto.SerializeToString())


def read_gguf(path: str, scan_layers: bool = True, dtype: str = "float32", progress=None):
  """(ModelConfig, parameters in `dtype`, tokenizer, generation defaults, the Hugging Face
  model_type) of a GGUF file."""
  reader = _open(path)
  cfg = config_from_gguf(reader, path).replace(
    scan_layers=scan_layers, param_dtype=dtype, dtype=dtype
  )
  arch = _meta(reader, "general.architecture")
  tensors = GGUFTensors(reader, path, cfg, arch)
  params = hf_weights.params_from_hf(tensors, cfg, ARCHITECTURES[arch], jnp.dtype(dtype), progress)
  generation = {}
  template = _meta(reader, "tokenizer.chat_template")
  if template:
    generation["chat_template"] = template
  return cfg, params, tokenizer_from_gguf(reader, path), generation, ARCHITECTURES[arch]
