"""Corpus inputs -> units of work, each read as a stream of document pieces.

A unit is the smallest part of the input that one worker tokenizes into one shard: a byte range
of a plain text or JSONL file (cut at a line end), a row group of a Parquet file, a whole
compressed file, or a range of examples of a TFDS split. Units are planned from the inputs alone
(sorted paths, file sizes, `chunk_bytes`), so the shards do not depend on how many workers or
hosts prepare them. Reading a unit yields `(text, ends_document)` pieces of bounded size.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator

TEXT, JSONL, PARQUET, TFDS = "text", "jsonl", "parquet", "tfds"
COMPRESSED = (".gz", ".zst", ".zstd")
PIECE_CHARS = 1 << 18  # a long document reaches the tokenizer in pieces cut at line ends


@dataclasses.dataclass(frozen=True)
class Unit:
  """One shard's worth of input. `start`/`stop` are bytes, row groups or examples by kind."""

  kind: str
  path: str  # a file, or for TFDS "name:split"
  start: int
  stop: int
  file_index: int
  part: int
  size: int  # bytes of input this unit stands for (progress)

  @property
  def name(self) -> str:
    return f"{self.file_index:05d}-{self.part:05d}"


def file_kind(path: str, unnamed: str = "text") -> str:
  """text, jsonl or parquet, from the name (a .gz / .zst suffix is looked through); a name that
  says none of them (.txt says text) is read as `unnamed`."""
  base = path
  for suffix in COMPRESSED:
    if base.endswith(suffix):
      base = base[: -len(suffix)]
  if base.endswith(".parquet"):
    return PARQUET
  if base.endswith((".jsonl", ".json", ".ndjson")):
    return JSONL
  return TEXT if base.endswith(".txt") else unnamed


def expand(inputs: str) -> list[str]:
  """Comma-separated globs -> sorted, de-duplicated paths; a glob matching nothing is an error."""
  paths = []
  for pattern in (p.strip() for p in inputs.split(",")):
    if not pattern:
      continue
    found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not found:
      raise FileNotFoundError(f"no file matches {pattern!r}")
    paths.extend(found)
  if not paths:
    raise ValueError("no input given")
  return sorted(dict.fromkeys(os.path.abspath(p) for p in paths))


FORMATS = (TEXT, JSONL, PARQUET)


def plan_units(inputs: str, chunk_bytes: int, tfds_data_dir: str = "", fmt=TEXT) -> list[Unit]:
  """The units of `inputs`: comma-separated globs, or `tfds:NAME[:SPLIT]`. A file is read by
  its name's format (.txt, .jsonl, .parquet, ...), else as `fmt`."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown input format {fmt!r}; known: {', '.join(FORMATS)}")
  if inputs.startswith("tfds:"):
    return _tfds_units(inputs[len("tfds:") :], chunk_bytes, tfds_data_dir)
  units = []
  for index, path in enumerate(expand(inputs)):
    kind, size = file_kind(path, fmt), os.path.getsize(path)
    if kind == PARQUET:
      units += _parquet_units(path, index, size)
    elif path.endswith(COMPRESSED):
      units.append(Unit(kind, path, 0, size, index, 0, size))
    else:
      for part, (start, stop) in enumerate(_line_ranges(path, size, chunk_bytes)):
        units.append(Unit(kind, path, start, stop, index, part, stop - start))
  return units


def _line_ranges(path: str, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
  """Byte ranges of about `chunk_bytes`, each ending just after a newline (or at the end)."""
  cuts, position = [0], 0
  with open(path, "rb") as f:
    while position + chunk_bytes < size:
      f.seek(position + chunk_bytes)
      tail = f.readline()
      position = f.tell() if tail else size
      if position >= size:
        break
      cuts.append(position)
  cuts.append(size)
  return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a] or [(0, 0)]


def _parquet_units(path: str, index: int, size: int) -> list[Unit]:
  pq = _pyarrow_parquet()
  groups = pq.ParquetFile(path).metadata.num_row_groups
  return [Unit(PARQUET, path, g, g + 1, index, g, size // max(groups, 1)) for g in range(groups)]


def _tfds_units(spec: str, chunk_bytes: int, data_dir: str) -> list[Unit]:
  name, _, split = spec.partition(":")
  split = split or "train"
  tfds = _tfds()
  info = tfds.builder(name, data_dir=data_dir or None).info
  if split not in info.splits:
    raise ValueError(f"tfds:{name} has no split {split!r}; it has {sorted(info.splits)}")
  n = info.splits[split].num_examples
  size = info.splits[split].num_bytes or n * 512
  per = max(1, int(n * chunk_bytes / max(size, 1)))
  return [
    Unit(TFDS, f"{name}:{split}", a, min(a + per, n), 0, p, size * (min(a + per, n) - a) // n)
    for p, a in enumerate(range(0, max(n, 1), per))
  ]


def read_unit(unit: Unit, text_field: str, tfds_data_dir: str = "") -> Iterator[tuple[str, bool]]:
  """The unit's text as `(piece, ends_document)`: a plain text file is one document, a JSONL
  line, Parquet row or TFDS example one each."""
  if unit.kind == PARQUET:
    yield from _read_parquet(unit, text_field)
  elif unit.kind == TFDS:
    yield from _read_tfds(unit, text_field, tfds_data_dir)
  elif unit.kind == JSONL:
    yield from _read_jsonl(unit, text_field)
  else:
    with _open_text(unit) as f:
      pending = ""
      for block in iter(lambda: f.read(PIECE_CHARS), ""):
        text = pending + block
        cut = text.rfind("\n") + 1 or len(text)
        pending = text[cut:]
        if cut:
          yield text[:cut], False
      last_range = unit.stop == os.path.getsize(unit.path) or unit.path.endswith(COMPRESSED)
      yield pending, last_range  # a text file's last unit ends its document


def _open_text(unit: Unit):
  """The unit's bytes decoded as UTF-8 (a line-aligned range, or a whole compressed file)."""
  if unit.path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(unit.path, "rb"), encoding="utf-8")
  if unit.path.endswith((".zst", ".zstd")):
    try:
      import zstandard
    except ImportError:
      raise ImportError(f"{unit.path}: .zst inputs need `pip install zstandard`") from None
    raw = zstandard.ZstdDecompressor().stream_reader(open(unit.path, "rb"), closefd=True)
    return io.TextIOWrapper(raw, encoding="utf-8")
  f = open(unit.path, "rb")
  f.seek(unit.start)
  return io.TextIOWrapper(_Limited(f, unit.stop - unit.start), encoding="utf-8")


class _Limited(io.RawIOBase):
  """The next `n` bytes of a binary file, as a file."""

  def __init__(self, f, n: int):
    self.f, self.left = f, n

  def readable(self):
    return True

  def readinto(self, buffer) -> int:
    data = self.f.read(min(len(buffer), self.left))
    self.left -= len(data)
    buffer[: len(data)] = data
    return len(data)

  def close(self):
    self.f.close()
    super().close()


def _read_jsonl(unit: Unit, field: str) -> Iterator[tuple[str, bool]]:
  with _open_text(unit) as f:
    for n, line in enumerate(f):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        where = _line_number(unit, n)
        raise ValueError(f"{unit.path}:{where}: not a JSON line ({e.msg})") from None
      if not isinstance(record, dict) or field not in record:
        where = _line_number(unit, n)
        raise ValueError(f"{unit.path}:{where}: JSON record has no field {field!r}")
      yield str(record[field]), True


def _line_number(unit: Unit, line_in_unit: int) -> int:
  """1-based line number in the file (counted only when an error needs it)."""
  if unit.start == 0:
    return line_in_unit + 1
  with open(unit.path, "rb") as f:
    before = f.read(unit.start).count(b"\n")
  return before + line_in_unit + 1


def _read_parquet(unit: Unit, field: str) -> Iterator[tuple[str, bool]]:
  pq = _pyarrow_parquet()
  f = pq.ParquetFile(unit.path)
  if field not in f.schema_arrow.names:
    raise ValueError(f"{unit.path}: no column {field!r}; it has {f.schema_arrow.names}")
  table = f.read_row_group(unit.start, columns=[field])
  for batch in table.to_batches(max_chunksize=1024):
    for text in batch.column(0).to_pylist():
      if text is not None:
        yield str(text), True


def _read_tfds(unit: Unit, field: str, data_dir: str) -> Iterator[tuple[str, bool]]:
  tfds = _tfds()
  name, _, split = unit.path.partition(":")
  ds = tfds.load(name, split=f"{split}[{unit.start}:{unit.stop}]", data_dir=data_dir or None)
  for example in tfds.as_numpy(ds):  # iterated, never listed whole
    if field not in example:
      raise ValueError(f"tfds:{name} examples have no feature {field!r}; they have {list(example)}")
    value = example[field]
    yield value.decode("utf-8") if isinstance(value, bytes) else str(value), True


def _pyarrow_parquet():
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError("Parquet inputs need `pip install pyarrow`") from None
  return pq


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError("TFDS inputs need `pip install decoderjax[tfds]`") from None
  return tfds
