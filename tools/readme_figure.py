"""Draws the README's picture of predict mode's output from a predictions folder.

python tools/readme_figure.py --predictions=RUN/predictions/CATEGORY --out=tools/figures/predict_example.png
Each row: the input image | the overlay predict mode wrote, titled with score and decision.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--predictions', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument('--max_images', type=int, default=4)
  ap.add_argument('--size', type=int, default=200)
  args = ap.parse_args()
  folder = pathlib.Path(args.predictions)
  rows = [r for r in json.loads((folder / 'predictions.json').read_text()) if not r['error']]
  rows = rows[:args.max_images]
  s, pad, title = args.size, 6, 22
  canvas = Image.new('RGB', (len(rows) * (s + pad) + pad, 2 * (s + title) + pad), 'white')
  draw = ImageDraw.Draw(canvas)
  for i, r in enumerate(rows):
    x = pad + i * (s + pad)
    image = Image.open(r['path']).convert('RGB').resize((s, s), Image.BILINEAR)
    overlay = Image.open(folder / r['overlay']).convert('RGB').resize((s, s), Image.BILINEAR)
    draw.text((x, 4), pathlib.Path(r['path']).name, fill='black')
    canvas.paste(image, (x, title))
    verdict = 'DEFECTIVE' if r['defective'] else 'normal'
    draw.text((x, title + s + 4), f"score {r['score']:.1f} / thr {r['threshold']:.1f}: {verdict}",
              fill='red' if r['defective'] else 'darkgreen')
    canvas.paste(overlay, (x, 2 * title + s))
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  canvas.quantize(colors=128).save(args.out, optimize=True)   # small enough to commit
  print(f'wrote {args.out} ({np.prod(canvas.size)} px)')


if __name__ == '__main__':
  main()
