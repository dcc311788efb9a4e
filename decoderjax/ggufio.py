"""llama.cpp GGUF files -> decoderjax: metadata, dequantized tensors, and the tokenizer.

Reads the `llama` architecture (Llama, Mistral, SmolLM, ... as llama.cpp writes them) with the
`gguf` package, dequantizes F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 and the K-quants, undoes
llama.cpp's row permutation of the Q and K projections, and rebuilds the tokenizer (byte-level
BPE, or SentencePiece for `llama`-model vocabularies) and chat template from the metadata.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from decoderjax import hf
from decoderjax.config import ModelConfig, RopeScaling
from decoderjax.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
             "Q4_K", "Q5_K", "Q6_K")  # fmt: skip

# GGUF tensor names -> Hugging Face Llama names (then mapped by hf.params_from_hf).
_GLOBAL = {t.gguf: t.hf for t in hf.LLAMA_GLOBAL if t.gguf}
_LAYER = {t.gguf: t.hf for t in hf.LLAMA_LAYER if t.gguf}


def _open(path: str):
  import gguf

  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises assorted errors on truncated or foreign files
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


class GGUFTensors:
  """Hugging Face-named, dequantized float32 tensors of a GGUF file (read lazily)."""

  def __init__(self, reader, path: str, num_heads: int, num_kv_heads: int):
    self.path, self.by_hf = path, {}
    self.heads = {"self_attn.q_proj.weight": num_heads, "self_attn.k_proj.weight": num_kv_heads}
    for t in reader.tensors:
      name = t.name
      if name in _GLOBAL:
        self.by_hf[_GLOBAL[name]] = t
      elif name.startswith("blk.") and name.split(".", 2)[2] in _LAYER:
        _, i, rest = name.split(".", 2)
        self.by_hf[f"model.layers.{i}.{_LAYER[rest]}"] = t
      elif name != "rope_freqs.weight":
        raise ValueError(f"{path}: unexpected tensor {name!r}")

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
    if suffix in self.heads:  # llama.cpp interleaves the two RoPE halves of each head's rows
      n = self.heads[suffix]
      x = x.reshape(n, x.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(shape)
    return x


def _meta(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def config_from_gguf(reader, path: str) -> ModelConfig:
  arch = _meta(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama)")
  heads = int(_meta(reader, "llama.attention.head_count"))
  width = int(_meta(reader, "llama.embedding_length"))
  head_dim = int(_meta(reader, "llama.attention.key_length", width // heads))
  tokens = _meta(reader, "tokenizer.ggml.tokens", [])
  cfg = ModelConfig(
    vocab_size=int(_meta(reader, "llama.vocab_size", len(tokens))),
    max_seq_len=int(_meta(reader, "llama.context_length", 4096)),
    num_layers=int(_meta(reader, "llama.block_count")),
    num_heads=heads,
    num_kv_heads=int(_meta(reader, "llama.attention.head_count_kv", heads)),
    head_dim=None if head_dim * heads == width else head_dim,
    embed_dim=width,
    mlp_dim=int(_meta(reader, "llama.feed_forward_length")),
    position="rope",
    rope_theta=float(_meta(reader, "llama.rope.freq_base", 10_000.0)),
    norm="rmsnorm",
    norm_eps=float(_meta(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
    mlp="swiglu",
    tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
  )
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
  from decoderjax.layers import rope_frequencies

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


def tokenizer_from_gguf(reader, path: str) -> Tokenizer:
  """The file's tokenizer: byte-level BPE (`tokenizer.ggml.model == gpt2`) as tokenizer.json, or
  SentencePiece (`llama`: pieces, scores and types from a tokenizer.model) as a model proto."""
  kind = _meta(reader, "tokenizer.ggml.model")
  if kind == "llama":
    return _sentencepiece(reader, path)
  if kind != "gpt2":
    raise ValueError(
      f"{path}: GGUF tokenizer model {kind!r} is not supported (gpt2 BPE, llama SentencePiece)"
    )
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges", [])]
  types = list(_meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  control = [
    AddedToken(t, special=True) for t, kind in zip(tokens, types, strict=True) if kind == 3
  ]
  tok.add_special_tokens(control)
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
  for token, score, kind in zip(tokens, scores, types, strict=True):
    if kind not in (1, 2, 3, 4, 5, 6):
      raise ValueError(f"{path}: token {token!r} has unknown type {kind}")
    proto.pieces.add(piece=token, score=float(score), type=int(kind))
  return SentencePieceTokenizer(proto.SerializeToString())


def read_gguf(path: str, scan_layers: bool = True, dtype: str = "float32", progress=None):
  """(ModelConfig, parameters in `dtype`, tokenizer, generation defaults) of a GGUF file."""

  reader = _open(path)
  cfg = config_from_gguf(reader, path).replace(
    scan_layers=scan_layers, param_dtype=dtype, dtype=dtype
  )
  tensors = GGUFTensors(reader, path, cfg.num_heads, cfg.kv_heads)
  params = hf.params_from_hf(tensors, cfg, "llama", jnp.dtype(dtype), progress)
  generation = {}
  template = _meta(reader, "tokenizer.chat_template")
  if template:
    generation["chat_template"] = template
  return cfg, params, tokenizer_from_gguf(reader, path), generation
