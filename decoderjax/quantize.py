"""Weight-only int8 or int4 copy of a model directory, for cheaper inference.

  python -m decoderjax.quantize --checkpoint=MODEL_DIR --output=QUANT_DIR --mode=int8
  python -m decoderjax.quantize --checkpoint=MODEL_DIR --output=QUANT_DIR --mode=int4 \
      [--group_size=64] [--calibration_text=FILE]

What is quantized and how: decoderjax/model/int_weights.py. The output loads in generate,
evaluate and predict like any model directory.
"""

from __future__ import annotations

import jax
from absl import flags

from decoderjax import cli
from decoderjax.checkpoints import modeldir
from decoderjax.model import calibration, int_weights

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the quantized model directory.")
_MODE = flags.DEFINE_string("mode", "int8", f"One of {int_weights.MODES}.")
_GROUP = flags.DEFINE_integer("group_size", 64, "int4: inputs sharing one scale (even).")
_CALIBRATION = flags.DEFINE_string(
  "calibration_text", None, "int4: a plain-text sample of the model's domain for GPTQ."
)
_CALIBRATION_TOKENS = flags.DEFINE_integer("calibration_tokens", 16384, "Tokens of it to use.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Calibration row length (at most the context).")
flags.mark_flags_as_required(["checkpoint", "output"])


def main(argv):
  del argv
  if _MODE.value not in int_weights.MODES:
    raise ValueError(f"--mode must be one of {int_weights.MODES}, got {_MODE.value!r}")
  if flags.FLAGS["group_size"].present and _MODE.value != "int4":
    raise ValueError("--group_size applies to --mode=int4; int8 keeps a scale per output channel")
  calibrate = None
  if _CALIBRATION.value:
    if _MODE.value != "int4":
      raise ValueError("--calibration_text is for --mode=int4 (GPTQ); int8 rounds to nearest")
    with open(_CALIBRATION.value) as f:
      text = f.read()

    def calibrate(model):
      seq_len = min(_SEQ_LEN.value, model.config.max_seq_len)
      rows = calibration.text_rows(model, text, _CALIBRATION_TOKENS.value, seq_len)
      print(f"calibrating on {rows.size:,} tokens of {_CALIBRATION.value}", flush=True)
      return calibration.input_grams(model, rows)

  transform = int_weights.quantizer(_MODE.value, _GROUP.value, calibrate)
  model = modeldir.export_model_dir(_CHECKPOINT.value, _OUTPUT.value, transform)
  written = modeldir.abstract_params(modeldir.read_config(_OUTPUT.value))  # shapes, no weights
  before, after = _nbytes(model.params), _nbytes(written)
  print(f"wrote {_OUTPUT.value}: weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


if __name__ == "__main__":
  cli.run(main)
