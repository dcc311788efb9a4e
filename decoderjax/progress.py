"""A progress bar for long loops: redrawn in place on a terminal, a plain line now and then
otherwise (files and CI logs stay readable)."""

from __future__ import annotations

import sys
import time


def format_bytes(n: float, digits: int = 2) -> str:
  """1536 -> '1.50 KiB': binary units, from bytes to TiB."""
  for scale, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
    if n >= scale:
      return f"{n / scale:.{digits}f} {unit}"
  return f"{n:.0f} B"


class Progress:
  """`update(done)` with a running amount out of `total` (bytes when `unit` is "B")."""

  def __init__(self, total: float, label: str, unit: str = "B", every_s: float = 30.0, out=None):
    self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
    self.out = out or sys.stderr
    self.tty = self.out.isatty()
    self.t0 = self.last = time.perf_counter()
    self.done = 0.0

  def _amount(self, x: float) -> str:
    return format_bytes(x, 1) if self.unit == "B" else f"{x:,.0f} {self.unit}"

  def line(self) -> str:
    elapsed = time.perf_counter() - self.t0
    rate = self.done / max(elapsed, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    share = self.done / self.total if self.total else 1.0
    per = "MB/s" if self.unit == "B" else f"{self.unit}/s"
    speed = rate / (1 << 20) if self.unit == "B" else rate
    bar = "#" * int(30 * share) + "." * (30 - int(30 * share))
    eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
    return (
      f"{self.label} [{bar}] {100 * share:5.1f}% {self._amount(self.done)}/"
      f"{self._amount(self.total)} {speed:,.1f} {per} elapsed {elapsed:.0f}s ETA {eta_text}"
    )

  def update(self, done: float) -> None:
    self.done = done
    now = time.perf_counter()
    if self.tty:
      print("\r" + self.line(), end="", file=self.out, flush=True)
    elif now - self.last >= self.every_s:
      print(self.line(), file=self.out, flush=True)
    else:
      return
    self.last = now

  def close(self) -> None:
    print(("\r" if self.tty else "") + self.line(), file=self.out, flush=True)
