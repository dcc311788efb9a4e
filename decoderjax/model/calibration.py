"""Calibration for quantization: what each projection of a model sees on a sample of text.

`input_grams` runs the float model over the text and returns, for every projection of every
layer, the Gram matrix X^T X of its inputs (layers.record_inputs), which GPTQ
(quant.gptq_int4) uses to round each weight where its error costs the outputs least. They are
held for all layers at once, float32: layers x (4 d^2 + f^2) x 4 bytes (SmolLM2-135M 0.44 GB,
a Llama-2-7B shape 24 GB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.model.decoder import Decoder

ATTENTION = {"q": "in", "k": "kv", "v": "kv", "o": "o"}  # weight -> the Gram of its inputs
MLP = {"up": "in", "gate": "in", "down": "down"}


def text_rows(model, text: str, tokens: int, seq_len: int) -> np.ndarray:
  """The first `tokens` tokens of `text` as [N, seq_len] rows (the tail that fills none dropped)."""
  ids = model.tokenizer.encode(text)
  n = min(len(ids), tokens) // seq_len
  if n == 0:
    raise ValueError(f"calibration text has {len(ids)} tokens; it needs at least seq_len={seq_len}")
  return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


def input_grams(model, rows_NT: np.ndarray, batch: int = 4) -> dict:
  """{path of each projection: Gram matrix [(L,) I, I] of its inputs, summed over the rows}."""
  cfg = model.config

  @jax.jit
  def grams(params, tokens_BT):
    _, state = Decoder(cfg).apply({"params": params}, tokens_BT, mutable=["intermediates"])
    return jax.tree.map(lambda x: x.astype(jnp.float32), state["intermediates"])

  total = None
  for start in range(0, len(rows_NT), batch):
    part = jax.device_get(grams(model.params, rows_NT[start : start + batch]))
    total = part if total is None else jax.tree.map(np.add, total, part)
  return _by_weight(total)


def _by_weight(tree: dict) -> dict:
  """Sown {"in_gram": (g,), "o_gram": (g,), ...} of each module -> {weight name: g}."""
  out = {}
  for key, value in tree.items():
    if key.endswith("_gram"):
      continue
    out[key] = _by_weight(value)
  sown = {key[: -len("_gram")]: value[0] for key, value in tree.items() if key.endswith("_gram")}
  if sown:
    for name, source in (ATTENTION if "o" in sown else MLP).items():
      if source in sown:
        out[name] = sown[source]
  return out
