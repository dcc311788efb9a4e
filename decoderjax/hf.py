"""Hugging Face checkpoints -> decoderjax: config translation and tensor mapping.

Supported `model_type`s: gpt2, llama, mistral, qwen2. Tensors stream from safetensors one at a
time (single files or sharded with `model.safetensors.index.json`), so a checkpoint is never
held twice in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from decoderjax.config import ModelConfig, RopeScaling

LLAMA_LIKE = ("llama", "mistral", "qwen2")


def config_from_hf(hf: dict, path: str = "config.json") -> ModelConfig:
  """Our ModelConfig for a Hugging Face config.json."""
  arch = hf.get("model_type")
  if arch == "gpt2":
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
      mlp="gelu",
      use_bias=True,
      tie_embeddings=True,
    )
  if arch in LLAMA_LIKE:
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    # transformers >= 5 writes `rope_parameters` (theta included); older ones `rope_scaling`.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10_000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind not in ("default", "llama3"):
      raise ValueError(f"{path}: RoPE type {kind!r} is not supported (default, llama3)")
    if kind == "llama3":
      scaling = RopeScaling(
        factor=rope["factor"],
        low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        original_max_position=rope["original_max_position_embeddings"],
      )
    window = hf.get("sliding_window")
    if arch == "qwen2" and not hf.get("use_sliding_window", False):
      window = None
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
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
      mlp="swiglu",
      qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      sliding_window=window,
    )
  raise ValueError(
    f"{path}: unknown architecture model_type={arch!r} (gpt2, llama, mistral, qwen2)"
  )


class SafetensorsReader:
  """Lazily reads named tensors from one or several (indexed) safetensors files."""

  def __init__(self, directory: str):
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
      weight_map = None
    else:
      raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    self.files = {}
    names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    for name in names:
      path = os.path.join(directory, name)
      try:
        self.files[name] = safe_open(path, framework="flax")  # bfloat16 too
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    self.location = weight_map or {k: names[0] for k in self.files[names[0]].keys()}  # noqa: SIM118

  def keys(self) -> set[str]:
    return set(self.location)

  def get(self, name: str) -> np.ndarray:
    if name not in self.location:
      raise ValueError(f"tensor {name!r} is missing from the checkpoint")
    file = self.location[name]
    try:
      return np.asarray(self.files[file].get_tensor(name), np.float32)
    except Exception as e:
      raise ValueError(f"{file}: cannot read tensor {name!r} ({e})") from None


def _gpt2_layer(get: Callable, i: int, cfg: ModelConfig) -> dict:
  d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_size
  p = f"h.{i}."
  qkv_w = get(p + "attn.c_attn.weight")  # Conv1D: [D, 3D], used as x @ W
  qkv_b = get(p + "attn.c_attn.bias")
  q, k, v = (w.reshape(d, n, h) for w in np.split(qkv_w, 3, axis=1))
  qb, kb, vb = (b.reshape(n, h) for b in np.split(qkv_b, 3))
  return {
    "attn_norm": {"scale": get(p + "ln_1.weight"), "bias": get(p + "ln_1.bias")},
    "attn": {
      "q": q,
      "k": k,
      "v": v,
      "q_bias": qb,
      "k_bias": kb,
      "v_bias": vb,
      "o": get(p + "attn.c_proj.weight").reshape(n, h, d),
      "o_bias": get(p + "attn.c_proj.bias"),
    },  # fmt: skip
    "mlp_norm": {"scale": get(p + "ln_2.weight"), "bias": get(p + "ln_2.bias")},
    "mlp": {
      "up": get(p + "mlp.c_fc.weight"),
      "up_bias": get(p + "mlp.c_fc.bias"),
      "down": get(p + "mlp.c_proj.weight"),
      "down_bias": get(p + "mlp.c_proj.bias"),
    },
  }


def _llama_layer(get: Callable, i: int, cfg: ModelConfig) -> dict:
  d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
  p = f"model.layers.{i}."
  attn = {  # nn.Linear stores [out, in]: transpose to [in, out], then split heads
    "q": get(p + "self_attn.q_proj.weight").T.reshape(d, n, h),
    "k": get(p + "self_attn.k_proj.weight").T.reshape(d, k, h),
    "v": get(p + "self_attn.v_proj.weight").T.reshape(d, k, h),
    "o": get(p + "self_attn.o_proj.weight").T.reshape(n, h, d),
  }
  if cfg.qkv_bias:
    attn["q_bias"] = get(p + "self_attn.q_proj.bias").reshape(n, h)
    attn["k_bias"] = get(p + "self_attn.k_proj.bias").reshape(k, h)
    attn["v_bias"] = get(p + "self_attn.v_proj.bias").reshape(k, h)
  return {
    "attn_norm": {"scale": get(p + "input_layernorm.weight")},
    "attn": attn,
    "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
    "mlp": {
      "gate": get(p + "mlp.gate_proj.weight").T,
      "up": get(p + "mlp.up_proj.weight").T,
      "down": get(p + "mlp.down_proj.weight").T,
    },
  }


def params_from_hf(reader: SafetensorsReader, cfg: ModelConfig, arch: str, dtype=np.float32):
  """The decoderjax parameter tree (scanned or per-layer, as `cfg` says) in `dtype`."""
  keys = reader.keys()
  prefix = (
    "transformer." if arch == "gpt2" and any(k.startswith("transformer.") for k in keys) else ""
  )
  used = set()

  def get(name):
    used.add(prefix + name)
    return reader.get(prefix + name)

  if arch == "gpt2":
    params = {
      "embedding": get("wte.weight"),
      "position_embedding": get("wpe.weight"),
      "final_norm": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")},
    }
    layer = _gpt2_layer
  else:
    params = {"embedding": get("model.embed_tokens.weight"),
              "final_norm": {"scale": get("model.norm.weight")}}  # fmt: skip
    if not cfg.tie_embeddings:
      params["head"] = get("lm_head.weight").T
    layer = _llama_layer
  layers = [layer(get, i, cfg) for i in range(cfg.num_layers)]
  ignorable = {"lm_head.weight"} | {k for k in keys if k.endswith(("attn.bias", "masked_bias"))}
  extra = sorted(keys - used - ignorable)
  if extra:
    raise ValueError(f"unexpected tensor(s) in the checkpoint: {extra[:5]}")
  if cfg.scan_layers:
    params["layers"] = {
      group: {name: np.stack([lp[group][name] for lp in layers]) for name in layers[0][group]}
      for group in layers[0]
    }
  else:
    params.update({f"layers_{i}": lp for i, lp in enumerate(layers)})
  return _cast(params, dtype)


def _cast(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  return np.asarray(tree).astype(dtype)
