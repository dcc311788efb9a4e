"""Scores a model: python -m decoderjax.evaluate --checkpoint=DIR (--text_file=F | --data_path=F).

A language model on --text_file: the token count, mean next-token loss and perplexity over the
whole file. On --data_path (JSONL {"prompt", "completion"} or chat records): the loss over the
completion tokens only. A classifier on --data_path (JSONL or CSV {"text", "label"}):
accuracy, macro-F1, the example count and the mean loss.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
from absl import flags

from decoderjax import cli, data, metrics, modeldir, sharding, tasks
from decoderjax.steps import LossConfig, eval_step

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "Plain-text file to score.")
_DATA_PATH = flags.DEFINE_string(
  "data_path", None, "Records to score: classification {text, label} or SFT {prompt, completion}."
)
_SEQ_LEN = flags.DEFINE_integer(
  "seq_len", 0, "Window / row length (0: the training data.seq_len, else max_seq_len)."
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the result JSON here.")
_MESH = cli.define_mesh_flags()
flags.mark_flag_as_required("checkpoint")


def row_length(model, meta: dict) -> int:
  """Rows as long as in training (config.json "seq_len"), else as the model allows."""
  room = model.config.text_len
  return min(_SEQ_LEN.value or meta.get("seq_len") or room, room)


def score(model, batches, mesh) -> dict:
  """Loss over batches (and a classifier's accuracy / macro-F1)."""
  step = jax.jit(lambda p, b: eval_step(p, b, cfg=model.config, loss_cfg=LossConfig()))
  with sharding.activate(mesh):
    outputs = ((jax.device_get(step(model.params, batch)), batch) for batch in batches)
    totals = metrics.eval_totals(outputs, model.config.num_labels)
  weight, loss = totals.pop("weight"), totals["loss"]
  if not weight:
    raise ValueError("nothing to score: no tokens or examples")
  if model.config.num_labels:
    return totals
  return {"tokens": int(weight), "loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def main(argv):
  del argv
  if (_TEXT_FILE.value is None) == (_DATA_PATH.value is None):
    raise ValueError("give exactly one of --text_file (plain text) or --data_path (records)")
  mesh = _MESH()
  model = modeldir.load_model_dir(_CHECKPOINT.value, mesh)
  meta = model.metadata
  tok, seq_len = model.tokenizer, row_length(model, meta)
  fields = dataclasses.replace(data.DataConfig(), **meta.get("data_fields", {}))
  if model.config.num_labels:
    if _DATA_PATH.value is None:
      raise ValueError(f"{_CHECKPOINT.value} is a classifier: give --data_path=RECORDS")
    records = tasks.read_records(_DATA_PATH.value)
    rows = tasks.classify_rows(records, tok, fields, seq_len, model.labels)
    result = score(model, tasks.row_batches(rows, _BATCH.value), mesh)
  elif _DATA_PATH.value is not None:
    records = tasks.read_records(_DATA_PATH.value)
    template = model.generation.get("chat_template")
    examples = [tasks.sft_example(r, tok, fields, template, f"{p}:{n}") for p, n, r in records]
    rows, _ = tasks.pack_sft(examples, seq_len, False, 0)
    result = {**score(model, tasks.row_batches(rows, _BATCH.value), mesh)}
    result["examples"] = len(examples)
  else:
    with open(_TEXT_FILE.value, encoding="utf-8") as f:
      tokens = data.tokenize_stream([f.read()], tok)
    seq_len = min(_SEQ_LEN.value or model.config.max_seq_len, len(tokens) - 1)
    if seq_len < 1:
      raise ValueError(f"{_TEXT_FILE.value} has too few tokens to score")
    result = score(model, data.eval_batches(tokens, seq_len, _BATCH.value, tok.eos_id), mesh)
  print(json.dumps(result))
  if _OUTPUT_JSON.value:
    cli.write_json(_OUTPUT_JSON.value, result)


if __name__ == "__main__":
  cli.run(main)
