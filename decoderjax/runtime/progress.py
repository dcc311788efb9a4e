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

  def rate(self) -> float:
    """Amount per second since the bar started."""
    return (self.done - self.start) / max(time.perf_counter() - self.t0, 1e-9)

  def timing(self) -> str:
    """'elapsed 0:12 ETA 0:30' at the rate so far."""
    rate = self.rate()
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    return f"elapsed {format_seconds(time.perf_counter() - self.t0)} ETA {format_seconds(eta)}"

  def line(self) -> str:
    share = min(self.done / self.total, 1.0) if self.total else 1.0
    bar = "#" * int(30 * share) + "." * (30 - int(30 * share))
    if self.unit == "B":
      amounts = f"{format_bytes(self.done, 1)}/{format_bytes(self.total, 1)}"
      speed = f"{self.rate() / (1 << 20):,.1f} MB/s"
    else:
      amounts = f"{self.done:,.0f}/{self.total:,.0f} {self.unit}"
      speed = f"{self.rate():,.1f} {self.unit}/s"
    fields = "".join(
      f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.shown.items()
    )
    return f"{self.label} [{bar}] {100 * share:5.1f}% {amounts} {speed}{fields} {self.timing()}"

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
