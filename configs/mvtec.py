"""MVTec AD, paper-faithful (PNI single model: WideResNet-101-2, 480 px crops, N + P + R).

Run: python -m pni_jax.main --config=configs/mvtec.py --workdir=runs/mvtec \
       --config.data.root=/path/to/mvtec_anomaly_detection --config.model.weights=/path/to/wrn101
"""

from pni_jax.config import base_config


def get_config():
  c = base_config()
  c.data.name = 'mvtec'
  c.data.resize_mode = 'square'  # the paper: every image to 512 x 512, then the 480 centre crop
  return c
