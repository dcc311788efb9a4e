"""Rows of token examples: packing whole examples into rows, length buckets, loss columns."""

from __future__ import annotations

import numpy as np

Rows = dict[str, np.ndarray]  # arrays with one leading row axis


def _first_fit(lengths: list[int], order, capacity: int) -> list[tuple[int, int]]:
  """(example, row) pairs: each example, in `order`, goes to the first row with room for it.

  A max-tree over the rows' free room finds that row in O(log rows); rows past the last used
  one are empty, so the first of them is taken when no used row has room.
  """
  size = 1 << max(len(order) - 1, 0).bit_length()  # leaves: at least one row per example
  room = [capacity] * (2 * size)  # node k has children 2k, 2k + 1; leaves at size + row
  placed = []
  for i in order:
    node = 1
    while node < size:
      node = 2 * node if room[2 * node] >= lengths[i] else 2 * node + 1
    room[node] -= lengths[i]
    placed.append((int(i), node - size))
    node //= 2
    while node:
      room[node] = max(room[2 * node], room[2 * node + 1])
      node //= 2
  return placed


def pack_examples(rows: Rows, shards: int, capacity: int, slots: int = 0) -> Rows:
  """A batch of one-example rows -> the same examples packed whole into rows of `capacity`
  tokens (at least the longest example), each keeping its own segment id and positions, then
  cut to a bucket length. An example of several segments (a preference pair: chosen, then
  rejected) keeps them, numbered after those already in its row.

  The batch splits into `shards` equal groups (one per batch shard, in order), packed apart
  (first-fit, longest first) into as many rows as the fullest group needs, so every shard holds
  its own examples and all have one shape. Per-example arrays (a classifier's `last`, `labels`,
  `example_weights`) become [rows, K], K = `slots` or else the most examples any row holds;
  empty slots weigh 0.
  """
  n = len(rows["inputs"])
  per = n // shards
  lengths = row_lengths(rows)
  placements = []
  for g in range(shards):
    members = np.arange(g * per, (g + 1) * per)
    order = members[np.argsort(-lengths[members], kind="stable")]
    placements.append(_first_fit(lengths.tolist(), order, capacity))
  r = max(row for placed in placements for _, row in placed) + 1
  tokens = [k for k in rows if k in TOKEN_KEYS]
  out = {k: np.zeros((shards * r, capacity), rows[k].dtype) for k in tokens}
  k_slots = slots or max(int(np.bincount([row for _, row in p]).max()) for p in placements)
  out.update(
    {k: np.zeros((shards * r, k_slots), v.dtype) for k, v in rows.items() if k not in tokens}
  )
  for g, placed in enumerate(placements):
    used, count, segments = np.zeros(r, int), np.zeros(r, int), np.zeros(r, int)
    for i, row in placed:
      o, start, j = g * r + row, used[row], count[row]
      end = start + lengths[i]
      for k in tokens:
        out[k][o, start:end] = rows[k][i, : lengths[i]]
      out["segment_ids"][o, start:end] += segments[row]  # the example's own, after the row's
      for k in out.keys() - tokens:
        out[k][o, j] = rows[k][i, 0] + (start if k == "last" else 0)
      used[row], count[row] = end, j + 1
      segments[row] += rows["segment_ids"][i].max()
  return cut_to_bucket(out, used_length(out["segment_ids"]))


def bucket_length(n: int, seq_len: int) -> int:
  """The shortest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them) that is >= n,
  at most seq_len."""
  length = 16
  while length < n:
    length = length * 3 // 2 if length & (length - 1) == 0 else length * 4 // 3
  return min(length, seq_len)


TOKEN_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")  # [rows, seq_len]


def used_length(segment_ids_NT: np.ndarray) -> int:
  """How many leading columns hold a token in any row (rows are right-padded)."""
  columns = np.flatnonzero(segment_ids_NT.any(axis=0))
  return int(columns[-1]) + 1 if len(columns) else 0


def cut_to_bucket(batch: Rows, used: int) -> Rows:
  """The batch with its token arrays cut to bucket_length(used)."""
  length = bucket_length(used, batch["inputs"].shape[1])
  return {k: v[:, :length] if k in TOKEN_KEYS else v for k, v in batch.items()}


def loss_slots(weights_NT: np.ndarray) -> int:
  """How many columns `loss_at` keeps per row: the bucket of the most weighted tokens any row
  holds (0: every column, when that bucket is the whole row)."""
  t = weights_NT.shape[1]
  n = bucket_length(int((weights_NT > 0).sum(axis=1).max(initial=1)), t)
  return 0 if n >= t else n


def with_loss_at(batch: Rows, n: int) -> Rows:
  """SFT rows plus `loss_at` [rows, n]: each row's weighted columns first, in order, then
  unweighted ones (weight 0). The LM head and the loss then run on those n columns alone
  (steps.forward): a short completion after a long prompt no longer pays the vocabulary
  matmul at every prompt token. n = 0 leaves the batch as it is."""
  if not n:
    return batch
  at = np.argsort(batch["weights"] <= 0, axis=1, kind="stable")[:, :n]
  return {**batch, "loss_at": at.astype(np.int32)}


def row_lengths(rows: Rows) -> np.ndarray:
  """Tokens in each row."""
  return (rows["segment_ids"] != 0).sum(axis=1)


def by_length(rows: Rows) -> np.ndarray:
  """Row indices, shortest row first (stable): batches of similar lengths bucket tightly."""
  return np.argsort(row_lengths(rows), kind="stable")


def take_rows(rows: Rows, indices) -> Rows:
  return {k: v[indices] for k, v in rows.items()}
