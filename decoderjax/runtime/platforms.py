"""Which JAX platforms a command starts. libtpu, once installed (the test extra brings it for
the compile command's deviceless TPU compiles), initializes first in every process and prints
start-up errors to stderr on a machine without a TPU; a command skips it there."""

from __future__ import annotations

import glob
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips attach over PCI under Google's vendor id
_GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL, ROCm


def tpu_attached() -> bool:
  """Whether a TPU chip is visible: a Google PCI device or a TPU VM's accel device files."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def skip_absent_tpu() -> None:
  """Runs JAX on the CPU where the user chose no platform (JAX_PLATFORMS unset) and neither a
  TPU nor a GPU is attached, so libtpu never starts; anywhere else nothing changes."""
  if os.environ.get("JAX_PLATFORMS") is not None:
    return
  if tpu_attached() or any(os.path.exists(d) for d in _GPU_DEVICES):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"  # and for the processes a command starts
  if "jax" in sys.modules:  # imported already: its backends start at first use, not import
    sys.modules["jax"].config.update("jax_platforms", "cpu")
