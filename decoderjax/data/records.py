"""Fine-tuning records read from JSONL / JSON files, each with where it came from (file:line)."""

from __future__ import annotations

import csv
import glob
import json
import os

Record = tuple[str, int, dict]  # (file, line number, record)


def read_records(pattern: str) -> list[Record]:
  """(file, line, record) for every record in the files a glob matches: JSON lines or CSV."""
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise ValueError(f"no file matches {pattern!r}")
  records = [record for path in paths for record in _read_file(path)]
  if not records:
    raise ValueError(f"{pattern!r} holds no records")
  return records


def _read_file(path: str) -> list[Record]:
  with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
    if path.endswith(".csv"):
      reader = csv.DictReader(f)
      return [(path, reader.line_num, row) for row in reader]  # line_num: the row just read
    if path.endswith((".jsonl", ".json")):
      return [_json_record(path, n, line) for n, line in enumerate(f, 1) if line.strip()]
  raise ValueError(f"{path}: unknown data format (expected .jsonl, .json or .csv)")


def _json_record(path: str, n: int, line: str) -> Record:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{n}: not JSON ({e.msg}); expected one object per line") from None
  if not isinstance(record, dict):
    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
  return path, n, record


def record_field(record: dict, name: str, where: str):
  """A record's field `name`; an error naming `where` (file:line) when it has none."""
  value = record.get(name)
  if value is None:  # also a CSV row too short for its header
    raise ValueError(f"{where}: no field {name!r}")
  return value


def record_text(record: dict, name: str, where: str) -> str:
  value = record_field(record, name, where)
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
  return value
