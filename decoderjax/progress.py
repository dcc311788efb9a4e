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


def format_seconds(s: float) -> str:
  """75 -> '1:15', 4000 -> '1:06:40'."""
  if s == float("inf"):
    return "?"
  m, sec = divmod(int(s), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
  """`update(done)` with a running amount out of `total` (bytes when `unit` is "B"), or
  `advance(n)`; keyword fields (a loss, a rate) show beside the bar. Rates count from `start`
  (a resumed run's first step)."""

  def __init__(
    self, total: float, label: str, unit: str = "B", every_s: float = 30.0, out=None, start=0.0
  ):
    self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
    self.out = out or sys.stderr
    self.tty = self.out.isatty()
    self.t0 = self.last = time.perf_counter()
    self.done = self.start = start
    self.shown = {}

  def _amount(self, x: float) -> str:
    return format_bytes(x, 1) if self.unit == "B" else f"{x:,.0f} {self.unit}"

  def timing(self) -> str:
    """'elapsed 0:12 ETA 0:30' at the rate so far."""
    elapsed = time.perf_counter() - self.t0
    rate = (self.done - self.start) / max(elapsed, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    return f"elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}"

  def line(self) -> str:
    elapsed = time.perf_counter() - self.t0
    rate = (self.done - self.start) / max(elapsed, 1e-9)
    share = min(self.done / self.total, 1.0) if self.total else 1.0
    per = "MB/s" if self.unit == "B" else f"{self.unit}/s"
    speed = rate / (1 << 20) if self.unit == "B" else rate
    bar = "#" * int(30 * share) + "." * (30 - int(30 * share))
    fields = "".join(
      f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.shown.items()
    )
    amounts = (
      f"{self._amount(self.done)}/{self._amount(self.total)}"
      if self.unit == "B"
      else f"{self.done:,.0f}/{self.total:,.0f} {self.unit}"
    )
    rate_text = f"{speed:,.1f} {per}"
    return f"{self.label} [{bar}] {100 * share:5.1f}% {amounts} {rate_text}{fields} {self.timing()}"

  def update(self, done: float, **shown) -> None:
    self.done = done
    self.shown.update(shown)
    now = time.perf_counter()
    if self.tty:
      print("\r" + self.line() + "\x1b[K", end="", file=self.out, flush=True)
    elif now - self.last >= self.every_s:
      print(self.line(), file=self.out, flush=True)
    else:
      return
    self.last = now

  def advance(self, n: float = 1, **shown) -> None:
    self.update(self.done + n, **shown)

  def write(self, text: str) -> None:
    """A line of its own, the bar redrawn below it on a terminal."""
    print(("\r\x1b[K" if self.tty else "") + text, file=self.out, flush=True)
    if self.tty:
      print(self.line(), end="", file=self.out, flush=True)

  def close(self) -> None:
    print(
      ("\r" if self.tty else "") + self.line() + ("\x1b[K" if self.tty else ""),
      file=self.out,
      flush=True,
    )
