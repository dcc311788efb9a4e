"""Host memory kept for reuse: checked by the kernel's page-fault count, in child processes
(malloc settings are process-wide and must be made before other threads allocate)."""

import os
import subprocess
import sys

import pytest

from decoderjax.runtime import hostmem

pytestmark = pytest.mark.skipif(hostmem._glibc() is None, reason="needs Linux with glibc")

# Allocates, fills and frees 64 MB four times on a worker thread (as XLA's threads do) and
# prints the page faults of the last three rounds.
FAULTS = """
import ctypes, resource, sys, threading
from decoderjax.runtime import hostmem
if sys.argv[1] == "keep":
  assert hostmem.keep_freed_memory()
libc, size, faults = ctypes.CDLL(None), 64 << 20, []
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rounds():
  for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(sum(faults[1:]))
"""


def _faults(mode: str) -> int:
  out = subprocess.run(
    [sys.executable, "-c", FAULTS, mode], check=True, capture_output=True, text=True
  ).stdout
  return int(out.split()[-1])


def test_freed_memory_is_reused_without_page_faults():
  pages = 3 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
  assert _faults("keep") < pages // 100
  thp = "/sys/kernel/mm/transparent_hugepage/enabled"
  huge = False
  if os.path.exists(thp):
    with open(thp) as f:
      huge = "[always]" in f.read()
  if not huge:  # 2 MB pages fault less
    assert _faults("default") > pages // 2  # glibc's default maps and faults them anew


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cpu,cuda", True), ("tpu", False)])
def test_cpu_only_follows_jax_platforms(platforms, expected):
  code = "from decoderjax.runtime import hostmem; print(hostmem.cpu_only())"
  env = dict(os.environ, JAX_PLATFORMS=platforms)
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
  ).stdout
  assert out.split()[-1] == str(expected)


# Fills 1,600 heap blocks of 64 KB (below glibc's mmap threshold), frees all but the last (which
# pins the heap's top, so free() alone cannot give the rest back) and prints resident MB before
# and after release_freed_memory.
RELEASE = """
import ctypes, os
from decoderjax.runtime import hostmem
libc, size = ctypes.CDLL(None), 64 << 10
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def resident_mb():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
blocks = [libc.malloc(size) for _ in range(1600)]
for b in blocks:
  ctypes.memset(b, 1, size)
for b in blocks[:-1]:
  libc.free(b)
before = resident_mb()
assert hostmem.release_freed_memory()
print(before, resident_mb())
"""


def test_release_freed_memory_returns_pages_to_the_kernel():
  out = subprocess.run([sys.executable, "-c", RELEASE], check=True, capture_output=True, text=True)
  before, after = map(float, out.stdout.split()[-2:])
  assert before - after > 80  # of the 100 MB freed
