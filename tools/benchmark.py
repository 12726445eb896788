"""Benchmarks that print figures: `python tools/benchmark.py <what> [options]`.

Each `<what>` lives in its own module `tools/bench_<what>.py` exposing `main(argv)`.
Run `python tools/benchmark.py --list` to see what is available.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def available() -> list[str]:
  return sorted(p.stem[len('bench_'):] for p in HERE.glob('bench_*.py'))


def main(argv: list[str]) -> int:
  names = available()
  if len(argv) < 2 or argv[1] in ('-h', '--help', '--list'):
    print(__doc__)
    print('available:', ', '.join(names) or '(none)')
    return 0 if len(argv) >= 2 else 2
  what = argv[1]
  if what not in names:
    print(f'unknown benchmark {what!r}; available: {", ".join(names)}', file=sys.stderr)
    return 2
  sys.path.insert(0, str(HERE))
  # The checkout's package comes after PYTHONPATH, so `PYTHONPATH=/other/checkout python
  # tools/benchmark.py ...` times that checkout's pni_jax with these benchmarks.
  sys.path.append(str(HERE.parent))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  module = importlib.import_module(f'bench_{what}')
  return int(module.main(argv[2:]) or 0)


if __name__ == '__main__':
  sys.exit(main(sys.argv))
