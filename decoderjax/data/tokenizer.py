"""Tokenizers behind one small interface: char, byte, SentencePiece and HF `tokenizers`.

Every tokenizer saves itself into a folder (a model directory's `tokenizer/`) with a
`tokenizer_config.json` naming its kind, and `load_tokenizer` reads any of them back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable

import numpy as np

CONFIG_FILE = "tokenizer_config.json"
SENTENCEPIECE_KINDS = ("sentencepiece", "spm_bpe", "spm_unigram")  # data.tokenizer names


class Tokenizer:
  """encode/decode between text and ids; knows its vocabulary size and special ids."""

  kind: str = ""
  vocab_size: int
  eos_id: int | None = None
  bos_id: int | None = None

  @property
  def adds_bos(self) -> bool:
    """Whether the tokenizer's own library puts BOS before a text by default (`encode` never
    does): evaluation harnesses encode texts that way."""
    return False

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def token_text(self, token_id: int) -> str:
    """One token as its vocabulary spells it (special tokens too: "<|endoftext|>")."""
    return self.decode([token_id])

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids as an integer array (subclasses batch the work where their library can)."""
    return [np.asarray(self.encode(t), np.int32) for t in texts]

  def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(every text's ids, concatenated; each text's id count): one array for many texts."""
    arrays = self.encode_batch(texts)
    lengths = np.asarray([len(a) for a in arrays], np.int64)
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.int32)), lengths

  def fingerprint(self) -> str:
    """A hash of everything that decides the ids: equal fingerprints tokenize alike."""
    digest = hashlib.sha256(json.dumps([self.kind, self.vocab_size, self._config()]).encode())
    digest.update(self._payload())
    return digest.hexdigest()[:16]

  def _payload(self) -> bytes:
    return b""

  def _config(self) -> dict:
    return {}

  def _save_files(self, directory: str) -> None:
    del directory

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self._save_files(directory)
    config = {"kind": self.kind, "vocab_size": self.vocab_size, **self._config()}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)


class CharTokenizer(Tokenizer):
  """One id per character of a fixed alphabet (nanoGPT's char model), then an EOS id."""

  kind = "char"

  def __init__(self, chars: str):
    self.chars = chars
    self.index = {c: i for i, c in enumerate(chars)}
    self.eos_id = len(chars)
    self.vocab_size = len(chars) + 1

  @classmethod
  def train(cls, texts: Iterable[str]) -> CharTokenizer:
    return cls("".join(sorted(set().union(*(set(t) for t in texts)))))

  def encode(self, text: str) -> list[int]:
    try:
      return [self.index[c] for c in text]
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the char tokenizer's alphabet") from None

  def decode(self, ids: Iterable[int]) -> str:
    return "".join(self.chars[i] for i in ids if 0 <= i < len(self.chars))

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    codes = np.fromiter((ord(c) for c in self.chars), np.int64, len(self.chars))
    order = np.argsort(codes)
    out = []
    for text in texts:
      points = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
      at = np.minimum(np.searchsorted(codes[order], points), len(codes) - 1)
      unknown = codes[order][at] != points
      if unknown.any():
        self.encode(chr(points[np.argmax(unknown)]))  # raises, naming the character
      out.append(order[at].astype(np.int32))
    return out

  def _config(self) -> dict:
    return {"chars": self.chars}


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, then EOS (256) and BOS (257)."""

  kind = "byte"
  eos_id = 256
  bos_id = 257
  vocab_size = 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    flat, lengths = self.encode_flat(texts)
    return np.split(flat, np.cumsum(lengths[:-1])) if len(texts) else []

  def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [t.encode("utf-8") for t in texts]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return np.frombuffer(b"".join(encoded), np.uint8), lengths


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model: trained here (BPE / unigram) or loaded from a `.model` file."""

  kind = "sentencepiece"
  FILE = "tokenizer.model"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm

    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.sp.get_piece_size()
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

  @classmethod
  def from_file(cls, path: str) -> SentencePieceTokenizer:
    with open(path, "rb") as f:
      return cls(f.read())

  @classmethod
  def train(
    cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe"
  ) -> SentencePieceTokenizer:
    import sentencepiece as spm

    lines = (line for text in texts for line in text.splitlines() if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
      sentence_iterator=lines,
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=True,  # never an unknown token: unseen characters fall back to bytes
      character_coverage=1.0,
      pad_id=-1,
      unk_id=0,
      bos_id=1,
      eos_id=2,
      split_digits=True,
      remove_extra_whitespaces=False,
      normalization_rule_name="identity",
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
    )
    return cls(model.getvalue())

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.sp.encode(texts)]

  def _payload(self) -> bytes:
    return self.model_proto

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_text(self, token_id: int) -> str:
    return self.sp.id_to_piece(token_id)

  def _save_files(self, directory: str) -> None:
    with open(os.path.join(directory, self.FILE), "wb") as f:
      f.write(self.model_proto)


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (fast tokenizers), as converted models bring along."""

  kind = "hf"
  FILE = "tokenizer.json"

  def __init__(self, json_text: str, eos_id: int | None = None, bos_id: int | None = None):
    try:
      from tokenizers import Tokenizer as _Tokenizer
    except ImportError:
      raise ImportError("HF tokenizers need `pip install decoderjax[convert]`") from None
    self.json_text = json_text
    self.tok = _Tokenizer.from_str(json_text)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = eos_id if eos_id is not None else self._first_of(self.EOS_NAMES)
    self.bos_id = bos_id if bos_id is not None else self._first_of(self.BOS_NAMES)

  EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
  BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")

  def _first_of(self, names) -> int | None:
    """The id of the first conventional special token the vocabulary has."""
    for name in names:
      token_id = self.tok.token_to_id(name)
      if token_id is not None:
        return token_id
    return None

  @property
  def adds_bos(self) -> bool:
    """tokenizer.json's post-processor prepends BOS (Llama's TemplateProcessing does)."""
    if self.bos_id is None:
      return False
    plain, special = (self.tok.encode("a", add_special_tokens=s).ids for s in (False, True))
    return special[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encodings = self.tok.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def _payload(self) -> bytes:
    return self.json_text.encode()

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_text(self, token_id: int) -> str:
    return self.tok.id_to_token(token_id)

  def _config(self) -> dict:
    return {"eos_id": self.eos_id, "bos_id": self.bos_id}

  def _save_files(self, directory: str) -> None:
    with open(os.path.join(directory, self.FILE), "w") as f:
      f.write(self.json_text)


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads back any tokenizer written by `Tokenizer.save`."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer in {directory} (missing {CONFIG_FILE})")
  with open(path) as f:
    config = json.load(f)
  kind = config["kind"]
  if kind == "char":
    return CharTokenizer(config["chars"])
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    return SentencePieceTokenizer.from_file(os.path.join(directory, SentencePieceTokenizer.FILE))
  if kind == "hf":
    with open(os.path.join(directory, HFTokenizer.FILE)) as f:
      return HFTokenizer(f.read(), config.get("eos_id"), config.get("bos_id"))
  raise ValueError(f"{path}: unknown tokenizer kind {kind!r}")


def build_tokenizer(kind: str, texts: list[str], vocab_size: int = 0, path: str = ""):
  """Makes the tokenizer a data config asks for: trained on `texts` or loaded from `path`."""
  if kind == "char":
    return CharTokenizer.train(texts)
  if kind == "byte":
    return ByteTokenizer()
  if kind in SENTENCEPIECE_KINDS:
    if path:
      return SentencePieceTokenizer.from_file(path)
    model_type = "unigram" if kind == "spm_unigram" else "bpe"
    return SentencePieceTokenizer.train(texts, vocab_size, model_type)
  if kind == "hf":
    if not path:
      raise ValueError("data.tokenizer='hf' needs data.tokenizer_path=PATH/tokenizer.json")
    with open(path) as f:
      return HFTokenizer(f.read())
  raise ValueError(f"data.tokenizer: unknown kind {kind!r} (char, byte, sentencepiece, hf)")
