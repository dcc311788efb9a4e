"""What every binary shares: one-line errors instead of tracebacks for problems users can fix,
and JAX's persistent compilation cache."""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from decoderjax.runtime import cache_dirs, platforms
from decoderjax.runtime.errors import TrainingError

_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  None,
  "Directory of JAX's persistent compilation cache, so a rerun loads its compiled programs "
  "instead of compiling them again (default: $JAX_COMPILATION_CACHE_DIR, else "
  "~/.cache/decoderjax/xla-<this CPU>); 'none' turns it off.",
)

USER_ERRORS = (ValueError, OSError, ImportError, TrainingError)


def _fail(message: str) -> None:
  """Prints `error: <first line> (<last line>)` and exits 1."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()] or ["unknown error"]
  text = lines[0] if len(lines) == 1 else f"{lines[0]} ({lines[-1]})"
  print(f"error: {text}", file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv):
  """absl flag parsing, where a bad --config.x override is a one-line error too."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cause = e.__cause__
    if isinstance(cause, OSError):  # ml_collections could not load the --config file
      _fail(f"cannot load the config file: {str(cause).strip().splitlines()[-1].strip()}")
    _fail(f"{e} (--helpshort lists the flags)")
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown key
    _fail(f"unknown config key {e}; a config file's get_config() lists the known ones")


def define_mesh_flags():
  """--mesh_data/--mesh_fsdp/--mesh_tensor for the inference binaries; returns a mesh getter."""
  sizes = {
    axis: flags.DEFINE_integer(f"mesh_{axis}", 0, f"Devices on the {axis} axis (0: unsharded).")
    for axis in MESH_AXES
  }

  def mesh():
    from decoderjax.runtime import sharding  # here: binaries that never compile never load JAX

    return sharding.inference_mesh(**{axis: flag.value for axis, flag in sizes.items()})

  return mesh


MESH_AXES = ("data", "fsdp", "tensor")


def define_truncate_flag():
  """--truncate_prompt, for the binaries that generate from prompts."""
  return flags.DEFINE_bool(
    "truncate_prompt",
    False,
    "Cut a prompt that does not fit the model's context from the left (said once, with the "
    "tokens dropped); without it such a prompt is an error.",
  )


def note_truncated(dropped: list[int]) -> None:
  """Says on stderr, once per run, how many prompt tokens --truncate_prompt dropped."""
  if any(dropped):
    from decoderjax.inference import prompts

    print(f"note: {prompts.truncation_note(dropped)}", file=sys.stderr, flush=True)


def write_json(path: str, values) -> None:
  """What --output_json asks for: `values` as indented JSON at `path`."""
  with open(path, "w") as f:
    json.dump(values, f, indent=2)


def run(main, compiles: bool = True) -> None:
  """absl's app.run, with user-fixable errors printed as `error: ...` and exit status 1.
  `compiles`: the binary runs JAX programs (its compilation cache is set up)."""

  def guarded(argv):
    logging.set_verbosity(logging.ERROR)  # Orbax's INFO/WARNING chatter off; --verbosity=0 on
    platforms.skip_absent_tpu()
    if compiles:
      cache_dirs.enable_compilation_cache(_COMPILATION_CACHE.value)
    elif _COMPILATION_CACHE.value is not None:
      _fail("--compilation_cache: this binary compiles nothing")
    try:
      return main(argv)
    except USER_ERRORS as e:
      _fail(str(e) or type(e).__name__)

  app.run(guarded, flags_parser=_parse_flags)
