"""Prepared corpora: the prepare binary, token shards, resume, formats, bad input."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from decoderjax.data import data_config, ingest, pipeline, sources, token_store
from decoderjax.data.permutation import Permutation
from decoderjax.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, load_tokenizer

LINE = "now is the winter of our discontent "
RECORDS = [{"text": f"Record {i}: " + LINE * (i % 7 + 1)} for i in range(300)]


def prepare_cli(*args):
  command = [sys.executable, "-m", "decoderjax.prepare", *args]
  return subprocess.run(command, capture_output=True, text=True, timeout=300)


def tree_digest(directory) -> dict:
  """sha256 of every file under a prepared directory, by relative path."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("in") / "records.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  return str(path)


def test_permutation_is_a_bijection_for_every_size():
  for n in (1, 2, 3, 5, 64, 1000, 4097):
    values = Permutation(n, (7, 1))(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
  a, b = Permutation(1000, (0, 1))(np.arange(1000)), Permutation(1000, (0, 2))(np.arange(1000))
  assert (a != b).mean() > 0.9  # another key, another order
  big = Permutation(10**10, (3,))
  np.testing.assert_array_equal(big([5, 10**9]), [big([5])[0], big([10**9])[0]])


def test_shards_hold_every_document_with_eos_and_read_across_shard_ends(tmp_path, jsonl_file):
  cfg = ingest.PrepareConfig(inputs=jsonl_file, tokenizer="byte", chunk_mb=0.004)
  manifest = ingest.prepare(cfg, str(tmp_path), quiet=True)
  assert len(manifest["shards"]) > 3 and manifest["documents"] == len(RECORDS)
  assert manifest["dtype"] == "uint16"
  tok = ByteTokenizer()
  expected = np.concatenate([tok.encode(r["text"]) + [tok.eos_id] for r in RECORDS])
  store = token_store.TokenStore(str(tmp_path))
  assert len(store) == manifest["tokens"] == len(expected)
  np.testing.assert_array_equal(store[:], expected)
  cut = manifest["shards"][0]["tokens"]  # a read spanning two shards
  np.testing.assert_array_equal(store.read(cut - 5, cut + 7), expected[cut - 5 : cut + 7])
  ends = np.fromfile(os.path.join(tmp_path, "shards", "00000-00000.docs"), np.int64)
  assert (store[:][ends[0] - 1], ends[0]) == (tok.eos_id, len(tok.encode(RECORDS[0]["text"])) + 1)


def test_output_is_the_same_for_any_worker_count_and_after_an_interruption(tmp_path, monkeypatch):
  text = tmp_path / "in.txt"
  text.write_text(
    "".join(f"line {i} of the play, and more words to fill it\n" for i in range(4000))
  )
  cfg = ingest.PrepareConfig(inputs=str(text), tokenizer="char", chunk_mb=0.02)
  ingest.prepare(cfg, str(tmp_path / "one"), workers=1, quiet=True)
  ingest.prepare(cfg, str(tmp_path / "two"), workers=2, quiet=True)
  reference = tree_digest(tmp_path / "one")
  assert len([k for k in reference if k.endswith(".tokens")]) > 5
  assert tree_digest(tmp_path / "two") == reference

  calls = {"n": 0}
  real = ingest._prepare_unit

  def dies_after_three(job):
    calls["n"] += 1
    if calls["n"] > 3:
      raise KeyboardInterrupt  # as a kill between two shards
    return real(job)

  monkeypatch.setattr(ingest, "_prepare_unit", dies_after_three)
  with pytest.raises(KeyboardInterrupt):
    ingest.prepare(cfg, str(tmp_path / "cut"), quiet=True)
  monkeypatch.setattr(ingest, "_prepare_unit", real)
  left = os.listdir(tmp_path / "cut" / "shards")
  assert len([n for n in left if n.endswith(".json")]) == 3 and not os.path.exists(
    tmp_path / "cut" / "manifest.json"
  )
  # A SIGKILL mid-write leaves a temporary file behind; the rerun ignores and replaces it.
  (tmp_path / "cut" / "shards" / "00000-00004.tokens.999.tmp").write_bytes(b"\x00" * 10)
  os.remove(tmp_path / "cut" / "shards" / "00000-00001.docs")  # a damaged shard is redone
  ingest.prepare(cfg, str(tmp_path / "cut"), quiet=True)
  again = {k: v for k, v in tree_digest(tmp_path / "cut").items() if not k.endswith(".tmp")}
  assert again == reference


def test_a_prepare_killed_halfway_and_rerun_writes_the_same_shards(tmp_path, shakespeare_text):
  corpus = tmp_path / "big.txt"
  corpus.write_text(shakespeare_text * 24)  # ~27 MB: seconds of work, time to kill it
  args = (f"--input={corpus}", "--tokenizer=char", "--chunk_mb=0.5", "--workers=1")
  assert prepare_cli(*args, f"--output={tmp_path / 'whole'}").returncode == 0
  out = tmp_path / "killed"
  command = [sys.executable, "-m", "decoderjax.prepare", *args, f"--output={out}"]
  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    done = [n for n in os.listdir(out / "shards")] if (out / "shards").exists() else []
    if sum(n.endswith(".json") for n in done) >= 3:
      break
    time.sleep(0.005)
  proc.kill()  # SIGKILL: no clean-up of whatever it was writing
  assert proc.wait() == -9, "prepare finished before it could be killed"
  assert not (out / "manifest.json").exists()
  assert prepare_cli(*args, f"--output={out}").returncode == 0
  finished = {k: v for k, v in tree_digest(out).items() if ".tmp" not in k}
  assert finished == tree_digest(tmp_path / "whole")


@pytest.mark.parametrize("suffix", ["jsonl.gz", "jsonl.zst", "parquet"])
def test_compressed_jsonl_and_parquet_give_the_jsonl_tokens(tmp_path, jsonl_file, suffix):
  path = tmp_path / f"records.{suffix}"
  if suffix == "jsonl.gz":
    path.write_bytes(gzip.compress(open(jsonl_file, "rb").read()))
  elif suffix == "jsonl.zst":
    zstandard = pytest.importorskip("zstandard")
    path.write_bytes(zstandard.ZstdCompressor().compress(open(jsonl_file, "rb").read()))
  else:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(RECORDS))), "text": [r["text"] for r in RECORDS]})
    pq.write_table(table, str(path), row_group_size=70)  # five row groups: five units
  plain = ingest.prepare(
    ingest.PrepareConfig(inputs=jsonl_file), str(tmp_path / "plain"), quiet=True
  )
  other = ingest.prepare(
    ingest.PrepareConfig(inputs=str(path)), str(tmp_path / "other"), quiet=True
  )
  assert other["documents"] == plain["documents"] == len(RECORDS)
  if suffix == "parquet":
    assert len(other["shards"]) == 5
  a, b = (
    token_store.TokenStore(str(tmp_path / "plain")),
    token_store.TokenStore(str(tmp_path / "other")),
  )
  np.testing.assert_array_equal(a[:], b[:])


def test_vocabularies_past_uint16_are_stored_as_uint32(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {f"w{i}": i for i in range(70_000)}
  vocab["[UNK]"] = 70_000
  hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  (tmp_path / "tokenizer.json").write_text(hf.to_str())
  (tmp_path / "in.txt").write_text("w1 w69999 w65536 w7\n" * 10)
  cfg = ingest.PrepareConfig(
    inputs=str(tmp_path / "in.txt"), tokenizer="hf", tokenizer_path=str(tmp_path / "tokenizer.json")
  )
  manifest = ingest.prepare(cfg, str(tmp_path / "out"), quiet=True)
  assert manifest["dtype"] == "uint32"
  store = token_store.TokenStore(str(tmp_path / "out"))
  assert store[:4].tolist() == [1, 69999, 65536, 7]
  assert isinstance(load_tokenizer(str(tmp_path / "out" / "tokenizer")), HFTokenizer)


def test_sentencepiece_is_trained_on_a_bounded_sample(tmp_path, shakespeare_text):
  (tmp_path / "in.txt").write_text(shakespeare_text[:300_000])
  cfg = ingest.PrepareConfig(
    inputs=str(tmp_path / "in.txt"),
    tokenizer="sentencepiece",
    vocab_size=500,
    tokenizer_sample_mb=0.05,
    chunk_mb=0.1,
  )
  sample = "".join(ingest._sample(ingest._plan(cfg), cfg, 50_000))
  assert 45_000 <= len(sample) <= 50_000
  manifest = ingest.prepare(cfg, str(tmp_path / "out"), quiet=True)
  tok = load_tokenizer(str(tmp_path / "out" / "tokenizer"))
  assert tok.vocab_size == 500 and manifest["tokenizer"]["fingerprint"] == tok.fingerprint()
  assert manifest["tokens"] < 300_000 / 1.5  # subword tokens, not characters


def test_the_binary_prepares_resumes_and_verifies(tmp_path, jsonl_file):
  out = str(tmp_path / "out")
  args = f"--input={jsonl_file}", f"--output={out}", "--chunk_mb=0.01"
  first = prepare_cli(*args, "--workers=2")
  assert first.returncode == 0, first.stderr
  assert "300 documents" in first.stderr and "MB/s" in first.stderr  # summary and progress
  assert prepare_cli(*args).returncode == 0  # already prepared: nothing to do
  check = prepare_cli(f"--output={out}", "--verify")
  assert check.returncode == 0 and "ok" in check.stdout


def test_hosts_prepare_their_own_shards_of_one_directory(tmp_path, jsonl_file):
  cfg = ingest.PrepareConfig(inputs=jsonl_file, chunk_mb=0.004)
  single = ingest.prepare(cfg, str(tmp_path / "single"), quiet=True)
  shared = str(tmp_path / "shared")
  assert ingest.prepare(cfg, shared, process_index=1, process_count=3, quiet=True) is None
  assert ingest.prepare(cfg, shared, process_index=0, process_count=3, quiet=True) is None
  last = ingest.prepare(cfg, shared, process_index=2, process_count=3, quiet=True)
  assert last == single and tree_digest(shared) == tree_digest(tmp_path / "single")


@pytest.mark.parametrize(
  "setup, args, message",
  [
    ("empty", ["--input={d}/empty.txt"], "holds no text"),
    (None, ["--input={d}/nothing*.jsonl"], "no file matches"),
    ("badjson", ["--input={d}/bad.jsonl"], "bad.jsonl:3: not a JSON line"),
    ("nofield", ["--input={d}/nofield.jsonl"], "nofield.jsonl:2: JSON record has no field 'text'"),
    ("parquet", ["--input={d}/t.parquet"], "no column 'text'; it has ['body']"),
    (None, ["--input={d}/x.txt", "--tokenizer=sentencepiece"], "needs a vocab_size > 0"),
    ("prepared", ["--input={d}/x.txt", "--tokenizer=char"], "prepared from other inputs"),
  ],
)
def test_bad_input_is_one_line_error_and_leaves_prepared_data_alone(tmp_path, setup, args, message):
  d = tmp_path
  (d / "x.txt").write_text("some text\n")
  (d / "empty.txt").write_text("  \n\n")
  (d / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
  (d / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  if setup == "parquet":
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), str(d / "t.parquet"))
  out = str(d / "out")
  if setup == "prepared":  # an existing directory, prepared from other settings
    assert prepare_cli(f"--input={d}/x.txt", f"--output={out}").returncode == 0
  before = tree_digest(out) if os.path.exists(out) else None
  result = prepare_cli(*[a.format(d=d) for a in args], f"--output={out}")
  assert result.returncode == 1, result.stderr
  assert message in result.stderr and "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and result.stderr.strip().endswith(errors[0])
  if before is not None:
    assert tree_digest(out) == before


def test_truncated_and_corrupted_shards_are_caught(tmp_path, jsonl_file):
  ingest.prepare(ingest.PrepareConfig(inputs=jsonl_file), str(tmp_path), quiet=True)
  tokens = tmp_path / "shards" / "00000-00000.tokens"
  raw = bytearray(tokens.read_bytes())
  raw[100] ^= 0xFF
  tokens.write_bytes(bytes(raw))  # same size: only the checksum sees it
  bad = prepare_cli(f"--output={tmp_path}", "--verify")
  assert bad.returncode == 1 and "checksum differs" in bad.stderr
  tokens.write_bytes(bytes(raw[:-10]))
  with pytest.raises(token_store.CorpusError, match="truncated"):
    token_store.TokenStore(str(tmp_path))


def test_a_directory_of_another_tokenizer_than_the_model_is_refused(tmp_path, jsonl_file):
  ingest.prepare(ingest.PrepareConfig(inputs=jsonl_file), str(tmp_path), quiet=True)
  cfg = data_config.DataConfig(source="prepared", path=str(tmp_path), tokenizer="byte", seq_len=16)
  assert pipeline.load_dataset(cfg, "").tokenizer.kind == "byte"
  with pytest.raises(ValueError, match="prepared with another tokenizer"):
    pipeline.load_dataset(cfg, "", tokenizer=CharTokenizer("abc"))
  with pytest.raises(ValueError, match="holds byte tokens, but data.tokenizer='char'"):
    pipeline.load_dataset(data_config.DataConfig(source="prepared", path=str(tmp_path)), "")


def test_unit_plan_cuts_text_at_line_ends(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("".join(f"{i:04d} abcdefghij\n" for i in range(1000)))
  units = sources.plan_units(str(path), 1000)
  assert len(units) > 10 and units[-1].stop == os.path.getsize(path)
  raw = path.read_bytes()
  assert all(raw[u.stop - 1 : u.stop] == b"\n" for u in units)
  pieces = [t for u in units for t, _ in sources.read_unit(u, "text")]
  assert "".join(pieces) == path.read_text()


def test_a_files_name_decides_its_format_and_format_covers_the_rest(tmp_path):
  for name in ("a.txt", "b.jsonl", "c.data", "d.jsonl.gz"):
    (tmp_path / name).write_bytes(b"")
  kinds = lambda fmt: {  # noqa: E731
    os.path.basename(u.path): u.kind for u in sources.plan_units(f"{tmp_path}/*", 1 << 20, fmt=fmt)
  }
  expected = {"a.txt": "text", "b.jsonl": "jsonl", "c.data": "text", "d.jsonl.gz": "jsonl"}
  assert kinds("text") == expected
  assert kinds("jsonl")["c.data"] == "jsonl" and kinds("jsonl")["a.txt"] == "text"
  with pytest.raises(ValueError, match="unknown input format 'csv'"):
    sources.plan_units(f"{tmp_path}/*", 1 << 20, fmt="csv")
