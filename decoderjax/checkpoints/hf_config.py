"""Hugging Face config.json <-> ModelConfig, for the architectures conversion reads and writes.

Supported `model_type`s: gpt2, llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, olmo2,
phi3. An option a config.json sets that no ModelConfig field computes is an error naming it.
"""

from __future__ import annotations

import math

from decoderjax.model.config import ModelConfig, RopeScaling

LLAMA_LIKE = (
  "llama",
  "mistral",
  "qwen2",
  "qwen3",
  "gemma",
  "gemma2",
  "gemma3_text",
  "olmo2",
  "phi3",
)
GEMMAS = ("gemma", "gemma2", "gemma3_text")  # RMSNorm scaled by 1 + w, embeddings x sqrt(D), GeGLU
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # GELU, tanh approximation
ROPE_TYPES = ("default", "llama3", "linear", "longrope")


MULTIMODAL = {"gemma3": "gemma3_text"}  # model_type -> its language model's (text_config)


def text_config(hf: dict, path: str = "config.json") -> dict:
  """The language model's config.json of a multimodal one (Gemma 3 4B and larger: the text
  model is read, the vision tower left), else `hf` as it is."""
  if hf.get("model_type") not in MULTIMODAL:
    return hf
  if not isinstance(hf.get("text_config"), dict):
    raise ValueError(f"{path}: a {hf['model_type']} config without its text_config")
  text = {**hf["text_config"], "model_type": MULTIMODAL[hf["model_type"]]}
  text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
  return text


def config_from_hf(hf: dict, path: str = "config.json") -> ModelConfig:
  """Our ModelConfig for a Hugging Face config.json."""
  arch = hf.get("model_type")
  if arch == "gpt2":
    return _gpt2(hf, path)
  if arch not in LLAMA_LIKE:
    raise ValueError(
      f"{path}: unknown architecture model_type={arch!r} (gpt2, {', '.join(LLAMA_LIKE)})"
    )
  gemma = arch in GEMMAS
  act = (hf.get("hidden_activation") or hf.get("hidden_act") or "silu") if gemma else None
  if gemma and act not in GEMMA_ACTIVATIONS:
    raise ValueError(f"{path}: Gemma activation {act!r} is not supported {GEMMA_ACTIVATIONS}")
  if not gemma and hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  theta, scaling, local_theta = _rope(hf, arch, path)
  windows = _windows(hf, arch, path)
  placement = {"gemma2": "both", "gemma3_text": "both", "olmo2": "post"}.get(arch, "pre")
  scalar = hf.get("query_pre_attn_scalar") if arch in ("gemma2", "gemma3_text") else None
  return ModelConfig(
    vocab_size=hf["vocab_size"],
    max_seq_len=hf.get("max_position_embeddings", 4096),
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=None if head_dim * heads == hf["hidden_size"] else head_dim,
    embed_dim=hf["hidden_size"],
    mlp_dim=hf["intermediate_size"],
    position="rope",
    rope_theta=float(theta),
    rope_scaling=scaling,
    norm="rmsnorm",
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    norm_offset=gemma,
    norm_placement=placement,
    mlp="geglu" if gemma else "swiglu",
    embed_scale=gemma,
    qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
    qk_norm=arch in ("qwen3", "gemma3_text", "olmo2"),
    qk_norm_scope="all" if arch == "olmo2" else "head",
    tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
    **windows,
    local_rope_theta=local_theta if windows["sliding_window"] and arch == "gemma3_text" else None,
    attn_scale=None if scalar is None or scalar == head_dim else float(scalar) ** -0.5,
    attn_logit_softcap=hf.get("attn_logit_softcapping") if gemma else None,
    final_logit_softcap=hf.get("final_logit_softcapping") if arch != "gemma" else None,
  )


GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


def _gpt2(hf: dict, path: str) -> ModelConfig:
  """GPT-2's config.json: its activation (tanh GELU or ReLU) and whether attention logits are
  scaled by head_dim ** -0.5 (`scale_attn_weights`) are read; what we do not compute is named."""
  act = hf.get("activation_function", "gelu_new")
  if act not in GPT2_ACTIVATIONS:
    raise ValueError(f"{path}: GPT-2 activation_function {act!r} is not supported "
                     f"{tuple(GPT2_ACTIVATIONS)}")  # fmt: skip
  if hf.get("scale_attn_by_inverse_layer_idx"):
    raise ValueError(f"{path}: scale_attn_by_inverse_layer_idx is not supported")
  return ModelConfig(
    vocab_size=hf["vocab_size"],
    max_seq_len=hf["n_positions"],
    num_layers=hf["n_layer"],
    num_heads=hf["n_head"],
    embed_dim=hf["n_embd"],
    mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"],
    position="learned",
    norm="layernorm",
    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    mlp=GPT2_ACTIVATIONS[act],
    use_bias=True,
    tie_embeddings=True,
    attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
  )


def _rope(hf: dict, arch: str, path: str) -> tuple[float, RopeScaling | None, float | None]:
  """(RoPE base, its scaling, the sliding layers' base) of a config.json. transformers >= 5
  writes `rope_parameters` (per layer type for Gemma 3), older ones `rope_theta` and
  `rope_scaling` (and Gemma 3's `rope_local_base_freq`)."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  local = {}
  if "full_attention" in rope:
    rope, local = rope["full_attention"], rope.get("sliding_attention") or {}
  default_theta = 1_000_000.0 if arch == "gemma3_text" else 10_000.0
  theta = hf.get("rope_theta", rope.get("rope_theta", default_theta))
  local_theta = hf.get("rope_local_base_freq", local.get("rope_theta", 10_000.0))
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"{path}: partial rotary embeddings are not supported (all head dims rotate)")
  for part in (rope, local):
    kind = part.get("rope_type", part.get("type", "default"))
    if kind not in ROPE_TYPES:
      raise ValueError(f"{path}: RoPE type {kind!r} is not supported {ROPE_TYPES}")
  if local.get("rope_type", local.get("type", "default")) != "default":
    raise ValueError(f"{path}: scaled RoPE on the sliding layers is not supported")
  kind = rope.get("rope_type", rope.get("type"))
  if kind == "linear":
    return theta, RopeScaling(factor=float(rope["factor"]), kind="linear"), local_theta
  if kind == "longrope":
    return theta, _longrope(hf, rope, path), local_theta
  if kind != "llama3":
    return theta, None, local_theta
  scaling = RopeScaling(
    factor=rope["factor"],
    low_freq_factor=rope["low_freq_factor"],
    high_freq_factor=rope["high_freq_factor"],
    original_max_position=rope["original_max_position_embeddings"],
  )
  return theta, scaling, local_theta


def _longrope(hf: dict, rope: dict, path: str) -> RopeScaling:
  """Phi-3's LongRoPE, with transformers' defaults: the factor is the context's growth over the
  original, and the attention factor sqrt(1 + ln(factor) / ln(original)) when none is given."""
  original = rope.get("original_max_position_embeddings") or hf.get(
    "original_max_position_embeddings"
  )
  if not original or "short_factor" not in rope or "long_factor" not in rope:
    raise ValueError(f"{path}: longrope needs short_factor, long_factor and the original context")
  factor = rope.get("factor") or hf.get("max_position_embeddings", original) / original
  attention = rope.get("attention_factor")
  if attention is None:
    attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
  return RopeScaling(
    factor=float(factor), original_max_position=int(original), kind="longrope",
    short_factors=rope["short_factor"], long_factors=rope["long_factor"],
    attention_factor=float(attention),
  )  # fmt: skip


def _windows(hf: dict, arch: str, path: str) -> dict:
  """The ModelConfig fields that say which layers slide, from a config.json: Gemma 2 and 3 list
  each layer's kind in `layer_types` (older ones give a `sliding_window_pattern`: every k-th
  layer global), taken as written: all sliding, all global, every k-th global or any mix."""
  window = hf.get("sliding_window")
  if arch in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    return {"sliding_window": None}
  if arch not in ("gemma2", "gemma3_text") or window is None:
    return {"sliding_window": window}
  n = hf["num_hidden_layers"]
  every = 2 if arch == "gemma2" else hf.get("sliding_window_pattern", 6)
  kinds = hf.get("layer_types") or [
    "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)
  ]
  unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
  if len(kinds) != n or unknown:
    raise ValueError(
      f"{path}: layer_types must give one of full_attention, sliding_attention for each of the "
      f"{n} layers, got {len(kinds)} entries{f' with {unknown}' if unknown else ''}"
    )
  full = tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")
  if len(full) == n:
    return {"sliding_window": None}
  if not full:
    return {"sliding_window": window}
  every = full[0] + 1
  if full == tuple(range(every - 1, n, every)):
    return {"sliding_window": window, "global_every": every}
  return {"sliding_window": window, "global_layers": full}


def config_to_hf(cfg: ModelConfig, prefer: str | None = None) -> dict:
  """A Hugging Face config.json for our config: GPT-2, or of the Llama-shaped architectures
  (`prefer`: the model_type it was converted from, where that fits)."""
  gpt2_like = (cfg.position, cfg.norm) == ("learned", "layernorm") and cfg.mlp in ("gelu", "relu")
  if gpt2_like and cfg.use_bias and cfg.tie_embeddings and cfg.attn_scale in (None, 1.0):
    return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "vocab_size": cfg.vocab_size,
      "n_positions": cfg.max_seq_len,
      "n_embd": cfg.embed_dim,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "activation_function": "gelu_new" if cfg.mlp == "gelu" else "relu",
      "scale_attn_weights": cfg.attn_scale is None,
      "layer_norm_epsilon": cfg.norm_eps,
      "tie_word_embeddings": True,
    }
  arch = _hf_architecture(cfg, prefer)
  gemma = arch in GEMMAS
  names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
           "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM"}  # fmt: skip
  out = {
    "architectures": [names[arch]],
    "model_type": arch,
    "vocab_size": cfg.vocab_size,
    "max_position_embeddings": cfg.max_seq_len,
    "hidden_size": cfg.embed_dim,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.kv_heads,
    "head_dim": cfg.head_size,
    "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "tie_word_embeddings": cfg.tie_embeddings,
    "sliding_window": cfg.sliding_window,
    "pad_token_id": None,  # not recorded here; the class defaults (Phi-3's 32000) may not exist
  }
  if arch in ("qwen2", "qwen3") and cfg.sliding_window:
    out["use_sliding_window"] = True
  if arch in ("qwen3", "olmo2", *GEMMAS):
    out["attention_bias"] = cfg.qkv_bias
  if gemma:
    out["hidden_activation"] = "gelu_pytorch_tanh"
  if arch in ("gemma2", "gemma3_text"):
    scalar = cfg.query_scale**-2
    out.update(
      # transformers builds a sliding mask even where every layer is global: a window that
      # never binds
      sliding_window=cfg.sliding_window or cfg.max_seq_len,
      query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
      attn_logit_softcapping=cfg.attn_logit_softcap,
      final_logit_softcapping=cfg.final_logit_softcap,
      layer_types=[
        "sliding_attention" if cfg.sliding_layer(i) else "full_attention"
        for i in range(cfg.num_layers)
      ],
    )
  if arch == "gemma3_text":
    out["rope_local_base_freq"] = cfg.local_rope_theta or cfg.rope_theta
    if not cfg.global_layers:  # transformers < 4.53 builds layer_types from the pattern alone
      out["sliding_window_pattern"] = cfg.global_every or cfg.num_layers + 1
  out.update(_rope_scaling_to_hf(cfg))
  return out


def _rope_scaling_to_hf(cfg: ModelConfig) -> dict:
  """config.json's `rope_scaling` (and LongRoPE's original context) for our RopeScaling."""
  s = cfg.rope_scaling
  if s is None:
    return {}
  if s.kind == "linear":
    return {"rope_scaling": {"rope_type": "linear", "factor": s.factor}}
  if s.kind == "longrope":
    scaling = {
      "rope_type": "longrope", "short_factor": list(s.short_factors),
      "long_factor": list(s.long_factors), "factor": s.factor,
      "attention_factor": s.attention_factor,
      "original_max_position_embeddings": s.original_max_position,
    }  # fmt: skip
    return {"rope_scaling": scaling, "original_max_position_embeddings": s.original_max_position}
  scaling = {
    "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
    "high_freq_factor": s.high_freq_factor,
    "original_max_position_embeddings": s.original_max_position,
  }  # fmt: skip
  return {"rope_scaling": scaling}


def _hf_architecture(cfg: ModelConfig, prefer: str | None) -> str:
  """The Hugging Face model_type that computes what `cfg` does (`prefer`, the one a checkpoint
  was converted from, where it fits: Phi-3 is Llama-shaped), or an error naming what none has."""
  gemma = (cfg.mlp, cfg.norm_offset, cfg.embed_scale) == ("geglu", True, True)
  if gemma:
    arch = {"pre": "gemma", "both": "gemma3_text" if cfg.qk_norm else "gemma2"}.get(
      cfg.norm_placement, "none"
    )
  elif cfg.norm_placement == "post":
    arch = "olmo2"
  else:
    arch = "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
    arch = "qwen3" if cfg.qk_norm else arch
    if prefer == "phi3" and arch in ("llama", "mistral"):
      arch = "phi3"
  allowed = {  # the options each architecture has, beyond the Llama shape
    "gemma": (), "gemma2": ("sliding_window", "global_every", "global_layers", "attn_scale",
                            "attn_logit_softcap", "final_logit_softcap"),
    "olmo2": ("qk_norm", "qk_norm_scope"), "qwen3": ("qk_norm", "sliding_window"),
    "qwen2": ("sliding_window",), "mistral": ("sliding_window",), "phi3": ("sliding_window",),
  }  # fmt: skip
  allowed["gemma3_text"] = (*allowed["gemma2"], "qk_norm", "local_rope_theta")
  options = ("sliding_window", "global_every", "global_layers", "attn_scale", "attn_logit_softcap",
             "final_logit_softcap", "qk_norm", "local_rope_theta", "use_bias")  # fmt: skip
  unsupported = [f for f in options if getattr(cfg, f) and f not in allowed.get(arch, ())]
  if cfg.qk_norm_scope != ("all" if arch == "olmo2" else "head"):
    unsupported.append(f"qk_norm_scope={cfg.qk_norm_scope}")
  unsupported += [f for f in ("norm_offset", "embed_scale") if getattr(cfg, f) and not gemma]
  shape = (cfg.position, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "geglu" if gemma else "swiglu")
  if not shape or arch == "none" or unsupported:
    raise ValueError(
      f"no Hugging Face architecture for this config (position={cfg.position}, norm={cfg.norm}, "
      f"mlp={cfg.mlp}, norm_placement={cfg.norm_placement}, {unsupported or 'ok'})"
    )
  return arch
