"""Shared test settings: float32 matmuls at full precision, numpy rank promotion refused."""

import os
import sys
import tempfile

# libtpu (the test extra's, for ahead-of-time TPU compiles) would otherwise make JAX look for a
# TPU first, here and in every binary the tests start; topologies are compiled for explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest workers each compile for TPU

import jax  # noqa: E402
import pytest  # noqa: E402

# The tests mirror the package's subpackages; a test module may import another's helpers
# (`from test_hf import save_hf`) and the float64 reference (`import reference`) from any folder.
TESTS = os.path.dirname(os.path.abspath(__file__))
for folder in sorted(os.scandir(TESTS), key=lambda e: e.name):
  if folder.is_dir() and not folder.name.startswith((".", "_")):
    sys.path.insert(0, folder.path)
sys.path.insert(0, TESTS)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Binaries run as subprocesses share one compilation cache for the session, not the user's
# (this process read the variable at `import jax`, so its own compiles are not cached).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="decoderjax-xla-"))

REPO = os.path.dirname(TESTS)
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
  """tiny Shakespeare if the shared data is there, else a public-domain passage."""
  if os.path.exists(SHAKESPEARE):
    with open(SHAKESPEARE) as f:
      return f.read()
  pytest.skip("../shared/data/tinyshakespeare.txt not found")
