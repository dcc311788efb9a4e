"""Weight-only int8 quantization, for cheaper inference (the binary: decoderjax.quantize).

Every projection (q, k, v, o, MLP up / gate / down), the embedding table and an untied head
become int8 with one float32 scale per output channel (per row for the embedding): symmetric,
round to nearest, scale = max |w| / 127 over the channel. Norms, biases and heads of
classifiers stay in float. The output is a model directory with `quant="int8"` in its config;
`generate`, `evaluate` and `predict` load it like any other, and the model dequantizes each
weight inside the compiled step (layers.weight), so the int8 arrays are what stays in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZED = {  # weight name -> dims its scale keeps (output channels; rows of the table),
  # as the model declares it (layers.weight) and as quantize_params writes it
  "q": (1, 2),
  "k": (1, 2),
  "v": (1, 2),
  "o": (2,),
  "up": (1,),
  "gate": (1,),
  "down": (1,),
  "embedding": (0,),
  "head": (1,),
}
MODES = ("int8",)
INT8_MAX = 127


def quantize_int8(w: np.ndarray, keep: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """w -> (q int8, scale float32 over the `keep` dims), with w ≈ q * scale (broadcast back)."""
  w = np.asarray(w, np.float32)
  reduce = tuple(i for i in range(w.ndim) if i not in keep)
  amax = np.max(np.abs(w), axis=reduce, keepdims=True)
  scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
  return q, np.squeeze(scale, axis=reduce)


def dequantize(q, scale, keep: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """The weight an int8 one stands for: q * scale, the scale broadcast over the dims not kept
  (what the model computes inside its compiled step, layers.weight)."""
  scale = jnp.expand_dims(jnp.asarray(scale, dtype), [i for i in range(q.ndim) if i not in keep])
  return jnp.asarray(q, dtype) * scale


def quantize_params(params: dict, stacked: bool) -> dict:
  """A float parameter tree -> the tree of the same model with `quant="int8"`.

  `stacked`: layers are scanned, so every leaf under "layers" has a leading layer axis.
  """

  def walk(tree, in_layers):
    out = {}
    for name, value in tree.items():
      if isinstance(value, dict):
        out[name] = walk(value, in_layers or name == "layers")
      elif name in QUANTIZED:
        keep = QUANTIZED[name]
        if in_layers and stacked:  # the layer axis is kept too: one scale per layer and channel
          keep = (0, *(i + 1 for i in keep))
        out[name], out[f"{name}_scale"] = quantize_int8(np.asarray(value), keep)
      else:
        out[name] = value
    return out

  return walk(params, False)


def to_int8(model) -> tuple:
  """A loaded float model -> (its int8 config, its int8 parameters on the host)."""
  cfg = model.config
  if cfg.quant != "none":
    raise ValueError(f"the model is already quantized (quant={cfg.quant!r})")
  if cfg.prompt_tokens:
    raise ValueError("a prompt-tuned model is not quantized here")
  params = quantize_params(jax.tree.map(np.asarray, model.params), cfg.scan_layers)
  return cfg.replace(quant="int8"), params
