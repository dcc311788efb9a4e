"""Tokenizes a corpus once into token shards: prepare --input=GLOB --output=DIR.

  python -m decoderjax.prepare --input='data/*.jsonl.zst' --output=/data/web --tokenizer=byte
  python -m decoderjax.train --config=configs/gpt2_124m.py --workdir=/tmp/run \
    --config.data.source=prepared --config.data.path=/data/web --config.data.tokenizer=byte

Inputs: plain text (a file is a document), JSONL (a line is a document; .gz / .zst too), Parquet
(a row is a document) and TFDS splits (--input=tfds:NAME:SPLIT). Re-running the same command
continues an interrupted run; several hosts share the work with --process_index/--process_count
(or SLURM's / Open MPI's variables), each writing its own shards of one output directory.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from decoderjax import cli
from decoderjax.data import ingest, sources, token_store

_INPUT = flags.DEFINE_string("input", None, "Comma-separated globs, or tfds:NAME:SPLIT.")
_OUTPUT = flags.DEFINE_string("output", None, "The prepared directory to write (or --verify).")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer",
  "byte",
  "char, byte, sentencepiece (spm_bpe), spm_unigram or hf; or a saved tokenizer / model "
  "directory whose tokenizer to use (a model you will fine-tune).",
)
_TOKENIZER_PATH = flags.DEFINE_string(
  "tokenizer_path", "", "An existing .model (sentencepiece) or tokenizer.json (hf)."
)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 0, "Vocabulary of a SentencePiece model to train.")
_SAMPLE_MB = flags.DEFINE_float(
  "tokenizer_sample_mb", 20.0, "Text a SentencePiece model is trained on, spread over the input."
)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL field / Parquet column / feature.")
_FORMAT = flags.DEFINE_enum(
  "format", "text", sources.FORMATS, "How to read a file whose name says no format."
)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Tokenizing processes.")
_CHUNK_MB = flags.DEFINE_float("chunk_mb", 16.0, "Input per shard (one unit of work).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data directory.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", -1, "This host's index (multi-host).")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 0, "Hosts sharing the work (multi-host).")
_VERIFY = flags.DEFINE_bool("verify", False, "Check the checksums of an existing --output.")


def processes() -> tuple[int, int]:
  """(index, count) from the flags, else SLURM's or Open MPI's variables, else (0, 1)."""
  if _PROCESS_COUNT.value or _PROCESS_INDEX.value >= 0:
    if _PROCESS_COUNT.value <= 0 or _PROCESS_INDEX.value < 0:
      raise ValueError("give both --process_index and --process_count")
    return _PROCESS_INDEX.value, _PROCESS_COUNT.value
  for rank, size in (
    ("SLURM_PROCID", "SLURM_NTASKS"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
  ):
    if rank in os.environ and size in os.environ:
      return int(os.environ[rank]), int(os.environ[size])
  return 0, 1


def tokenizer_flags() -> tuple[str, str]:
  """(kind, path): --tokenizer=DIR means that directory's saved tokenizer."""
  kind, path = _TOKENIZER.value, _TOKENIZER_PATH.value
  if os.path.isdir(kind):
    if path:
      raise ValueError("--tokenizer=DIR already names the tokenizer; drop --tokenizer_path")
    inner = os.path.join(kind, token_store.TOKENIZER)
    return "saved", inner if os.path.isdir(inner) else kind
  return kind, path


def main(argv):
  del argv
  if _VERIFY.value:
    manifest = token_store.verify(_OUTPUT.value)
    print(f"{_OUTPUT.value}: {len(manifest['shards'])} shards, {manifest['tokens']:,} tokens, ok")
    return
  if not _INPUT.value:
    raise ValueError("--input is required (globs, or tfds:NAME:SPLIT)")
  kind, path = tokenizer_flags()
  cfg = ingest.PrepareConfig(
    inputs=_INPUT.value,
    text_field=_TEXT_FIELD.value,
    tokenizer=kind,
    tokenizer_path=path,
    vocab_size=_VOCAB_SIZE.value,
    tokenizer_sample_mb=_SAMPLE_MB.value,
    chunk_mb=_CHUNK_MB.value,
    tfds_data_dir=_TFDS_DATA_DIR.value,
    format=_FORMAT.value,
  )
  index, count = processes()
  start = time.perf_counter()
  manifest = ingest.prepare(cfg, _OUTPUT.value, _WORKERS.value, index, count)
  seconds = time.perf_counter() - start
  if manifest is not None:
    print(
      f"{_OUTPUT.value}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
      f"({manifest['dtype']}) in {len(manifest['shards'])} shards, {seconds:.1f} s",
      file=sys.stderr,
    )


if __name__ == "__main__":
  flags.mark_flags_as_required(["output"])
  cli.run(main, compiles=False)
