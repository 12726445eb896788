"""Entry point: `python -m pni_jax.main --config=configs/mvtec.py --workdir=runs/mvtec`.

Modes:
  fit_eval (default)  for each category: fit, evaluate, write metrics / tables / figures.
  predict             load a fitted workdir and inspect new images (--images=DIR_OR_GLOB
                      [--category=CAT] [--out=DIR]); the workdir's own config is used.
  sweep               evaluate a grid of scoring hyper-parameters on a fitted workdir in compiled,
                      vmapped calls (--config.sweep.tau_scale=0.1,0.5,1 --config.sweep.sigma=2,4,8);
                      writes sweep.csv / sweep.md / sweep_*.png (pni_jax/sweep.py).
Logs: stage and progress lines at INFO; other libraries' INFO lines only with --verbosity=1.
Any config field can be overridden: `--config.data.root=/data/mvtec --config.data.categories=bottle,cable`.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# TensorFlow only decodes images here: its oneDNN kernels (and their start-up notice, printed
# before TF's logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot hide it) are not needed.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pni_jax import cli  # noqa: E402
from pni_jax import logs  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where models, metrics, maps and figures are written.')
flags.DEFINE_enum('mode', 'fit_eval', ['fit_eval', 'predict', 'sweep'], 'What to do.')
flags.DEFINE_string('images', None, 'predict mode: a folder or glob of images to inspect.')
flags.DEFINE_string('category', None, 'predict mode: which fitted category (if several).')
flags.DEFINE_string('out', None, 'predict mode: output folder (default RUN/predictions/CAT).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logs.setup(FLAGS.verbosity)
  cli.run(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode, images=FLAGS.images,
          category=FLAGS.category, out=FLAGS.out)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=cli.parse_flags)
