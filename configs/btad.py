"""BTAD, paper-faithful (same model settings as MVTec AD; categories 01, 02, 03).

Run: python -m pni_jax.main --config=configs/btad.py --workdir=runs/btad \
       --config.data.root=/path/to/BTech_Dataset_transformed --config.model.weights=/path/to/wrn101
"""

from pni_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = 'btad'
  c.data.resize_mode = 'square'  # the paper: every image to 512 x 512, then the 480 centre crop
  return c
