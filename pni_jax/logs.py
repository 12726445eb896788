"""Logs for people: our stage and progress lines at INFO, other libraries' INFO chatter hidden.

orbax, absl internals, TensorFlow and jax all log through Python's logging (orbax through absl's
logger, like us). `setup(verbosity)` keeps every WARNING and above, and at INFO only the lines
this package (and its tools) writes; `--verbosity=1` (absl's flag) shows everything again.
`table(...)` formats the short summary a run ends with.
"""

from __future__ import annotations

import logging as py_logging
import os
from typing import Mapping, Sequence

from absl import logging

_OWN_DIRS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (
    __file__, os.path.join(os.path.dirname(__file__), '..', 'tools', 'x')))
_LIBRARY_LOGGERS = ('jax', 'orbax', 'tensorflow', 'absl', 'etils', 'clu', 'matplotlib', 'PIL')


class OwnLinesFilter(py_logging.Filter):
  """Passes WARNING and above, and INFO / DEBUG records written from this package's files."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return os.path.abspath(record.pathname).startswith(_OWN_DIRS)


_FILTER = OwnLinesFilter()


def setup(verbosity: int = 0) -> None:
  """INFO shows our own lines only (verbosity 0); everything (verbosity >= 1, DEBUG too)."""
  handler = logging.get_absl_handler()
  logging.set_verbosity(logging.DEBUG if verbosity >= 1 else logging.INFO)
  if verbosity >= 1:
    handler.removeFilter(_FILTER)
    for name in _LIBRARY_LOGGERS:
      py_logging.getLogger(name).setLevel(py_logging.NOTSET)
    return
  handler.addFilter(_FILTER)
  for name in _LIBRARY_LOGGERS:
    if name != 'absl':  # ours go through 'absl' too: filtered by file, not by level
      py_logging.getLogger(name).setLevel(py_logging.WARNING)


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
  """A fixed-width text table (header, rule, one line per row); floats with 4 decimals."""
  def cell(v):
    if isinstance(v, float):
      return f'{v:.4f}' if abs(v) < 1000 else f'{v:.0f}'
    return str(v)
  cells = [[cell(r.get(c, '')) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  lines = ['  '.join(c.ljust(w) for c, w in zip(columns, widths)),
           '  '.join('-' * w for w in widths)]
  lines += ['  '.join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return '\n'.join(lines)
