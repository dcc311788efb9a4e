"""Packed fixed-length batches from token shards: step s's batch is a pure function of (seed, s)."""

from __future__ import annotations

import functools

import numpy as np

from decoderjax.data.augmentation import add_noise
from decoderjax.data.permutation import Permutation


def pack_window(window: np.ndarray, eos_id: int | None) -> dict[str, np.ndarray]:
  """Windows [B, T + 1] -> inputs, targets, segment ids, positions and loss weights [B, T]."""
  inputs, targets = window[:, :-1], window[:, 1:]
  b, t = inputs.shape
  if eos_id is None:
    segments = np.ones((b, t), np.int32)
  else:  # a new document starts after each EOS
    after_eos = np.concatenate([np.zeros((b, 1), bool), inputs[:, :-1] == eos_id], axis=1)
    segments = np.cumsum(after_eos, axis=1, dtype=np.int32) + 1
  starts = np.concatenate([np.ones((b, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  first = np.maximum.accumulate(np.where(starts, np.arange(t), 0), axis=1)
  # The EOS input's target is the next document's first token: nothing to learn there.
  weights = np.ones((b, t), np.float32) if eos_id is None else (inputs != eos_id).astype(np.float32)
  return {
    "inputs": inputs.astype(np.int32),
    "targets": targets.astype(np.int32),
    "segment_ids": segments,
    "positions": (np.arange(t) - first).astype(np.int32),
    "weights": weights,
  }


class Batches:
  """Deterministic training batches: batch(step) is a function of (seed, step) alone.

  Each epoch cuts the stream into windows at a fresh random offset and visits them in a fresh
  order (a stateless permutation: O(batch) work per step, whatever the stream's length). `rows`
  selects this host's rows of the global batch; `stream` keys the shuffle of one mixture source.
  """

  def __init__(
    self, tokens, seq_len, batch_size, seed, eos_id, rows: slice | None = None, noise=None,
    stream: int | None = None,
  ):  # fmt: skip
    self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
    self.seed, self.eos_id, self.noise = seed, eos_id, noise
    self.key = (seed,) if stream is None else (seed, stream)
    self.rows = rows or slice(0, batch_size)  # this host's rows of the global batch
    # Room for the largest offset: windows at offset + i * seq_len all end inside the stream.
    self.windows_per_epoch = max(1, (len(tokens) - 1 - seq_len) // seq_len)
    self.offsets = max(1, min(seq_len, len(tokens) - self.windows_per_epoch * seq_len))

  @functools.lru_cache(maxsize=4)  # noqa: B019 (a few epochs' keys; instances live for a run)
  def _epoch(self, epoch: int) -> tuple[int, Permutation]:
    offset = int(np.random.default_rng([*self.key, epoch]).integers(self.offsets))
    return offset, Permutation(self.windows_per_epoch, (*self.key, epoch))

  def window_starts(self, examples: np.ndarray) -> np.ndarray:
    """Token offsets of the windows of these example indices (example i of the whole run)."""
    epochs, within = np.divmod(np.asarray(examples, np.int64), self.windows_per_epoch)
    starts = np.empty(len(epochs), np.int64)
    for epoch in np.unique(epochs):
      offset, order = self._epoch(int(epoch))
      at = epochs == epoch
      starts[at] = offset + order(within[at]) * self.seq_len
    return starts

  def windows(self, examples: np.ndarray) -> np.ndarray:
    """[len(examples), seq_len + 1] token windows."""
    width = self.seq_len + 1
    out = np.empty((len(examples), width), np.int32)
    for r, start in enumerate(self.window_starts(examples)):
      out[r] = self.tokens[int(start) : int(start) + width]
    return out

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = np.arange(step * self.batch_size, (step + 1) * self.batch_size)[self.rows]
    batch = pack_window(self.windows(rows), self.eos_id)
    return add_noise(batch, self.noise, self.seed, step, range(self.batch_size)[self.rows])

  def tokens_seen(self, steps: int) -> dict[str, int]:
    del steps
    return {}  # one source: the logger's token count says it all


class MixtureSchedule:
  """Which source each row of the run reads, in fixed proportions, as a pure function.

  Rows come in blocks of `BLOCK` with one fixed pattern: position p goes to the source furthest
  behind its share of the first p + 1 rows (Megatron's blending rule), so every prefix of a
  block holds each source's share to within a row. Row g is source s's example j, counted per
  source; each source shuffles its own examples.
  """

  BLOCK = 4096

  def __init__(self, weights: list[float]):
    w = np.asarray(weights, np.float64)
    self.sources = np.empty(self.BLOCK, np.int64)  # position in block -> source
    self.ranks = np.empty(self.BLOCK, np.int64)  # position -> its index among that source's
    counts = np.zeros(len(w), np.int64)
    for p in range(self.BLOCK):
      s = int(np.argmax(w * (p + 1) - counts))
      self.sources[p], self.ranks[p] = s, counts[s]
      counts[s] += 1
    if (counts == 0).any():
      small = float(w[counts == 0].max())
      raise ValueError(
        f"data.mixture: a weight of {small:.2g} is below 1/{self.BLOCK} of the total"
      )
    self.counts = counts

  def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, example index within that source) of each global row index."""
    blocks, positions = np.divmod(np.asarray(rows, np.int64), self.BLOCK)
    source = self.sources[positions]
    return source, blocks * self.counts[source] + self.ranks[positions]

  def rows_per_source(self, rows: int) -> np.ndarray:
    """How many of the first `rows` rows each source gave."""
    full, part = divmod(rows, self.BLOCK)
    return full * self.counts + np.bincount(self.sources[:part], minlength=len(self.counts))


class MixtureBatches:
  """Training batches drawn from several sources (each a `Batches` over its own stream, whose
  epochs repeat independently) by a `MixtureSchedule`."""

  def __init__(
    self, sources: list[Batches], names, weights, batch_size, seed, rows=None, noise=None
  ):
    self.sources, self.names, self.batch_size = sources, names, batch_size
    self.seed, self.noise, self.seq_len = seed, noise, sources[0].seq_len
    self.eos_id = sources[0].eos_id
    self.rows = rows or slice(0, batch_size)
    self.schedule = MixtureSchedule(weights)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = np.arange(step * self.batch_size, (step + 1) * self.batch_size)[self.rows]
    source, example = self.schedule(rows)
    window = np.empty((len(rows), self.seq_len + 1), np.int32)
    for s, batches in enumerate(self.sources):
      at = source == s
      if at.any():
        window[at] = batches.windows(example[at])
    batch = pack_window(window, self.eos_id)
    return add_noise(batch, self.noise, self.seed, step, range(self.batch_size)[self.rows])

  def tokens_seen(self, steps: int) -> dict[str, int]:
    counts = self.schedule.rows_per_source(steps * self.batch_size) * self.seq_len
    return {f"tokens_seen/{n}": int(c) for n, c in zip(self.names, counts, strict=True)}


def window_batches(read, n: int, seq_len: int, batch_size: int, eos_id, max_batches: int = 0):
  """Batches of windows 0..n-1 (`read(indices) -> [len, seq_len + 1]`), the last one padded
  with zero-weight rows so every batch has one compiled shape; `max_batches` caps the count."""
  count = min(n, max_batches * batch_size) if max_batches else n
  for first in range(0, count, batch_size):
    indices = np.arange(first, min(first + batch_size, count))
    real = len(indices)
    batch = pack_window(read(np.pad(indices, (0, batch_size - real))), eos_id)
    batch["weights"][real:] = 0.0
    yield batch


def _consecutive(tokens, seq_len: int):
  """`read` for consecutive windows of a stream: window i starts at token i * seq_len."""
  return lambda indices: np.stack(
    [tokens[i * seq_len : i * seq_len + seq_len + 1] for i in indices]
  )


def eval_batches(tokens, seq_len, batch_size, eos_id, max_batches=0):
  """Consecutive validation windows (the whole split unless `max_batches` caps it)."""
  n = (len(tokens) - 1) // seq_len
  return window_batches(_consecutive(tokens, seq_len), n, seq_len, batch_size, eos_id, max_batches)


def mixture_eval_batches(vals, weights, seq_len, batch_size, eos_id, max_batches=0):
  """Validation windows of several sources in the mixture's proportions: the mixture's loss.

  Row g reads its source's next consecutive window, as the training schedule assigns rows;
  rows stop where the first source runs out of held-out windows."""
  schedule = MixtureSchedule(weights)
  available = np.asarray([(len(v) - 1) // seq_len for v in vals])
  n = int(min(available / np.asarray(weights)))
  source, example = schedule(np.arange(n))
  keep = example < available[source]
  source, example = source[keep], example[keep]
  reads = [_consecutive(v, seq_len) for v in vals]

  def read(indices):
    return np.concatenate([reads[source[i]]([example[i]]) for i in indices])

  return window_batches(read, len(source), seq_len, batch_size, eos_id, max_batches)
