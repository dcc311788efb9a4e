"""Names along a parameter tree's key paths (as jax.tree_util's *_with_path functions give
them), the one way modules pick parameters out by name."""

from __future__ import annotations


def names(path) -> list[str]:
  """The dict keys along `path`, e.g. ["layers", "attn", "q"]; nn.Partitioned boxes and
  sequence indices (which have no key) are skipped."""
  return [str(p.key) for p in path if hasattr(p, "key")]


def leaf_name(path) -> str:
  """The last key along `path`: the parameter's own name ("q", "scale", "embedding")."""
  return names(path)[-1]
