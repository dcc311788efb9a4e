"""Weight-only int8 copy of a model directory, for cheaper inference.

  python -m decoderjax.quantize --checkpoint=MODEL_DIR --output=QUANT_DIR --mode=int8

What is quantized and how: decoderjax/quant.py. The output loads in generate, evaluate and
predict like any model directory.
"""

from __future__ import annotations

import jax
from absl import flags

from decoderjax import cli, modeldir, quant

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the quantized model directory.")
_MODE = flags.DEFINE_string("mode", "int8", f"One of {quant.MODES}.")
flags.mark_flags_as_required(["checkpoint", "output"])


def main(argv):
  del argv
  if _MODE.value not in quant.MODES:
    raise ValueError(f"--mode must be one of {quant.MODES}, got {_MODE.value!r}")
  model = modeldir.export_model_dir(_CHECKPOINT.value, _OUTPUT.value, quant.to_int8)
  written = modeldir.abstract_params(modeldir.read_config(_OUTPUT.value))  # shapes, no weights
  before, after = _nbytes(model.params), _nbytes(written)
  print(f"wrote {_OUTPUT.value}: weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


if __name__ == "__main__":
  cli.run(main)
