"""VisA, paper-faithful (same model settings as MVTec AD; split from split_csv/1cls.csv).

Run: python -m pni_jax.main --config=configs/visa.py --workdir=runs/visa \
       --config.data.root=/path/to/VisA --config.model.weights=/path/to/wrn101
"""

from pni_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = 'visa'
  c.data.resize_mode = 'square'  # the paper: every image to 512 x 512, then the 480 centre crop
  return c
