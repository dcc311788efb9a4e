"""Model configuration: one frozen dataclass for every supported decoder (sizes: presets.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

QUANTS = ("none", "int8", "int4")


KV_CACHES = ("auto", "int8")


POSITIONS = ("learned", "rope", "sinusoidal", "none")


NORMS = ("layernorm", "rmsnorm")


ROPE_SCALINGS = ("llama3", "linear", "longrope")


# Where a layer's norms sit around attention and the MLP: "pre" x + f(norm(x)); "post"
# x + norm(f(x)) (OLMo 2); "both" x + norm(f(norm(x))) (Gemma 2 and 3); "post_ln" norm(x + f(x))
# (the original Transformer's, torch.nn.TransformerDecoderLayer's default).
NORM_PLACEMENTS = ("pre", "post", "both", "post_ln")


QK_NORM_SCOPES = ("head", "all")  # each head's H dims (Qwen3, Gemma 3), or all N x H (OLMo 2)


MLPS = ("gelu", "swiglu", "geglu", "relu")


DTYPES = ("float32", "bfloat16", "float16")


REMATS = ("none", "full", "dots", "dots_no_batch")


ATTENTION_IMPLS = ("auto", "xla", "dot_product_attention", "splash")


LORA_MODULES = ("q", "k", "v", "o", "up", "gate", "down")


def parse_pruning(pattern: str) -> tuple[int, int] | None:
  """A pruning pattern: 'N:M' -> (N, M); 'unstructured' -> None (decoderjax.pruning)."""
  if pattern == "unstructured":
    return None
  match = re.fullmatch(r"(\d+):(\d+)", pattern)
  if not match or not 0 < int(match[1]) < int(match[2]):
    raise ValueError(f"pattern must be 'unstructured' or N:M with 0 < N < M, got {pattern!r}")
  return int(match[1]), int(match[2])


VOCAB_MULTIPLE = 128  # token tables padded to this many rows split over any tensor axis up to 128


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, one of ROPE_SCALINGS:
  - llama3: long wavelengths stretched by `factor`, short ones kept, a smooth band between;
  - linear: every frequency divided by `factor` (position interpolation, Gemma 3's global layers);
  - longrope (Phi-3 128k): frequency i divided by `short_factors[i]`, or by `long_factors[i]` in
    a call whose positions pass `original_max_position`; rotations scaled by `attention_factor`.
  """

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192
  kind: str = "llama3"
  short_factors: tuple[float, ...] = ()
  long_factors: tuple[float, ...] = ()
  attention_factor: float = 1.0

  def __post_init__(self):
    if self.kind not in ROPE_SCALINGS:
      raise ValueError(f"RopeScaling.kind must be one of {ROPE_SCALINGS}, got {self.kind!r}")
    if self.factor <= 0:
      raise ValueError(f"RopeScaling.factor must be positive, got {self.factor}")
    for name in ("short_factors", "long_factors"):  # hashable, as a jit-static config must be
      object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))
    if (self.kind == "longrope") != bool(self.short_factors and self.long_factors):
      raise ValueError("RopeScaling: short_factors and long_factors are longrope's, and needed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Describes a decoder-only transformer (GPT-2, Llama, Mistral, Qwen, Gemma, Phi-3 and OLMo 2
  families)."""

  vocab_size: int = 256  # rows of the token tables
  vocab_pad: int = 0  # of which the last are padding (tensor-parallel splits): never predicted
  max_seq_len: int = 256  # longest sequence the model accepts (size of a learned position table)
  num_layers: int = 2
  num_heads: int = 4  # query heads
  num_kv_heads: int | None = None  # grouped-query attention; None means num_heads (plain MHA)
  head_dim: int | None = None  # None means embed_dim // num_heads
  embed_dim: int = 64
  mlp_dim: int = 256
  position: str = "rope"  # one of POSITIONS
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  norm: str = "rmsnorm"  # one of NORMS
  norm_eps: float = 1e-5
  norm_offset: bool = False  # Gemma: norm weight applied as (1 + w)
  norm_placement: str = "pre"  # one of NORM_PLACEMENTS
  mlp: str = "swiglu"  # one of MLPS
  use_bias: bool = False  # biases on every projection and LayerNorm (GPT-2)
  qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2)
  qk_norm: bool = False  # Qwen3: each head's queries and keys normalized (norm) before RoPE
  qk_norm_scope: str = "head"  # one of QK_NORM_SCOPES: what one norm spans
  tie_embeddings: bool = True  # output head shares the token embedding
  sliding_window: int | None = None  # Mistral: a query sees at most this many keys back
  # With sliding_window: layer i attends to every earlier key when (i + 1) is a multiple of this
  # (Gemma 2: 2, Gemma 3: 6), the others slide; 0 slides every layer (Mistral).
  global_every: int = 0
  # With sliding_window, instead of global_every: the indices of the layers that attend to every
  # earlier key, in any pattern (a config.json's irregular `layer_types`); the others slide.
  global_layers: tuple[int, ...] = ()
  local_rope_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3); None: same
  attn_scale: float | None = None  # multiplies attention logits; None: head_size ** -0.5
  # Each layer also attends to a memory (an encoder's states), between self-attention and the
  # MLP; `encoder_layers` bidirectional layers make that memory from source tokens (0: the
  # source tokens' embeddings are the memory).
  cross_attention: bool = False
  encoder_layers: int = 0
  embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(embed_dim)
  attn_logit_softcap: float | None = None  # Gemma-2: tanh soft-capping of attention logits
  final_logit_softcap: float | None = None  # Gemma-2: tanh soft-capping of output logits
  embed_dropout: float = 0.0
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype; softmax, norms and logits stay float32
  param_dtype: str = "float32"
  scan_layers: bool = True  # nn.scan over layers: compile time flat in depth
  remat: str = "none"  # one of REMATS: what the backward pass recomputes
  attention_impl: str = "auto"  # one of ATTENTION_IMPLS
  # Fine-tuning structure (adapters.py): each adds parameters beside the base model's.
  num_labels: int = 0  # > 0: a classification head replaces the LM head (logits [B, T, C])
  lora_rank: int = 0  # > 0: low-rank adapters W + (alpha / rank) A B on `lora_targets`
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0  # dropout on the adapters' inputs
  lora_targets: str = "q,k,v,o"  # comma-separated, of LORA_MODULES
  prompt_tokens: int = 0  # > 0: this many learned soft-prompt vectors precede every row
  # Inference (python -m decoderjax.quantize writes such models; int_weights.py says how):
  quant: str = "none"  # one of QUANTS: projection and embedding weights in int8 or int4
  quant_group: int = 0  # int4: inputs sharing one scale
  # Pruned models (python -m decoderjax.prune): fine-tuning keeps their zero weights at zero.
  pruning: str = "none"  # "none", "unstructured" or "N:M"
  kv_cache: str = "auto"  # one of KV_CACHES: the compute dtype, or int8 with per-slot scales
  # Projection weights stored [out, in] (layout.for_generation sets it for float32 generation on
  # CPU; never written by to_dict):
  weights_out_in: bool = False

  def __post_init__(self):
    def fail(field, message):
      raise ValueError(f"ModelConfig.{field}: {message}")

    for field in ("vocab_size", "max_seq_len", "num_layers", "num_heads", "embed_dim", "mlp_dim"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        fail(field, f"must be a positive integer, got {value!r}")
    for field, allowed in (
      ("position", POSITIONS),
      ("norm", NORMS),
      ("norm_placement", NORM_PLACEMENTS),
      ("qk_norm_scope", QK_NORM_SCOPES),
      ("mlp", MLPS),
      ("dtype", DTYPES),
      ("param_dtype", DTYPES),
      ("remat", REMATS),
      ("attention_impl", ATTENTION_IMPLS),
      ("quant", QUANTS),
      ("kv_cache", KV_CACHES),
    ):
      if getattr(self, field) not in allowed:
        fail(field, f"must be one of {allowed}, got {getattr(self, field)!r}")
    if self.head_dim is None and self.embed_dim % self.num_heads:
      fail("num_heads", f"{self.num_heads} heads do not divide embed_dim={self.embed_dim}")
    if self.head_dim is not None and self.head_dim <= 0:
      fail("head_dim", f"must be positive, got {self.head_dim}")
    if self.num_kv_heads is not None and (
      self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads
    ):
      fail("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
    if self.position == "rope" and self.head_size % 2:
      fail("head_dim", f"RoPE needs an even head dimension, got {self.head_size}")
    if isinstance(self.rope_scaling, dict):  # accept plain dicts (JSON, ml_collections)
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    s = self.rope_scaling
    if s is not None and s.kind == "longrope":
      if len(s.short_factors) != self.head_size // 2 or len(s.long_factors) != self.head_size // 2:
        fail("rope_scaling", f"longrope needs {self.head_size // 2} factors of each kind")
      if self.local_rope_theta is not None:
        fail("rope_scaling", "longrope does not combine with local_rope_theta")
    if self.position == "sinusoidal" and self.embed_dim % 2:
      fail("embed_dim", f"sinusoidal positions need an even width, got {self.embed_dim}")
    self._check_windows(fail)
    if not isinstance(self.encoder_layers, int) or self.encoder_layers < 0:
      fail("encoder_layers", f"must be a non-negative integer, got {self.encoder_layers!r}")
    if self.encoder_layers and not self.cross_attention:
      fail("encoder_layers", "encode a memory for cross-attention: set cross_attention=True")
    if self.cross_attention and (self.prompt_tokens or self.num_labels):
      fail("cross_attention", "does not combine with a soft prompt or a classifier head")
    if self.cross_attention and self.position == "learned":
      fail("position", "a cross-attention model takes sinusoidal, rope or no positions")
    if self.attn_scale is not None and self.attn_scale <= 0:
      fail("attn_scale", f"must be positive, got {self.attn_scale}")
    for field in ("embed_dropout", "attn_dropout", "resid_dropout"):
      if not 0.0 <= getattr(self, field) < 1.0:
        fail(field, f"must be in [0, 1), got {getattr(self, field)}")
    if not isinstance(self.vocab_pad, int) or not 0 <= self.vocab_pad < self.vocab_size:
      fail("vocab_pad", f"must be in [0, vocab_size={self.vocab_size}), got {self.vocab_pad!r}")
    self._check_additions(fail)

  def _check_additions(self, fail) -> None:
    """What fine-tuning, quantization and pruning add: heads, adapters, prompts, int weights."""
    for field in ("num_labels", "lora_rank", "prompt_tokens"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
        fail(field, f"must be a non-negative integer, got {getattr(self, field)!r}")
    if self.weights_out_in and self.quant != "none":
      fail("weights_out_in", f"applies to float weights, not quant={self.quant!r}")
    if self.num_labels == 1:
      fail("num_labels", "a classifier needs at least 2 labels")
    if not 0.0 <= self.lora_dropout < 1.0:
      fail("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
    if self.lora_rank:
      unknown = sorted(set(self.lora_target_set) - set(LORA_MODULES))
      if unknown or not self.lora_target_set:
        fail("lora_targets", f"{unknown or 'none'} match no module; choose from {LORA_MODULES}")
      if not self.gated_mlp and "gate" in self.lora_target_set:
        kind = {"gelu": "GELU", "relu": "ReLU"}[self.mlp]
        fail("lora_targets", f"'gate' matches no module: a {kind} MLP has no gate projection")
    if self.quant == "int4" and (self.quant_group <= 0 or self.quant_group % 2):
      fail("quant_group", f"int4 needs a positive even group size, got {self.quant_group}")
    if self.pruning != "none":
      try:
        parse_pruning(self.pruning)
      except ValueError as e:
        fail("pruning", str(e))

  def _check_windows(self, fail) -> None:
    """Which layers slide: sliding_window, global_every or global_layers, local_rope_theta."""
    if self.sliding_window is not None and self.sliding_window <= 0:
      fail("sliding_window", f"must be positive, got {self.sliding_window}")
    if not isinstance(self.global_every, int) or self.global_every < 0:
      fail("global_every", f"must be a non-negative integer, got {self.global_every!r}")
    if self.global_every and self.sliding_window is None:
      fail("global_every", "alternates sliding and global layers: set sliding_window too")
    if not isinstance(self.global_layers, tuple):  # JSON and ml_collections give lists
      object.__setattr__(self, "global_layers", tuple(self.global_layers or ()))
    layers = self.global_layers
    if layers:
      if self.global_every:
        fail("global_layers", "names the global layers instead of global_every: set only one")
      if self.sliding_window is None:
        fail("global_layers", "lists the layers that do not slide: set sliding_window too")
      if list(layers) != sorted(set(layers)) or not all(
        isinstance(i, int) and 0 <= i < self.num_layers for i in layers
      ):
        fail("global_layers", f"must be increasing layer indices < {self.num_layers}, got {layers}")
    if self.local_rope_theta is not None and self.sliding_window is None:
      fail("local_rope_theta", "is the sliding layers' RoPE base: set sliding_window too")

  @property
  def real_vocab(self) -> int:
    """Token ids the model predicts: the table rows before the padding."""
    return self.vocab_size - self.vocab_pad

  def padded_vocab(self, multiple: int = VOCAB_MULTIPLE) -> ModelConfig:
    """This config with its tables padded to a multiple of `multiple` rows."""
    size = -(-self.real_vocab // multiple) * multiple
    return self.replace(vocab_size=size, vocab_pad=size - self.real_vocab)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def lora_target_set(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

  @property
  def gated_mlp(self) -> bool:
    """Whether the MLP has a gate projection (SwiGLU, GeGLU)."""
    return self.mlp in ("swiglu", "geglu")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def query_scale(self) -> float:
    """What attention logits are multiplied by."""
    return self.attn_scale if self.attn_scale is not None else self.head_size**-0.5

  @property
  def layer_pattern(self) -> bool:
    """Whether sliding and global layers alternate (Gemma 2 and 3)."""
    return bool(self.global_every or self.global_layers)

  def sliding_layer(self, i: int) -> bool:
    """Whether layer i's attention slides over the last `sliding_window` keys."""
    if self.sliding_window is None:
      return False
    if self.global_layers:
      return i not in self.global_layers
    return not self.global_every or (i + 1) % self.global_every != 0

  @property
  def text_len(self) -> int:
    """Positions a row's tokens can use: the soft prompt takes the first `prompt_tokens`."""
    return self.max_seq_len - self.prompt_tokens

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """The fields a model directory or experiment records. `weights_out_in` describes weights
    as laid out in memory for generation, not the model, and is never written."""
    if self.weights_out_in:
      raise ValueError("a config with weights_out_in=True describes transposed generation weights")
    values = dataclasses.asdict(self)
    del values["weights_out_in"]
    return values

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
    return cls(**values)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> ModelConfig:
    return cls.from_dict(json.loads(text))
