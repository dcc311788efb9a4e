"""Hugging Face checkpoints <-> decoderjax parameters: checkpoint readers and tensor mapping
(hf_config.py translates the config.json).

Tensors stream from safetensors one at a time (single files or sharded with
`model.safetensors.index.json`), so a checkpoint is never held twice in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from decoderjax.model.config import ModelConfig


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
      return np.asarray(self.files[file].get_tensor(name))  # as stored; cast per layer later
    except Exception as e:
      raise ValueError(f"{file}: cannot read tensor {name!r} ({e})") from None


class TorchBinReader:
  """PyTorch `pytorch_model.bin` checkpoints (single or indexed), through torch's weights-only
  unpickler: tensors and plain containers load, any other pickled object is refused."""

  def __init__(self, directory: str):
    try:
      import torch
    except ImportError:
      raise ImportError("reading pytorch_model.bin needs `pip install torch`") from None
    index = os.path.join(directory, "pytorch_model.bin.index.json")
    if os.path.exists(index):
      with open(index) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    else:
      names = ["pytorch_model.bin"]
    self.tensors = {}
    for name in names:
      path = os.path.join(directory, name)
      try:  # mmap: tensors stay on disk until converted one by one
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except Exception as e:  # torch raises UnpicklingError for anything but tensors
        raise ValueError(f"{path}: not a weights-only PyTorch checkpoint ({e})") from None
      self.tensors.update(state)

  def keys(self) -> set[str]:
    return set(self.tensors)

  def get(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise ValueError(f"tensor {name!r} is missing from the checkpoint")
    return self.tensors[name].float().numpy()


def open_checkpoint(directory: str):
  """The tensors of a Hugging Face checkpoint directory: safetensors first, else .bin."""
  if any(
    os.path.exists(os.path.join(directory, f))
    for f in ("model.safetensors", "model.safetensors.index.json")
  ):
    return SafetensorsReader(directory)
  if any(
    os.path.exists(os.path.join(directory, f))
    for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
  ):
    return TorchBinReader(directory)
  raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")


class TextModelReader:
  """The language model of a multimodal checkpoint (Gemma 3's `language_model.model.*`, or
  `model.language_model.*`) under a text-only model's names; the vision tower and the
  projector are never read."""

  PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
  )

  def __init__(self, reader):
    self.reader, self.names = reader, {}
    for key in reader.keys():
      for old, new in self.PREFIXES:
        if key.startswith(old):
          self.names[new + key[len(old) :]] = key

  def keys(self) -> set[str]:
    return set(self.names)

  def get(self, name: str):
    return self.reader.get(self.names[name])


class Tensor(NamedTuple):
  """One checkpoint tensor: its place in our tree and in Hugging Face's, and how the layouts
  differ. Reading and writing a checkpoint both follow these tables."""

  ours: tuple[str, ...]  # paths in our tree ("attn/q"); several for a fused tensor
  hf: str  # the Hugging Face name (a layer's after its "model.layers.{i}." prefix)
  layout: str  # how HF stores it, one of _LAYOUTS
  gguf: str = ""  # llama.cpp's name for it, where GGUF files have it
  only_if: str = ""  # a key of _present: absent from models without that


_T = Tensor
LLAMA_GLOBAL = (
  _T(("embedding",), "model.embed_tokens.weight", "same", "token_embd.weight"),
  _T(("final_norm/scale",), "model.norm.weight", "same", "output_norm.weight"),
  _T(("head",), "lm_head.weight", "linear", "output.weight", only_if="untied"),
)
LLAMA_LAYER = (
  _T(("attn_norm/scale",), "input_layernorm.weight", "same", "attn_norm.weight", "pre_norms"),
  _T(("attn/q",), "self_attn.q_proj.weight", "heads_in", "attn_q.weight"),
  _T(("attn/k",), "self_attn.k_proj.weight", "heads_in", "attn_k.weight"),
  _T(("attn/v",), "self_attn.v_proj.weight", "heads_in", "attn_v.weight"),
  _T(("attn/o",), "self_attn.o_proj.weight", "heads_out", "attn_output.weight"),
  _T(("attn/q_bias",), "self_attn.q_proj.bias", "head_bias", "attn_q.bias", "qkv_bias"),
  _T(("attn/k_bias",), "self_attn.k_proj.bias", "head_bias", "attn_k.bias", "qkv_bias"),
  _T(("attn/v_bias",), "self_attn.v_proj.bias", "head_bias", "attn_v.bias", "qkv_bias"),
  _T(("attn/q_norm/scale",), "self_attn.q_norm.weight", "same", "attn_q_norm.weight", "qk_norm"),
  _T(("attn/k_norm/scale",), "self_attn.k_norm.weight", "same", "attn_k_norm.weight", "qk_norm"),
  # Where the norms sit (norm_placement) decides which HF and GGUF name each has.
  _T(("mlp_norm/scale",), "post_attention_layernorm.weight", "same", "ffn_norm.weight", "pre"),
  _T(("attn_post_norm/scale",), "post_attention_layernorm.weight", "same",
     "post_attention_norm.weight", "post_norms"),
  _T(("mlp_norm/scale",), "pre_feedforward_layernorm.weight", "same", "ffn_norm.weight", "both"),
  _T(("mlp_post_norm/scale",), "post_feedforward_layernorm.weight", "same",
     "post_ffw_norm.weight", "post_norms"),
  _T(("mlp/gate",), "mlp.gate_proj.weight", "linear", "ffn_gate.weight"),
  _T(("mlp/up",), "mlp.up_proj.weight", "linear", "ffn_up.weight"),
  _T(("mlp/down",), "mlp.down_proj.weight", "linear", "ffn_down.weight"),
)  # fmt: skip
PHI3_FUSED = {  # Phi-3 stores q, k, v as one matrix, and gate and up as another
  "self_attn.q_proj.weight": _T(("attn/q", "attn/k", "attn/v"), "self_attn.qkv_proj.weight",
                                "fused_qkv", "attn_qkv.weight"),
  "mlp.up_proj.weight": _T(("mlp/gate", "mlp/up"), "mlp.gate_up_proj.weight", "fused_linear",
                           "ffn_up.weight"),
}  # fmt: skip
PHI3_LAYER = tuple(
  PHI3_FUSED.get(t.hf, t) for t in LLAMA_LAYER
  if t.hf not in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight")
)  # fmt: skip
GPT2_GLOBAL = (  # HF names after an optional "transformer." (always written)
  _T(("embedding",), "wte.weight", "same"),
  _T(("position_embedding",), "wpe.weight", "same"),
  _T(("final_norm/scale",), "ln_f.weight", "same"),
  _T(("final_norm/bias",), "ln_f.bias", "same"),
)
GPT2_LAYER = (  # Conv1D layers store [in, out], as we do
  _T(("attn_norm/scale",), "ln_1.weight", "same"),
  _T(("attn_norm/bias",), "ln_1.bias", "same"),
  _T(("attn/q", "attn/k", "attn/v"), "attn.c_attn.weight", "fused_heads_in"),
  _T(("attn/q_bias", "attn/k_bias", "attn/v_bias"), "attn.c_attn.bias", "fused_head_bias"),
  _T(("attn/o",), "attn.c_proj.weight", "heads_out_in_out"),
  _T(("attn/o_bias",), "attn.c_proj.bias", "same"),
  _T(("mlp_norm/scale",), "ln_2.weight", "same"),
  _T(("mlp_norm/bias",), "ln_2.bias", "same"),
  _T(("mlp/up",), "mlp.c_fc.weight", "same"),
  _T(("mlp/up_bias",), "mlp.c_fc.bias", "same"),
  _T(("mlp/down",), "mlp.c_proj.weight", "same"),
  _T(("mlp/down_bias",), "mlp.c_proj.bias", "same"),
)
_LAYOUTS = (
  "same",
  "linear",  # nn.Linear [out, in]: ours is its transpose
  "heads_in",  # nn.Linear [N * H, D] -> ours [D, N, H]
  "heads_out",  # nn.Linear [D, N * H] -> ours [N, H, D]
  "head_bias",  # [N * H] -> [N, H]
  "heads_out_in_out",  # Conv1D [N * H, D] -> [N, H, D]
  "fused_heads_in",  # Conv1D [D, 3 * N * H] -> q, k, v [D, N, H]
  "fused_head_bias",  # [3 * N * H] -> q, k, v biases [N, H]
  "fused_qkv",  # nn.Linear [(N + 2K) * H, D] -> q [D, N, H], k and v [D, K, H]
  "fused_linear",  # nn.Linear [2F, D] -> two [D, F] (gate, up)
)


def _tables(arch: str):
  """(global tensors, per-layer tensors, the layer prefix) of an architecture."""
  if arch == "gpt2":
    return GPT2_GLOBAL, GPT2_LAYER, "h.{i}."
  return LLAMA_GLOBAL, PHI3_LAYER if arch == "phi3" else LLAMA_LAYER, "model.layers.{i}."


def gguf_names(cfg: ModelConfig, arch: str) -> tuple[dict[str, str], dict[str, str]]:
  """llama.cpp's names -> Hugging Face's, of the global and the per-layer tensors (a layer's
  names after "blk.{i}." and "model.layers.{i}.") that a model of `cfg` has."""
  global_tensors, layer_tensors, _ = _tables(arch)
  names = lambda tensors: {t.gguf: t.hf for t in tensors if t.gguf and _present(t, cfg)}
  return names(global_tensors), names(layer_tensors)


def _present(t: Tensor, cfg: ModelConfig) -> bool:
  placement = cfg.norm_placement
  present = {"": True, "qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm}
  present["untied"] = not cfg.tie_embeddings
  present.update(pre_norms=placement in ("pre", "both"), pre=placement == "pre")
  present.update(post_norms=placement in ("post", "both"), both=placement == "both")
  return present[t.only_if]


def _to_ours(layout: str, x: np.ndarray, cfg: ModelConfig) -> list[np.ndarray]:
  d, h = cfg.embed_dim, cfg.head_size
  qkv_split = (cfg.num_heads * h, (cfg.num_heads + cfg.kv_heads) * h)
  return {
    "same": lambda: [x],
    "linear": lambda: [x.T],
    "heads_in": lambda: [x.T.reshape(d, -1, h)],
    "heads_out": lambda: [x.T.reshape(-1, h, d)],
    "head_bias": lambda: [x.reshape(-1, h)],
    "heads_out_in_out": lambda: [x.reshape(-1, h, d)],
    "fused_heads_in": lambda: [w.reshape(d, -1, h) for w in np.split(x, 3, axis=1)],
    "fused_head_bias": lambda: [b.reshape(-1, h) for b in np.split(x, 3)],
    "fused_qkv": lambda: [w.T.reshape(d, -1, h) for w in np.split(x, qkv_split)],
    "fused_linear": lambda: [w.T for w in np.split(x, 2)],
  }[layout]()


def _to_hf(layout: str, xs: list[np.ndarray], cfg: ModelConfig) -> np.ndarray:
  d, x = cfg.embed_dim, xs[0]
  return {
    "same": lambda: x,
    "linear": lambda: x.T,
    "heads_in": lambda: x.reshape(d, -1).T,
    "heads_out": lambda: x.reshape(-1, d).T,
    "head_bias": lambda: x.reshape(-1),
    "heads_out_in_out": lambda: x.reshape(-1, d),
    "fused_heads_in": lambda: np.concatenate([w.reshape(d, -1) for w in xs], axis=1),
    "fused_head_bias": lambda: np.concatenate([b.reshape(-1) for b in xs]),
    "fused_qkv": lambda: np.concatenate([w.reshape(d, -1).T for w in xs]),
    "fused_linear": lambda: np.concatenate([w.T for w in xs]),
  }[layout]()


def _read(get: Callable, tensors, cfg: ModelConfig, prefix: str = "") -> dict:
  """Our tree of `tensors` (nested dicts), each read by HF name through `get`."""
  tree = {}
  for t in tensors:
    if not _present(t, cfg):
      continue
    for path, x in zip(t.ours, _to_ours(t.layout, get(prefix + t.hf), cfg), strict=True):
      *parents, leaf = path.split("/")
      node = tree
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = x
  return tree


def _at(tree: dict, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return np.asarray(tree)


def params_from_hf(reader, cfg: ModelConfig, arch: str, dtype=np.float32, progress=None):
  """The decoderjax parameter tree (scanned or per-layer, as `cfg` says) in `dtype`;
  `progress(layers read, layers)` hears of each layer."""
  keys = reader.keys()
  prefix = (
    "transformer." if arch == "gpt2" and any(k.startswith("transformer.") for k in keys) else ""
  )
  used = set()

  def get(name):
    used.add(prefix + name)
    return reader.get(prefix + name)

  global_tensors, layer_tensors, layer_prefix = _tables(arch)
  params = _cast(_read(get, global_tensors, cfg), dtype)
  # Streamed: each layer's tensors are read, cast and written into their place (a slice of the
  # stacked [L, ...] arrays when scanned) before the next layer is read, so the model is held
  # once, in the target dtype, plus one layer in flight.
  stacked = None
  for i in range(cfg.num_layers):
    one = _cast(_read(get, layer_tensors, cfg, layer_prefix.format(i=i)), dtype)
    if progress is not None:
      progress(i + 1, cfg.num_layers)
    if not cfg.scan_layers:
      params[f"layers_{i}"] = one
      continue
    if stacked is None:
      stacked = _map(lambda x: np.empty((cfg.num_layers, *x.shape), x.dtype), one)
    _map(lambda buf, x, i=i: buf.__setitem__(i, x), stacked, one)
  if stacked is not None:
    params["layers"] = stacked
  ignorable = {"lm_head.weight"} | {k for k in keys if k.endswith(("attn.bias", "masked_bias"))}
  extra = sorted(keys - used - ignorable)
  if extra:
    raise ValueError(f"unexpected tensor(s) in the checkpoint: {extra[:5]}")
  return params


def _map(fn, tree, *rest):
  """fn over the leaves of nested dicts of the same structure."""
  if isinstance(tree, dict):
    return {k: _map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
  return fn(tree, *rest)


def _cast(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast(v, dtype) for k, v in tree.items()}
  return np.asarray(tree).astype(dtype, copy=False)


def params_to_hf(params: dict, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
  """Our parameter tree -> Hugging Face tensor names and layouts (float32 numpy)."""
  if cfg.scan_layers:
    layers = [
      _map(lambda a, i=i: np.asarray(a[i]), params["layers"]) for i in range(cfg.num_layers)
    ]
  else:
    layers = [params[f"layers_{i}"] for i in range(cfg.num_layers)]
  global_tensors, layer_tensors, layer_prefix = _tables(arch)
  prefix = "transformer." if arch == "gpt2" else ""
  out = {}

  def write(tree, tensors, names_prefix):
    for t in tensors:
      if _present(t, cfg):
        x = _to_hf(t.layout, [_at(tree, path) for path in t.ours], cfg)
        out[names_prefix + t.hf] = np.ascontiguousarray(np.asarray(x, np.float32))

  write(params, global_tensors, prefix)
  for i, layer in enumerate(layers):
    write(layer, layer_tensors, prefix + layer_prefix.format(i=i))
  return out
