"""Make README's attention picture: ``crossvit-fast attention`` on a synthetic image, random weights.

    python scripts/attention_example.py            # writes docs/attention-maps-random-weights.png

No pretrained weights can be fetched where this was made, so the model has random weights (seed
0) and the picture says so; it shows what the command draws, not what a trained model attends to.
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from crossvit_fast.cli import main

OUT = Path(__file__).resolve().parent.parent / "docs" / "attention-maps-random-weights.png"


def synthetic_image(path: Path) -> Path:
    """A smooth red/green field with a blue disc, 240x240."""
    yy, xx = np.mgrid[0:240, 0:240] / 240.0
    img = np.stack([0.5 + 0.5 * np.sin(6 * xx), 0.5 + 0.5 * np.cos(5 * yy),
                    ((xx - 0.65) ** 2 + (yy - 0.4) ** 2 < 0.03).astype(float)], axis=-1)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()   # --help writes nothing
    with tempfile.TemporaryDirectory() as tmp:
        image = synthetic_image(Path(tmp) / "synthetic-image.png")
        main(["attention", str(image), "--model", "crossvit_tiny_240", "--device", "cpu", "--out", str(OUT)])
