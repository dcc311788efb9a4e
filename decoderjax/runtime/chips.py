"""Accelerator chips: published peak, memory and interconnect figures, in one table.

Sources (per chip): Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e,
v5p, v6e): bf16 peak, HBM capacity and bandwidth, bidirectional ICI bandwidth, and the pod's
all-reduce bandwidth; NVIDIA's H100 / H200 / A100 datasheets (dense bf16, HBM, NVLink).
`ici_bytes_s` is the all-reduce bandwidth a chip sustains in its slice: half the bidirectional
ICI figure, which is also the pod's all-reduce bandwidth divided by its chips (v5e 51.2 TB/s /
256, v6e 102.4 TB/s / 256; v4 1.1 PB/s / 4096). `dcn_bytes_s`: v5p's published 50 Gb/s per chip;
v5e's pod figure (6.4 Tb/s / 256 chips = 25 Gb/s); v4 and v6e assumed the same as v5e (no
per-chip figure is published).
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # as in topology names: v5e, v5p, ...
  device_kind: str  # what jax reports as device.device_kind
  bf16_flops: float  # dense peak per chip
  hbm_bytes: float
  hbm_bytes_s: float
  ici_bytes_s: float  # collective bandwidth per chip inside a slice (see above)
  dcn_bytes_s: float  # per chip between slices


CHIPS = {
  c.name: c
  for c in (
    Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200e9, 1.1e15 / 4096, 25e9 / 8),
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, 200e9, 25e9 / 8),
    Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, 600e9, 50e9 / 8),
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1638e9, 400e9, 25e9 / 8),
    Chip("h100", "NVIDIA H100", 989e12, 80 * GiB, 3350e9, 450e9, 400e9 / 8),
    Chip("h200", "NVIDIA H200", 989e12, 141e9, 4800e9, 450e9, 400e9 / 8),
    Chip("a100", "NVIDIA A100", 312e12, 80 * GiB, 2039e9, 300e9, 200e9 / 8),
  )
}


def chip_for(device_kind: str) -> Chip | None:
  """The chip a device reports itself as (longest matching name first: 'TPU v5 lite' is v5e)."""
  kind = device_kind.lower()
  for chip in sorted(CHIPS.values(), key=lambda c: -len(c.device_kind)):
    if chip.device_kind.lower() in kind:
      return chip
  return None
