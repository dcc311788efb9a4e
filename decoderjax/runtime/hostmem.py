"""Host memory for CPU runs: the C library's allocator keeps freed memory for reuse.

XLA's CPU runtime allocates each execution's buffers and frees them when it ends. glibc gives
requests above its mmap threshold fresh pages from the kernel and returns them when they are
freed (other threads' arenas map large requests the same way), so every train step would fault
in and zero all its working memory again. With one arena, no mmap and no trimming, later steps
reuse the pages of the first (benchmarks/NOTES.md, "Host memory: page faults every step"). The
price: memory freed after a peak stays with the process, and a step's buffers
may be held twice when the next step allocates before the last one frees. The train binary sets
this on CPU runs (`--keep_freed_memory`); one-shot binaries such as convert leave malloc alone.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import sys

import jax

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def _glibc():
  """The process's C library if it is glibc (which has mallopt), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no mallopt to set)
  except (OSError, AttributeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for the next request: one arena, no mmap, no
  trimming. Call it before JAX starts its threads. Returns whether it took effect."""
  libc = _glibc()
  if libc is None:
    return False
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def cpu_only() -> bool:
  """Whether JAX will run on the CPU: `jax_platforms` starts with cpu, or it is unset and no
  accelerator plugin (libtpu, a jax_plugins package) is installed. Starts no backend."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.util.find_spec("libtpu") or importlib.util.find_spec("jax_plugins"):
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


def release_freed_memory() -> bool:
  """Returns the C heap's free pages to the kernel (glibc's malloc_trim), e.g. after many
  arrays were replaced one by one: their memory, freed in small pieces, otherwise stays
  resident. True where glibc did so."""
  libc = _glibc()
  return bool(libc and libc.malloc_trim(0))
