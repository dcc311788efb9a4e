"""Weight-only quantization, for cheaper inference (the binary: decoderjax.quantize).

Every projection (q, k, v, o, MLP up / gate / down), the embedding table and an untied head
are stored in few bits; norms, biases and heads of classifiers stay in float.

int8  one float32 scale per output channel (per row for the embedding): symmetric, round to
      nearest, scale = max |w| / 127 over the channel.
int4  one float32 scale per group of `group` consecutive inputs of each output channel (of each
      row's features for the embedding): the group's larger side (positive or negative) maps to
      -8 (the scale takes the sign), the other side fits in [-8, 7] unclipped. Two values share
      a byte: the first half of a group in the low nibbles, the second half in the high ones.

`clip=True` (calibration) picks, for each channel or group, the scale among CLIP_RATIOS x the
plain one that minimizes the squared rounding error of its weights: clipping a few outliers buys
a finer step for all the rest.

The output is a model directory with `quant` in its config; `generate`, `evaluate` and
`predict` load it like any other, and the model dequantizes each weight inside the compiled step
(layers.weight), so the packed arrays are what stays in memory.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.runtime.progress import Progress

QUANTIZED = {  # weight name -> dims its scale keeps (output channels; rows of the table),
  # as the model declares it (layers.weight); the other dims, contiguous, are the inputs
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
MODES = ("int8", "int4")
TABLES = ("embedding", "head")  # int8 per row / channel even in int4 models


def mode_of(name: str, quant: str) -> str:
  """How weight `name` is stored in a model with `quant`: int4 models keep their tables int8."""
  return "int8" if quant == "int4" and name in TABLES else quant


def input_dims(ndim: int, keep) -> tuple[int, int]:
  """(first, end) of the input dims of a weight: those its scale does not keep."""
  dims = [i for i in range(ndim) if i not in keep]
  if dims != list(range(dims[0], dims[-1] + 1)):
    raise ValueError(f"input dims {dims} of a weight are not contiguous")
  return dims[0], dims[-1] + 1


def int4_shapes(shape, keep, group: int) -> tuple[tuple, tuple]:
  """Stored (packed, scale) shapes of an int4 weight of `shape`: its inputs I become
  [I / group, group / 2] bytes and [I / group] scales."""
  a, b = input_dims(len(shape), keep)
  n = math.prod(shape[a:b]) // group
  return (*shape[:a], n, group // 2, *shape[b:]), (*shape[:a], n, *shape[b:])


def int4_scale(w: np.ndarray, axis: int) -> np.ndarray:
  """Scales (keepdims) of int4 groups along `axis`: the larger side (positive or negative) maps
  to -8, the scale taking its sign; the other side then fits in [-8, 7] without clipping."""
  top = np.max(w, axis=axis, keepdims=True)
  bottom = -np.min(w, axis=axis, keepdims=True)
  scale = np.where(bottom >= top, np.maximum(bottom / 8, top / 7), -np.maximum(top / 8, bottom / 7))
  return np.where(scale != 0, scale, 1.0).astype(np.float32)


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
  """int4 values in [-8, 7] -> bytes: the first half along `axis` in the low nibbles."""
  low, high = (x.astype(np.int16) & 0xF for x in np.split(q, 2, axis=axis))
  return ((high << 4) | low).astype(np.uint8).view(np.int8)


def quantize_int8(w: np.ndarray, keep) -> tuple[np.ndarray, np.ndarray]:
  """w -> (q int8, scale float32 over the `keep` dims), with w ≈ q * scale (broadcast back)."""
  w = np.asarray(w, np.float32)
  reduce = tuple(i for i in range(w.ndim) if i not in keep)
  amax = np.max(np.abs(w), axis=reduce, keepdims=True)
  scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
  return q, np.squeeze(scale, axis=reduce)


def group_inputs(w: np.ndarray, keep, group: int, even: bool = False) -> tuple[np.ndarray, int]:
  """w [*pre, *inputs, *post] -> ([*pre, I / group, group, *post], the group axis)."""
  a, b = input_dims(w.ndim, keep)
  inputs = math.prod(w.shape[a:b])
  if group <= 0 or (even and group % 2) or inputs % group:
    raise ValueError(
      f"group size {group} must {'be even and ' if even else ''}divide the {inputs} inputs"
    )
  return w.reshape(*w.shape[:a], inputs // group, group, *w.shape[b:]), a + 1


def quantize_int4(w: np.ndarray, keep, group: int, gram=None) -> tuple[np.ndarray, np.ndarray]:
  """w -> (packed int8 bytes, scale float32), the shapes of int4_shapes: rounded to nearest, or
  with the Gram matrix [I, I] of a projection's inputs (its first dims) by GPTQ."""
  w = np.asarray(w, np.float32)
  grouped, axis = group_inputs(w, keep, group, even=True)
  if gram is None:
    scale = int4_scale(grouped, axis)
    q = np.clip(np.rint(grouped / scale), -8, 7).astype(np.int8)
  else:
    if axis != 1:
      raise ValueError("GPTQ takes a weight whose inputs are its first dims")
    q, scale = gptq_int4(w.reshape(gram.shape[0], -1), gram, group)
    q = q.reshape(grouped.shape)
    scale = scale.reshape(grouped.shape[0], 1, *grouped.shape[2:])
  return pack_int4(q, axis), np.squeeze(scale, axis=axis)


def dequantize(q, scale, keep, dtype=jnp.float32) -> jax.Array:
  """The weight an int8 one stands for: q * scale, the scale broadcast over the dims not kept
  (what the model computes inside its compiled step, layers.weight)."""
  scale = jnp.expand_dims(jnp.asarray(scale, dtype), [i for i in range(q.ndim) if i not in keep])
  return jnp.asarray(q, dtype) * scale


def dequantize_int4(packed, scale, shape, keep, dtype=jnp.float32) -> jax.Array:
  """The weight of `shape` an int4 one stands for (jnp: the model runs it in its step).

  Both nibbles come out of one broadcast shift ([..., n, 2, group / 2, ...], then merged), an
  elementwise loop XLA fuses and parallelizes; a concatenation of the halves ran about 3x
  slower per weight on CPU.
  """
  a, _ = input_dims(len(shape), keep)
  p = jnp.expand_dims(jnp.asarray(packed, jnp.int8), a + 1)
  shifts = jnp.array([4, 0], jnp.int8).reshape((1,) * (a + 1) + (2,) + (1,) * (p.ndim - a - 2))
  q = jnp.right_shift(jnp.left_shift(p, shifts), 4)  # arithmetic shifts sign-extend
  q = q.reshape(*packed.shape[: a + 1], -1, *packed.shape[a + 2 :])  # low halves, then high
  w = q.astype(dtype) * jnp.expand_dims(jnp.asarray(scale, dtype), a + 1)
  return w.reshape(shape)


def gptq_int4(w_IO: np.ndarray, gram_II: np.ndarray, group: int, damp: float = 0.01):
  """GPTQ (Frantar et al. 2022) of one matrix -> (int4 values [I, O] int8, scales [I/group, O]).

  Quantizes the inputs in order, each time spreading the rounding error over the inputs not yet
  quantized, as the inverse of the calibration Gram matrix X^T X of the matrix's inputs says
  minimizes the error of the layer's outputs. A group's scale is set (int4_scale) when its
  first input is reached, from the weights as updated so far.
  """
  i_dim = w_IO.shape[0]
  w = np.array(w_IO, np.float64)
  h = np.array(gram_II, np.float64)
  dead = np.diag(h) == 0  # inputs never active: nothing to preserve
  h[dead, dead] = 1.0
  w[dead] = 0.0
  h[np.diag_indices(i_dim)] += damp * np.mean(np.diag(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: the inverse Hessian's Cholesky factor
  q = np.zeros(w.shape, np.int8)
  scales = np.zeros((i_dim // group, w.shape[1]), np.float32)
  block = group * max(1, 128 // group)  # whole groups per block: scales see every update
  for start in range(0, i_dim, block):
    end = min(start + block, i_dim)
    errors = np.zeros((end - start, w.shape[1]))
    for r in range(start, end):
      if r % group == 0:
        scales[r // group] = int4_scale(w[r : r + group], 0)[0]
      d = scales[r // group].astype(np.float64)
      q[r] = np.clip(np.rint(w[r] / d), -8, 7)
      err = (w[r] - q[r] * d) / u[r, r]
      w[r + 1 : end] -= np.outer(u[r, r + 1 : end], err)
      errors[r - start] = err
    w[end:] -= u[start:end, end:].T @ errors
  return q, scales


def map_weights(params: dict, stacked: bool, names, fn, side: dict | None = None) -> dict:
  """A parameter tree with each leaf called one of `names` (weights of QUANTIZED) replaced by
  the leaves fn(name, w, keep, layered, side_leaf) returns ({leaf name: array}).

  `keep`: the dims QUANTIZED keeps, plus the layer axis where `layered` (scanned layers,
  `stacked`, lead every leaf under "layers" with it). `side`: a tree shaped like params
  (calibration statistics) whose leaf at the same path is passed along, None where absent.
  """

  def walk(tree, side, in_layers):
    out = {}
    for name, value in tree.items():
      if isinstance(value, dict):
        out[name] = walk(value, (side or {}).get(name), in_layers or name == "layers")
      elif name in names:
        keep, layered = QUANTIZED[name], in_layers and stacked
        if layered:
          keep = (0, *(i + 1 for i in keep))
        try:
          out.update(fn(name, np.asarray(value), keep, layered, (side or {}).get(name)))
        except ValueError as e:
          raise ValueError(f"{name}: {e}") from None
      else:
        out[name] = value
    return out

  return walk(params, side, False)


def quantize_params(
  params: dict,
  stacked: bool,
  mode: str = "int8",
  group: int = 64,
  grams: dict | None = None,
  progress=None,
) -> dict:
  """A float parameter tree -> the tree of the same model with `quant=mode`.

  `stacked`: layers are scanned, so every leaf under "layers" has a leading layer axis (one
  scale per layer and channel). `grams`: calibration (calibration.input_grams): for each int4
  projection, the Gram matrix of its inputs, by the projection's path; those are quantized by
  GPTQ, the rest to nearest. `progress(bytes)` hears of each weight quantized.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

  def quantize(name, w, keep, layered, gram):
    if mode_of(name, mode) == "int8":
      q, scale = quantize_int8(w, keep)
    elif gram is None:
      q, scale = quantize_int4(w, keep, group)
    elif layered:  # GPTQ one layer at a time
      pairs = [quantize_int4(x, QUANTIZED[name], group, h) for x, h in zip(w, gram, strict=True)]
      q, scale = (np.stack(x) for x in zip(*pairs, strict=True))
    else:
      q, scale = quantize_int4(w, keep, group, gram)
    if progress is not None:
      progress(w.nbytes)
    return {name: q, f"{name}_scale": scale}

  return map_weights(params, stacked, QUANTIZED, quantize, grams)


def quantizer(mode: str, group: int = 64, calibrate=None):
  """`transform(model) -> (config, params)` quantizing a loaded float model on the host.

  `calibrate(model) -> grams` (calibration.input_grams over a text) turns on GPTQ for int4.
  """

  def transform(model) -> tuple:
    cfg = model.config
    if cfg.quant != "none":
      raise ValueError(f"the model is already quantized (quant={cfg.quant!r})")
    if cfg.prompt_tokens:
      raise ValueError("a prompt-tuned model is not quantized here")
    grams = calibrate(model) if calibrate and mode == "int4" else None
    params = jax.tree.map(np.asarray, model.params)
    sizes = []  # the bytes of the weights to quantize, for the bar
    map_weights(params, cfg.scan_layers, QUANTIZED, lambda _, w, *__: sizes.append(w.nbytes) or {})
    bar = Progress(sum(sizes), f"quantize {mode}")
    params = quantize_params(params, cfg.scan_layers, mode, group, grams, bar.advance)
    bar.close()
    return cfg.replace(quant=mode, quant_group=group if mode == "int4" else 0), params

  return transform
