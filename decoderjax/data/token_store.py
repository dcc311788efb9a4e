"""Prepared corpora on disk: token shards, their manifest, and reads by offset.

A prepared directory holds
  manifest.json          format, dtype, tokenizer fingerprint, counts, every shard's checksum
  tokenizer/             the tokenizer the tokens came from (tokenizer.load_tokenizer)
  shards/NAME.tokens     a flat array of token ids (uint16 when the vocabulary fits, else uint32),
                         each document's tokens followed by EOS where the tokenizer has one
  shards/NAME.docs       int64 end offset of each document within the shard
  shards/NAME.json       the shard's counts and checksums, written last (the shard's commit mark)
The shards in manifest order form one token stream. Reads go through `os.pread`, so a process
holds only the windows it asked for whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

FORMAT = "decoderjax-tokens/1"
MANIFEST = "manifest.json"
SHARDS = "shards"
TOKENIZER = "tokenizer"


class CorpusError(ValueError):
  """A prepared directory that cannot be read as it says."""


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def sha256_file(path: str, block: int = 1 << 22) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(block), b""):
      digest.update(chunk)
  return digest.hexdigest()


class ShardWriter:
  """Writes one shard under temporary names; `commit` renames it into place, record last."""

  def __init__(self, directory: str, name: str, dtype: np.dtype):
    self.base = os.path.join(directory, SHARDS, name)
    self.dtype, self.tokens, self.ends = dtype, 0, []
    self.suffix = f".{os.getpid()}.tmp"
    self.file = open(self.base + ".tokens" + self.suffix, "wb")
    self.digest = hashlib.sha256()

  def add(self, ids: np.ndarray, lengths: np.ndarray, ends_document, eos_id: int | None) -> None:
    """Appends pieces of text (`ids` concatenated, `lengths` each); EOS, where the tokenizer
    has one, follows each piece that ends a document."""
    ends = np.asarray(ends_document, bool)
    ids = ids.astype(self.dtype)
    if eos_id is not None:
      ids = np.insert(ids, np.cumsum(lengths)[ends], eos_id)
      lengths = lengths + ends
    self.ends.extend((self.tokens + np.cumsum(lengths, dtype=np.int64))[ends].tolist())
    data = ids.tobytes()
    self.file.write(data)
    self.digest.update(data)
    self.tokens += len(ids)

  def commit(self, unit: dict) -> dict:
    self.file.close()
    ends = np.asarray(self.ends, np.int64).tobytes()
    record = {
      "tokens": self.tokens,
      "documents": len(self.ends),
      "sha256": self.digest.hexdigest(),
      "docs_sha256": hashlib.sha256(ends).hexdigest(),
      "unit": unit,
    }
    write_atomic(self.base + ".docs", ends)
    os.replace(self.base + ".tokens" + self.suffix, self.base + ".tokens")
    write_atomic(self.base + ".json", json.dumps(record, sort_keys=True).encode())
    return record

  def abort(self) -> None:
    self.file.close()
    if os.path.exists(self.file.name):
      os.remove(self.file.name)


def shard_record(directory: str, name: str, verify: bool = True) -> dict | None:
  """The committed record of shard `name`, or None if it is missing or (verify) damaged."""
  base = os.path.join(directory, SHARDS, name)
  try:
    with open(base + ".json") as f:
      record = json.load(f)
    if not verify:
      return record
    if sha256_file(base + ".tokens") == record["sha256"] and (
      sha256_file(base + ".docs") == record["docs_sha256"]
    ):
      return record
  except (OSError, ValueError, KeyError):
    pass
  return None


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise CorpusError(
      f"{directory} is not a prepared corpus (no {MANIFEST}); "
      "make one with python -m decoderjax.prepare"
    )
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise CorpusError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def verify(directory: str) -> dict:
  """Checks every shard's checksums against the manifest; returns the manifest."""
  manifest = read_manifest(directory)
  for shard in manifest["shards"]:
    path = os.path.join(directory, SHARDS, shard["name"] + ".tokens")
    if not os.path.exists(path) or sha256_file(path) != shard["sha256"]:
      raise CorpusError(f"{path}: checksum differs from {MANIFEST} (corrupted shard)")
  return manifest


def contiguous(index: slice, n: int) -> tuple[int, int]:
  """(start, stop) of a step-1 slice of a stream of n tokens (stop >= start)."""
  if not isinstance(index, slice) or index.step not in (None, 1):
    raise TypeError("a token stream reads contiguous slices")
  start, stop, _ = index.indices(n)
  return start, max(start, stop)


class TokenStore:
  """The token stream of a prepared directory: `store[a:b]` reads tokens a..b-1 as int32.

  Opening checks each shard's size against the manifest (a truncated shard is an error at once);
  `verify` checks the checksums too.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.manifest = read_manifest(directory)
    self.dtype = np.dtype(self.manifest["dtype"])
    self.names = [s["name"] for s in self.manifest["shards"]]
    counts = [s["tokens"] for s in self.manifest["shards"]]
    self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    for name, count in zip(self.names, counts, strict=True):
      path = os.path.join(directory, SHARDS, name + ".tokens")
      try:
        size = os.path.getsize(path)
      except OSError:
        raise CorpusError(f"{path}: missing shard of {directory}") from None
      if size != count * self.dtype.itemsize:
        raise CorpusError(
          f"{path}: {size} bytes, the manifest says {count * self.dtype.itemsize} "
          "(truncated or overwritten shard)"
        )
    self._fds = {}

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _fd(self, shard: int) -> int:
    if shard not in self._fds:
      path = os.path.join(self.directory, SHARDS, self.names[shard] + ".tokens")
      self._fds[shard] = os.open(path, os.O_RDONLY)
    return self._fds[shard]

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the stream, across shard boundaries."""
    start, stop = max(0, start), min(stop, len(self))
    out = np.empty(max(stop - start, 0), self.dtype)
    shard = int(np.searchsorted(self.starts, start, side="right")) - 1
    done = 0
    while start + done < stop:
      begin = start + done - int(self.starts[shard])
      take = min(stop - start - done, int(self.starts[shard + 1]) - start - done)
      size = self.dtype.itemsize
      data = os.pread(self._fd(shard), take * size, begin * size)
      out[done : done + take] = np.frombuffer(data, self.dtype)
      done, shard = done + take, shard + 1
    return out.astype(np.int32)

  def __getitem__(self, index: slice) -> np.ndarray:
    return self.read(*contiguous(index, len(self)))

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds = {}

  def __getstate__(self):  # file descriptors do not travel to other processes
    return {**self.__dict__, "_fds": {}}


class TokenView:
  """Tokens [start, stop) of a store: the training or validation part of a stream."""

  def __init__(self, store: TokenStore, start: int = 0, stop: int | None = None):
    self.store, self.start = store, start
    self.stop = len(store) if stop is None else stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop = contiguous(index, len(self))
    return self.store.read(self.start + start, self.start + stop)
