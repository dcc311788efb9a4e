"""Where decoderjax keeps files between runs: the user's cache directory (the default corpus,
compiled programs) and JAX's persistent compilation cache, keyed by this host's CPU."""

from __future__ import annotations

import hashlib
import os
import platform


def user_cache(name: str) -> str:
  """`name` under the user's cache directory: $XDG_CACHE_HOME/decoderjax, else ~/.cache/..."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "decoderjax", name)


def host_fingerprint() -> str:
  """The CPU model and instruction-set flags: XLA's compiled CPU code is only valid where they
  match, and JAX's cache key does not include them (a home directory may be shared by hosts)."""
  text = platform.machine() + platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      text += "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
  except OSError:
    pass
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def enable_compilation_cache(directory: str | None, min_seconds: float | None = None) -> None:
  """Turns on JAX's persistent compilation cache in `directory` (None: the default above;
  'none': off). Programs that compile in under `min_seconds` are not stored (None: JAX's
  default, a second)."""
  import jax  # here, not at the top: binaries that never compile (prepare) never load JAX

  if directory is None:
    directory = jax.config.jax_compilation_cache_dir or user_cache(f"xla-{host_fingerprint()}")
  off = directory.lower() == "none"
  jax.config.update("jax_compilation_cache_dir", None if off else directory)
  if min_seconds is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
