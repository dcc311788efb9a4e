"""How fast a train step's matmuls can run here: independent products against a dependent chain.

  python benchmarks/matmul_chain.py
  python benchmarks/matmul_chain.py --rows=768 --width=128 --layers=4 --repeats=5

Two measurements at one model shape (default: nanoGPT's CPU recipe, 12 x 64 rows, width 128,
MLP 4x), float32:
- `independent`: every projection product of one train step (q/k/v, o, up and down of each layer;
  forward, input gradient and weight gradient), none waiting for another, in one jit, and the
  same products in PyTorch. Their FLOPs are the step's matmul FLOPs.
- `chain`: an MLP stack where each product waits for the one before, as in a forward or backward
  pass, and the same rows split into 2 and 4 independent chains in one program.

Prints one line per measurement (median ms and GFLOP/s over the repeats) and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _median_seconds(fn, repeats: int, calls: int = 10) -> float:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      fn()
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def step_products(rows: int, width: int, layers: int, seed: int = 0):
  """(inputs, weights, output gradients) of every projection of a GPT-2 block stack, numpy."""
  import numpy as np

  shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
  rng = np.random.default_rng(seed)
  xs = [rng.standard_normal((rows, i), np.float32) for i, _ in shapes]
  gs = [rng.standard_normal((rows, o), np.float32) for _, o in shapes]
  ws = [[rng.standard_normal((i, o), np.float32) * 0.05 for i, o in shapes] for _ in range(layers)]
  flops = 3 * sum(2 * rows * i * o for i, o in shapes) * layers
  return xs, ws, gs, flops


def all_products(xs, ws, gs, matmul, transpose, square_sum):
  """Forward, input-gradient and weight-gradient products of every layer's projections; each
  result feeds a sum of squares so no product can be simplified away."""
  total = 0.0
  for layer in ws:
    for x, w, g in zip(xs, layer, gs, strict=True):
      total = total + square_sum(matmul(x, w))  # forward
      total = total + square_sum(matmul(g, transpose(w)))  # input gradient
      total = total + square_sum(matmul(transpose(x), g))  # weight gradient
  return total


def independent_xla(xs, ws, gs, repeats: int) -> float:
  import jax
  import jax.numpy as jnp

  fn = jax.jit(
    lambda xs, ws, gs: all_products(xs, ws, gs, jnp.matmul, jnp.transpose, lambda y: (y * y).sum())
  )
  args = jax.tree.map(jnp.asarray, (xs, ws, gs))
  return _median_seconds(lambda: fn(*args).block_until_ready(), repeats)


def independent_torch(xs, ws, gs, repeats: int) -> float:
  import torch

  args = [[torch.from_numpy(a) for a in xs], [[torch.from_numpy(w) for w in layer] for layer in ws]]
  args.append([torch.from_numpy(a) for a in gs])

  def run():
    float(all_products(*args, torch.matmul, torch.t, lambda y: (y * y).sum()))

  with torch.no_grad():
    return _median_seconds(run, repeats)


def chain_xla(rows: int, width: int, depth: int, lanes: int, repeats: int) -> tuple[float, int]:
  """(seconds, FLOPs) of `depth` MLP layers, each product waiting for the one before, with the
  rows split into `lanes` independent chains in one program."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(1)
  w_in = [rng.standard_normal((width, 4 * width), np.float32) * 0.05 for _ in range(depth)]
  w_out = [rng.standard_normal((4 * width, width), np.float32) * 0.05 for _ in range(depth)]
  w_in, w_out = [jnp.asarray(w) for w in w_in], [jnp.asarray(w) for w in w_out]
  x = jnp.asarray(rng.standard_normal((rows, width), np.float32))

  def chain(h):
    for a, b in zip(w_in, w_out, strict=True):
      h = jnp.tanh(h @ a) @ b
    return h

  fn = jax.jit(lambda x: jnp.concatenate([chain(part) for part in jnp.split(x, lanes)]))
  flops = depth * 2 * 2 * rows * width * 4 * width
  return _median_seconds(lambda: fn(x).block_until_ready(), repeats), flops


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=768, help="batch x sequence")
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--chain_depth", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch measurement")
  args = parser.parse_args()

  results = {}
  xs, ws, gs, flops = step_products(args.rows, args.width, args.layers)
  runs = [("independent, XLA", independent_xla)]
  if not args.no_torch:
    runs.append(("independent, PyTorch", independent_torch))
  for name, fn in runs:
    seconds = fn(xs, ws, gs, args.repeats)
    results[name] = {"ms": seconds * 1e3, "gflops": flops / seconds / 1e9}
  for lanes in (1, 2, 4):
    seconds, chain_flops = chain_xla(args.rows, args.width, args.chain_depth, lanes, args.repeats)
    results[f"chain, XLA, {lanes} lane(s)"] = {
      "ms": seconds * 1e3,
      "gflops": chain_flops / seconds / 1e9,
    }
  print(f"one step's projection products: {flops / 1e9:.2f} GFLOP")
  for name, r in results.items():
    print(f"{name}: {r['ms']:.2f} ms, {r['gflops']:.0f} GFLOP/s")
  print(json.dumps({"step_gflop": flops / 1e9, **results}))


if __name__ == "__main__":
  main()
