"""Magnitude pruning: the right weights become zero, at the requested sparsity."""

import subprocess
import sys

import numpy as np
import pytest

from decoderjax.model import sparsity
from decoderjax.model.config import parse_pruning


def test_unstructured_zeroes_the_smallest_of_each_layer():
  w = np.random.default_rng(0).standard_normal((3, 16, 12)).astype(np.float32)  # [L, D, F]
  out = sparsity.prune_params({"layers": {"mlp": {"up": w}}}, True, "unstructured", 0.3)
  pruned = out["layers"]["mlp"]["up"]
  for before, after in zip(w, pruned, strict=True):
    zero = after == 0
    assert zero.sum() == round(0.3 * before.size)
    assert np.abs(before[zero]).max() <= np.abs(before[~zero]).min()  # the smallest went
    np.testing.assert_array_equal(after[~zero], before[~zero])  # the rest is untouched


def _n_m_reference(group, n):
  """One group of inputs with all but its n largest magnitudes zeroed."""
  want = np.zeros_like(group)
  top = np.argsort(-np.abs(group))[:n]
  want[top] = group[top]
  return want


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_keeps_the_n_largest_of_every_m_inputs(n, m):
  q = np.random.default_rng(1).standard_normal((16, 3, 4)).astype(np.float32)  # [D, N, H]
  got = sparsity.prune_params({"layers_0": {"attn": {"q": q}}}, False, f"{n}:{m}")
  got = got["layers_0"]["attn"]["q"]
  for start in range(0, 16, m):  # groups of m inputs along D, per output channel (N, H)
    for i in range(3):
      for j in range(4):
        want = _n_m_reference(q[start : start + m, i, j], n)
        np.testing.assert_array_equal(got[start : start + m, i, j], want)
  o = np.random.default_rng(2).standard_normal((2, 4, 4, 5)).astype(np.float32)  # [L, N, H, D]
  got = sparsity.prune_params({"layers": {"attn": {"o": o}}}, True, f"{n}:{m}")
  flat, flat_o = got["layers"]["attn"]["o"].reshape(2, -1, m, 5), o.reshape(2, -1, m, 5)
  for layer, group, channel in np.ndindex(2, flat.shape[1], 5):  # the flat N x H inputs
    want = _n_m_reference(flat_o[layer, group, :, channel], n)
    np.testing.assert_array_equal(flat[layer, group, :, channel], want)
  assert sparsity.sparsity_of(got) == ((m - n) * o.size // m, o.size)


def test_bad_patterns():
  with pytest.raises(ValueError, match="0 < N < M"):
    parse_pruning("4:2")
  with pytest.raises(ValueError, match="group size 4 must divide the 6 inputs"):
    sparsity.prune_params({"layers": {"mlp": {"up": np.ones((1, 6, 4))}}}, True, "2:4")
  with pytest.raises(ValueError, match="sparsity must be in"):
    sparsity.prune_params({}, True, "unstructured", 1.0)
  out = subprocess.run([sys.executable, "-m", "decoderjax.prune", "--checkpoint=x", "--output=y",
                        "--pattern=2/4"], capture_output=True, text=True)  # fmt: skip
  assert out.returncode == 1 and out.stderr.startswith("error: pattern must be")
  command = [sys.executable, "-m", "decoderjax.prune", "--checkpoint=x", "--output=y"]
  out = subprocess.run(
    [*command, "--pattern=2:4", "--sparsity=0.7"], capture_output=True, text=True
  )
  assert out.returncode == 1 and "--sparsity is for --pattern=unstructured; 2:4" in out.stderr
