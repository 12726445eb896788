"""Progress lines for long loops: done / total, rate, elapsed and ETA, through absl logging."""

from __future__ import annotations

import time

from absl import logging


def format_seconds(seconds: float) -> str:
  """'12.3s', '4m05s' or '2h07m'."""
  seconds = max(0.0, float(seconds))
  if seconds < 60:
    return f'{seconds:.1f}s'
  minutes, sec = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f'{minutes}m{sec:02d}s'
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m'


class Progress:
  """Reports `what: done/total (pct) rate, elapsed, ETA` every `every` seconds and when done.

  A loop shorter than `every` seconds prints one line (its last); a long one a line per
  interval, so the log grows with the run's duration, not with its number of steps.
  Usage: `p = Progress('features', total, unit='img'); p.update(n); ...; p.close()`.
  """

  def __init__(self, what: str, total: int, *, unit: str = 'it', every: float = 30.0,
               log_fn=None):
    self.what, self.total, self.unit, self.every = what, int(total), unit, float(every)
    self.done = 0
    self.start = time.perf_counter()
    self._last = self.start
    self._log = log_fn or logging.info

  def line(self) -> str:
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else float('nan')
    pct = 100.0 * self.done / self.total if self.total else 100.0
    eta_s = format_seconds(eta) if eta == eta else '?'
    return (f'{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%) '
            f'{rate:.2f} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {eta_s}')

  def update(self, n: int = 1, *, force: bool = False) -> None:
    self.done += int(n)
    now = time.perf_counter()
    if force or now - self._last >= self.every or self.done >= self.total:
      self._last = now
      self._log(self.line())

  def close(self) -> float:
    """Logs the final line; returns the elapsed seconds."""
    if self.done < self.total:
      self._log(self.line())
    return time.perf_counter() - self.start
