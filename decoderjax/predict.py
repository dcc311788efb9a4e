"""Labels texts with a classifier: python -m decoderjax.predict --checkpoint=DIR --text=...

Texts come from --text (repeatable) or --input_file (one per line, or JSONL/CSV records with a
"text" field). Prints one line per text, `label<TAB>probability<TAB>text`; --output_json
writes [{"text", "label", "probability", "probabilities": {label: p}}].
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags

from decoderjax import cli
from decoderjax.checkpoints import modeldir
from decoderjax.data import examples, records, tasks
from decoderjax.data import rows as rows_lib
from decoderjax.runtime import sharding
from decoderjax.training.steps import forward, pooled_logits

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A classifier's model directory or workdir.")
_TEXT = flags.DEFINE_multi_string("text", None, "A text to label; repeatable.")
_INPUT_FILE = flags.DEFINE_string("input_file", None, "Texts: lines, or JSONL / CSV records.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "The records' text field.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Texts per batch.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the predictions here.")
_MESH = cli.define_mesh_flags()
flags.mark_flag_as_required("checkpoint")


def read_texts() -> list[tuple[str, str]]:
  """(text, where) pairs from --text and --input_file."""
  texts = [(t, f"--text #{i + 1}") for i, t in enumerate(_TEXT.value or [])]
  path = _INPUT_FILE.value
  if path and path.endswith((".jsonl", ".json", ".csv")):
    for file, line, record in records.read_records(path):
      if _TEXT_FIELD.value not in record:
        raise ValueError(f"{file}:{line}: no field {_TEXT_FIELD.value!r}")
      texts.append((str(record[_TEXT_FIELD.value]), f"{file}:{line}"))
  elif path:
    with open(path, encoding="utf-8") as f:
      texts += [(line.rstrip("\n"), f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]
  if not texts:
    raise ValueError("give --text=TEXT or --input_file=FILE")
  return texts


def main(argv):
  del argv
  mesh = _MESH()
  model = modeldir.load_model_dir(_CHECKPOINT.value, mesh)
  meta = model.metadata
  if not model.config.num_labels:
    raise ValueError(f"{_CHECKPOINT.value} is not a classifier (no labels)")
  texts = read_texts()
  room = model.config.text_len
  rows, _ = examples.text_rows(texts, model.tokenizer, min(meta.get("seq_len") or room, room))
  cfg = model.config
  probs_fn = jax.jit(
    lambda p, b: jax.nn.softmax(pooled_logits(forward(p, cfg, b, None, True), b["last"]), -1)
  )
  order = rows_lib.by_length(rows)  # similar lengths batch together, each batch cut to its bucket
  probs = np.zeros((len(texts), cfg.num_labels), np.float32)
  done = 0
  with sharding.activate(mesh):
    for batch in tasks.row_batches(rows_lib.take_rows(rows, order), _BATCH.value, 0, True):
      picked = order[done : done + len(batch["inputs"])]  # the last batch's padding left out
      probs[picked] = np.asarray(probs_fn(model.params, batch))[: len(picked), 0]
      done += len(picked)
  results = []
  for (text, _), p in zip(texts, probs, strict=True):
    best = int(np.argmax(p))
    results.append(
      {
        "text": text,
        "label": model.labels[best],
        "probability": float(p[best]),
        "probabilities": {name: float(x) for name, x in zip(model.labels, p, strict=True)},
      }
    )
    print(f"{model.labels[best]}\t{p[best]:.4f}\t{text}", flush=True)
  if _OUTPUT_JSON.value:
    cli.write_json(_OUTPUT_JSON.value, results)


if __name__ == "__main__":
  cli.run(main)
