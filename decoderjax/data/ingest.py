"""Corpus -> prepared token shards (token_store.py), streamed, in worker processes, resumable.

Each unit of the input (sources.py) becomes one shard, written atomically by whichever worker
takes it, so the output is the same for any number of workers or hosts and an interrupted run
continues with the units that have no committed shard. Hosts split the units round-robin; the
one that finds every shard committed writes the manifest (its content is the same whoever
writes it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator

from decoderjax.data import sources, token_store
from decoderjax.data.tokenizer import (
  SENTENCEPIECE_KINDS,
  Tokenizer,
  build_tokenizer,
  load_tokenizer,
)
from decoderjax.runtime.progress import Progress

SPEC = "prepare.json"
BATCH_CHARS = 1 << 20  # text handed to the tokenizer's batch call at a time
TRAINED_KINDS = ("char", *SENTENCEPIECE_KINDS)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  inputs: str  # comma-separated globs, or tfds:NAME:SPLIT
  text_field: str = "text"  # JSONL field / Parquet column / TFDS feature
  tokenizer: str = "byte"  # char, byte, sentencepiece (spm_bpe), spm_unigram, hf
  tokenizer_path: str = ""  # an existing .model / tokenizer.json / saved tokenizer folder
  vocab_size: int = 0  # for SentencePiece training
  tokenizer_sample_mb: float = 20.0  # text a SentencePiece model is trained on, spread over units
  chunk_mb: float = 16.0  # input per shard (a unit of work)
  tfds_data_dir: str = ""
  format: str = "text"  # how a file whose name says no format (.jsonl, .parquet, ...) is read


def prepare(
  cfg: PrepareConfig,
  output: str,
  workers: int = 1,
  process_index: int = 0,
  process_count: int = 1,
  tokenizer: Tokenizer | None = None,
  quiet: bool = False,
) -> dict | None:
  """Prepares `cfg.inputs` into `output`; returns the manifest, or None while other hosts'
  shards are still missing. `tokenizer` (a model's) replaces the one the config names."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  units = _plan(cfg)
  os.makedirs(os.path.join(output, token_store.SHARDS), exist_ok=True)
  _check_spec(output, cfg, units, tokenizer)
  if os.path.exists(os.path.join(output, token_store.MANIFEST)):
    return token_store.read_manifest(output)
  tok = _tokenizer(cfg, output, units, tokenizer, process_index)
  dtype = token_store.token_dtype(tok.vocab_size)
  mine = units[process_index::process_count]
  todo = [u for u in mine if token_store.shard_record(output, u.name) is None]
  total = sum(u.size for u in mine)
  bar = None if quiet else Progress(total, f"prepare {os.path.basename(output.rstrip('/'))}")
  done = total - sum(u.size for u in todo)
  if bar and len(todo) < len(mine):
    print(
      f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already written", file=sys.stderr
    )
  jobs = [(u, output, cfg.text_field, dtype.str, cfg.tfds_data_dir) for u in todo]
  for unit in _run(jobs, workers):
    done += unit.size
    if bar:
      bar.update(done)
  if bar:
    bar.close()
  return _finish(output, cfg, units, tok, dtype)


def _plan(cfg: PrepareConfig) -> list[sources.Unit]:
  return sources.plan_units(
    cfg.inputs, int(cfg.chunk_mb * (1 << 20)), cfg.tfds_data_dir, cfg.format
  )


def _run(jobs, workers: int) -> Iterator[sources.Unit]:
  if workers <= 1 or len(jobs) <= 1:
    for job in jobs:
      yield _prepare_unit(job)
    return
  # spawn: the caller may have started threads (JAX, tokenizers) that fork would not carry over
  context = multiprocessing.get_context("spawn")
  with context.Pool(min(workers, len(jobs)), initializer=_serial_tokenizers) as pool:
    yield from pool.imap_unordered(_prepare_unit, jobs)


def _serial_tokenizers() -> None:
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers share cores


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _prepare_unit(job) -> sources.Unit:
  unit, output, text_field, dtype, tfds_data_dir = job
  if output not in _WORKER_TOKENIZERS:
    _WORKER_TOKENIZERS[output] = load_tokenizer(os.path.join(output, token_store.TOKENIZER))
  tok = _WORKER_TOKENIZERS[output]
  writer = token_store.ShardWriter(output, unit.name, dtype)
  try:
    texts, ends, chars, nonblank = [], [], 0, False
    for text, end in sources.read_unit(unit, text_field, tfds_data_dir):
      texts.append(text)
      ends.append(end)
      chars += len(text)
      nonblank = nonblank or bool(text.strip())
      if chars >= BATCH_CHARS:
        writer.add(*tok.encode_flat(texts), ends, tok.eos_id)
        texts, ends, chars = [], [], 0
    writer.add(*tok.encode_flat(texts), ends, tok.eos_id)
    writer.commit({**dataclasses.asdict(unit), "nonblank": nonblank})
  except BaseException:
    writer.abort()
    raise
  return unit


def _spec(cfg: PrepareConfig, units, tokenizer: Tokenizer | None) -> dict:
  files = sorted({u.path for u in units if u.kind != sources.TFDS})
  return {
    "config": dataclasses.asdict(cfg),
    "tokenizer_given": tokenizer.fingerprint() if tokenizer is not None else None,
    "units": [dataclasses.asdict(u) for u in units],
    "files": [[p, os.path.getsize(p)] for p in files],
  }


def _check_spec(output: str, cfg: PrepareConfig, units, tokenizer) -> None:
  """Refuses an output directory prepared from other inputs or settings; records ours."""
  spec = _spec(cfg, units, tokenizer)
  path = os.path.join(output, SPEC)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != spec:
      changed = sorted(k for k in spec if old.get(k) != spec[k])
      raise ValueError(
        f"{output} was prepared from other inputs or settings ({', '.join(changed)} differ); "
        "use a new --output"
      )
    return
  token_store.write_atomic(path, json.dumps(spec, indent=1, sort_keys=True).encode())


def _tokenizer(cfg: PrepareConfig, output: str, units, given, process_index: int) -> Tokenizer:
  """The output's tokenizer: saved there once (trained by process 0 if it must be trained)."""
  target = os.path.join(output, token_store.TOKENIZER)
  if not os.path.exists(target):
    if given is None and cfg.tokenizer in TRAINED_KINDS and process_index:
      _wait_for(target)
    else:
      tok = given or _build(cfg, units)
      staging = f"{target}.{os.getpid()}.tmp"
      shutil.rmtree(staging, ignore_errors=True)
      tok.save(staging)
      try:
        os.replace(staging, target)
      except OSError:  # another host saved the same tokenizer first
        shutil.rmtree(staging, ignore_errors=True)
  return load_tokenizer(target)


def _wait_for(target: str, timeout_s: float = 3600.0) -> None:
  print(f"waiting for process 0 to train the tokenizer into {target}", file=sys.stderr)
  start = time.monotonic()
  while not os.path.exists(target):
    if time.monotonic() - start > timeout_s:
      raise TimeoutError(f"no tokenizer appeared in {target} after {timeout_s:.0f} s")
    time.sleep(2.0)


def _build(cfg: PrepareConfig, units) -> Tokenizer:
  path = cfg.tokenizer_path
  if path and os.path.isdir(path):
    return load_tokenizer(path)
  if cfg.tokenizer in SENTENCEPIECE_KINDS and not path:
    if cfg.vocab_size <= 0:
      raise ValueError(f"tokenizer={cfg.tokenizer!r} is trained here and needs a vocab_size > 0")
    texts = _sample(units, cfg, int(cfg.tokenizer_sample_mb * (1 << 20)))
  else:  # char: the alphabet of the whole corpus; byte / hf / a given model: no text needed
    texts = (t for u in units for t, _ in sources.read_unit(u, cfg.text_field, cfg.tfds_data_dir))
  return build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, path)


def _sample(units, cfg: PrepareConfig, budget: int) -> Iterator[str]:
  """About `budget` characters of text, the start of every unit in equal shares."""
  share = max(budget // max(len(units), 1), 1)
  for unit in units:
    taken = 0
    for text, _ in sources.read_unit(unit, cfg.text_field, cfg.tfds_data_dir):
      yield text[: share - taken]
      taken += len(text)
      if taken >= share:
        break


def _finish(output: str, cfg: PrepareConfig, units, tok: Tokenizer, dtype) -> dict | None:
  """Writes the manifest once every unit's shard is committed (by any host)."""
  records = [token_store.shard_record(output, u.name, verify=False) for u in units]
  missing = sum(r is None for r in records)
  if missing:
    print(
      f"{missing} shards of other processes still missing; the last one writes the manifest",
      file=sys.stderr,
    )
    return None
  if not any(r["unit"]["nonblank"] for r in records):
    raise ValueError(f"{cfg.inputs!r} holds no text")
  manifest = {
    "format": token_store.FORMAT,
    "dtype": dtype.name,
    "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint()},
    "eos_id": tok.eos_id,
    "inputs": cfg.inputs,
    "text_field": cfg.text_field,
    "tokens": sum(r["tokens"] for r in records),
    "documents": sum(r["documents"] for r in records),
    "shards": [
      {"name": u.name, "tokens": r["tokens"], "documents": r["documents"], "sha256": r["sha256"]}
      for u, r in zip(units, records, strict=True)
    ],
  }
  text = json.dumps(manifest, indent=1, sort_keys=True).encode()
  token_store.write_atomic(os.path.join(output, token_store.MANIFEST), text)
  return manifest


def cache_key(cfg: PrepareConfig, tokenizer: Tokenizer | None) -> str:
  """A name for the prepared cache of `cfg`'s inputs: changes when a file or setting does."""
  units = _plan(cfg)
  spec = _spec(cfg, units, tokenizer)
  spec["mtimes"] = [os.stat(p).st_mtime_ns for p, _ in spec["files"]]
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
