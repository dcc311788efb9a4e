"""Stateless pseudo-random permutations of range(n): index -> value in O(1), no array of n.

A keyed Feistel network permutes the integers below the next even power of two at least n;
values that land at or above n are mapped again (cycle walking) until they fall below n, which
keeps it a permutation of range(n). Levanter shuffles its token cache the same way, so an epoch
over billions of windows costs no memory and any step's batch is computed directly.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer: a cheap bijective hash of 64-bit words (wrapping arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


class Permutation:
  """`perm(indices)` maps an array of indices in range(n) to their places in the permutation
  keyed by `key` (a tuple of non-negative integers)."""

  def __init__(self, n: int, key: tuple[int, ...]):
    if n <= 0:
      raise ValueError(f"a permutation needs n > 0, got {n}")
    self.n = n
    bits = max(2, (n - 1).bit_length())
    self.half = np.uint64((bits + 1) // 2)
    self.mask = np.uint64((1 << int(self.half)) - 1)
    seed = np.random.SeedSequence(list(key))
    self.keys = seed.generate_state(ROUNDS, np.uint64)

  def _encrypt(self, x: np.ndarray) -> np.ndarray:
    left, right = x >> self.half, x & self.mask
    for k in self.keys:
      left, right = right, left ^ (_mix(right ^ k) & self.mask)
    return (left << self.half) | right

  def __call__(self, indices) -> np.ndarray:
    x = np.array(indices, dtype=np.uint64, ndmin=1)
    if x.size and int(x.max()) >= self.n:
      raise IndexError(f"index {int(x.max())} is outside range({self.n})")
    x = self._encrypt(x)
    outside = x >= self.n
    while outside.any():
      x[outside] = self._encrypt(x[outside])
      outside = x >= self.n
    return x.astype(np.int64)
