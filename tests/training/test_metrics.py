"""FLOP accounting and evaluation totals, against counts made directly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoderjax.model import paths
from decoderjax.model.decoder import Decoder
from decoderjax.model.presets import get_preset
from decoderjax.training import metrics


def test_classification_metrics_match_a_direct_count():
  labels = np.array([0, 0, 1, 1, 2, 2, 2])
  preds = np.array([0, 1, 1, 1, 2, 0, 0])
  m = metrics.classification_metrics(preds, labels, 4)  # label 3 never occurs: F1 0
  f1 = [2 * 1 / (3 + 2), 2 * 2 / (3 + 2), 2 * 1 / (1 + 3), 0.0]
  assert m["accuracy"] == pytest.approx(4 / 7)
  assert m["macro_f1"] == pytest.approx(np.mean(f1))
  assert m["examples"] == 7


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_matmul_params_count_the_models_matrices(preset):
  """The FLOP count's parameters are the initialized model's projection weights plus one
  vocabulary table (the tied table or the head; the embedding lookup is a gather)."""
  cfg = get_preset(preset, vocab_size=64)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  layer_matrices = sum(  # every layer weight but norm scales and biases
    x.size
    for path, x in jax.tree_util.tree_leaves_with_path(params["layers"])
    if not paths.leaf_name(path).endswith(("scale", "bias"))
  )
  assert metrics.matmul_params(cfg) == layer_matrices + cfg.vocab_size * cfg.embed_dim
  seq = 32
  scores = 2 * 2 * cfg.num_layers * seq * cfg.num_heads * cfg.head_size / 2
  assert metrics.flops_per_token(cfg, seq) == 6 * metrics.matmul_params(cfg) + 3 * scores
  assert metrics.flops_per_token(cfg, seq, False) == 4 * metrics.matmul_params(cfg) + 3 * scores


def test_eval_totals_weight_the_loss_and_count_only_real_examples():
  outputs = [
    ({"loss_sum": 6.0, "weight_sum": 3.0, "predictions": np.array([1, 0])},
     {"example_weights": np.array([1.0, 0.0]), "labels": np.array([1, 1])}),
    ({"loss_sum": 2.0, "weight_sum": 1.0, "predictions": np.array([0, 1])},
     {"example_weights": np.array([1.0, 1.0]), "labels": np.array([0, 0])}),
  ]  # fmt: skip
  totals = metrics.eval_totals(outputs, num_labels=2)
  assert totals["loss"] == pytest.approx(8.0 / 4.0) and totals["weight"] == 4.0
  assert totals["examples"] == 3  # the padding row (example weight 0) is left out
  assert totals["accuracy"] == pytest.approx(2 / 3)
