"""Magnitude-pruned copy of a model directory (then recover it with a short fine-tune).

  python -m decoderjax.prune --checkpoint=MODEL_DIR --output=PRUNED_DIR --pattern=unstructured \
      --sparsity=0.5
  python -m decoderjax.prune --checkpoint=MODEL_DIR --output=PRUNED_DIR --pattern=2:4

What is pruned and how: decoderjax/model/sparsity.py. Recovery: python -m decoderjax.train
--config=configs/finetune_lm_full.py --config.init_from=PRUNED_DIR ... keeps the zeros.
"""

from __future__ import annotations

from absl import flags

from decoderjax import cli
from decoderjax.checkpoints import modeldir
from decoderjax.model import sparsity
from decoderjax.model.config import parse_pruning

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the pruned model directory.")
_PATTERN = flags.DEFINE_string("pattern", "unstructured", "unstructured, or N:M such as 2:4.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "unstructured: fraction of weights set to zero.")
flags.mark_flags_as_required(["checkpoint", "output"])


def main(argv):
  del argv
  parse_pruning(_PATTERN.value)  # a bad pattern fails before anything is read
  if flags.FLAGS["sparsity"].present and _PATTERN.value != "unstructured":
    raise ValueError(f"--sparsity is for --pattern=unstructured; {_PATTERN.value} fixes its own")
  prune, counts = sparsity.pruner(_PATTERN.value, _SPARSITY.value), []

  def transform(model):
    cfg, params = prune(model)
    counts.extend(sparsity.sparsity_of(params))
    return cfg, params

  modeldir.export_model_dir(_CHECKPOINT.value, _OUTPUT.value, transform)
  zeros, size = counts
  print(
    f"wrote {_OUTPUT.value}: {zeros:,} of {size:,} projection weights are zero ({zeros / size:.1%})"
  )


if __name__ == "__main__":
  cli.run(main)
