"""Scores a model on text: python -m decoderjax.evaluate --checkpoint=DIR --text_file=F.

Reports the token count, mean next-token loss and perplexity over the whole file.
"""

from __future__ import annotations

import json
import math

import jax
from absl import flags

from decoderjax import cli, data, modeldir, sharding
from decoderjax.steps import LossConfig, eval_step

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "Plain-text file to score.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Window length (0: the model's max_seq_len).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per batch.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write {tokens, loss, perplexity} here.")
_MESH = cli.define_mesh_flags()
flags.mark_flags_as_required(["checkpoint", "text_file"])


def main(argv):
  del argv
  mesh = _MESH()
  model = modeldir.load_model_dir(_CHECKPOINT.value, mesh)
  with open(_TEXT_FILE.value, encoding="utf-8") as f:
    text = f.read()
  tokens = data.tokenize_stream([text], model.tokenizer)
  seq_len = min(_SEQ_LEN.value or model.config.max_seq_len, len(tokens) - 1)
  if seq_len < 1:
    raise ValueError(f"{_TEXT_FILE.value} has too few tokens to score")
  step = jax.jit(lambda p, b: eval_step(p, b, cfg=model.config, loss_cfg=LossConfig()))
  loss_sum = count = 0.0
  with sharding.activate(mesh):
    for batch in data.eval_batches(tokens, seq_len, _BATCH.value, model.tokenizer.eos_id):
      batch_loss, batch_weight = step(model.params, batch)
      loss_sum, count = loss_sum + float(batch_loss), count + float(batch_weight)
  loss = loss_sum / count
  result = {"tokens": int(count), "loss": loss, "perplexity": math.exp(loss)}
  print(json.dumps(result))
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
