"""``crossvit-fast attention``: a picture of where each branch's CLS token looks.

For every multi-scale block, the fusion's CLS attention (:meth:`CrossViT.forward_attention_maps`)
over the other branch's patch grid, drawn as a heat map over the image: branch 0's CLS (small
patches) over branch 1's grid, and branch 1's CLS over branch 0's grid; the mean over heads, or
with ``--heads`` every head. With the ImageNet head the top-5 classes are listed. Needs
matplotlib (``pip install crossvit-fast[viz]``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

PANEL_INCHES = 3.0
TITLE_INCHES = 0.9
DPI = 100


def read_image(path: str):  # -> PIL.Image.Image
    """The image at ``path`` as an RGB Pillow image, decoded (an unreadable file fails here,
    before any model is built)."""
    from PIL import Image
    with Image.open(path) as img:
        return img.convert("RGB")


def load_image(path, model) -> Tuple[Tensor, np.ndarray]:
    """``(batch [1, C, H, W] normalized as the model expects, RGB image [H, W, 3] in [0, 1])``:
    the image (a path, or one :func:`read_image` read) resized (bicubic, shorter side to
    ``size / crop_pct``) and centre-cropped to the model's ``img_size``, as timm's evaluation
    transform does."""
    from PIL import Image
    cfg = model.pretrained_cfg
    height, width = model.img_size
    img = read_image(path) if isinstance(path, (str, Path)) else path
    scale = max(height, width) / cfg.get("crop_pct", 1.0) / min(img.size)
    img = img.resize((max(width, round(img.size[0] * scale)), max(height, round(img.size[1] * scale))),
                     Image.BICUBIC)
    left, top = (img.size[0] - width) // 2, (img.size[1] - height) // 2
    rgb = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
    batch = torch.from_numpy(((rgb - mean) / std).transpose(2, 0, 1).copy()).unsqueeze(0)
    return batch, rgb


def cls_maps_on_grids(model, maps: Dict[str, Tensor]) -> List[List[Tensor]]:
    """Per multi-scale block, per direction (branch 0's CLS, branch 1's CLS): the last fusion
    block's attention over the other branch's patches (the CLS column dropped), ``[heads, gh, gw]``
    on that branch's patch grid (sample 0)."""
    grids = [embed.grid_size for embed in model.patch_embed]
    out = []
    for i, stage in enumerate(model.blocks):
        row = []
        for d, fusion in enumerate(stage.fusion):
            last = len(fusion) - 1 if isinstance(fusion, torch.nn.Sequential) else None
            name = f"blocks.{i}.fusion.{d}" + ("" if last is None else f".{last}") + ".attn.attn_drop"
            gh, gw = grids[(d + 1) % len(grids)]
            row.append(maps[name][0, :, 0, 1:].float().reshape(-1, gh, gw).cpu())
        out.append(row)
    return out


def top5(logits: Tensor) -> List[Tuple[int, float]]:
    probs = logits[0].float().softmax(-1)
    values, indices = probs.topk(min(5, probs.numel()))
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def _class_name(index: int) -> str:
    """The ImageNet class name where timm can tell it (its class list), else the index."""
    try:
        from timm.data import ImageNetInfo
        return f"{index} {ImageNetInfo().index_to_description(index)}"
    except Exception:  # noqa: BLE001 - timm absent or unimportable here: the index will do
        return f"class {index}"


def output_format(out: str) -> str:
    """The image format ``out`` is written in: its extension's, PNG where it has none (so the file
    is ``out`` itself; matplotlib would append ``.png``). A ValueError naming ``--out`` where
    ``out`` is a folder or matplotlib cannot write its extension; an ImportError without
    matplotlib."""
    from matplotlib.backend_bases import FigureCanvasBase
    if Path(out).is_dir():
        raise ValueError(f"--out {out}: is a folder; expected a file path")
    suffix = Path(out).suffix
    fmt = suffix[1:].lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"--out {out}: matplotlib cannot write '{suffix}' files; expected a path "
                         f"ending in one of {', '.join('.' + f for f in sorted(formats))}")
    return fmt


def render(rgb: np.ndarray, grids: Sequence[Sequence[Tensor]], out: str, heads: bool = False,
           title: str = "", classes: Optional[List[Tuple[int, float]]] = None) -> Tuple[int, int]:
    """Draw the image and the heat maps to ``out`` (PNG); returns its ``(width, height)`` in pixels.

    One row per multi-scale block: the image, then each direction's head-mean map; with
    ``heads`` one row per block and direction: the image, then one map per head. A heat map is
    drawn over the image in grey, so its colours come from the attention alone, scaled from its
    smallest weight (dark) to its largest (bright).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []   # (label, [(panel title, map [gh, gw])])
    for i, row in enumerate(grids):
        directions = [("branch 0 CLS -> branch 1 patches", row[0]), ("branch 1 CLS -> branch 0 patches", row[1])]
        if heads:
            rows += [(f"block {i}: {label}", [(f"head {h}", m[h]) for h in range(m.shape[0])])
                     for label, m in directions]
        else:
            rows.append((f"block {i}", [(f"{label} ({m.shape[1]}x{m.shape[2]}), head mean", m.mean(0))
                                        for label, m in directions]))
    cols = 1 + max(len(panels) for _, panels in rows)
    size = (PANEL_INCHES * cols, PANEL_INCHES * len(rows) + TITLE_INCHES)
    fig, axes = plt.subplots(len(rows), cols, figsize=size, dpi=DPI, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - TITLE_INCHES / size[1],
                        wspace=0.05, hspace=0.25)
    grey = rgb.mean(axis=2)
    height, width = grey.shape
    for (label, panels), ax_row in zip(rows, axes):
        ax_row[0].imshow(rgb)
        ax_row[0].set_title(label, fontsize=8)
        for ax, (panel_title, m) in zip(ax_row[1:], panels):
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            lo, hi = float(m.min()), float(m.max())
            ax.imshow(m.numpy(), cmap="inferno", alpha=0.65, vmin=lo, vmax=max(hi, lo + 1e-12),
                      extent=(0, width, height, 0), interpolation="nearest")
            ax.set_title(f"{panel_title}\nweights {lo:.4f} (dark) to {hi:.4f} (bright)", fontsize=7)
        for ax in ax_row:
            ax.axis("off")
    heading = title
    if classes:
        heading += "\ntop-5: " + ", ".join(f"{_class_name(i)} ({p:.3f})" for i, p in classes)
    fig.suptitle(heading, fontsize=9)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format=output_format(out))
    plt.close(fig)
    return round(size[0] * DPI), round(size[1] * DPI)


def draw_attention(image: str, model_name: str, out: str, checkpoint: Optional[str] = None,
                   heads: bool = False, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> Tuple[int, int]:
    """Load ``model_name`` (random weights, drawn from seed 0 so that a picture can be made
    again, unless ``checkpoint``) and ``image``, take the CLS attention maps and draw them to
    ``out``; returns the PNG's ``(width, height)``."""
    from . import backends
    from .variants import create_model
    output_format(out)
    picture = read_image(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(model_name, checkpoint_path=checkpoint).eval().to(device, dtype)
    batch, rgb = load_image(picture, model)
    with torch.no_grad():
        logits, maps = model.forward_attention_maps(batch.to(device, dtype))
    weights = f"weights {Path(checkpoint).name}" if checkpoint else "random weights (seed 0, no --checkpoint)"
    title = (f"{model_name}, {weights}: CLS cross-attention on {Path(image).name} "
             f"({backends.resolve(None, device)} backend)")
    classes = top5(logits) if model.num_classes == 1000 else None
    return render(rgb, cls_maps_on_grids(model, maps), out, heads=heads, title=title, classes=classes)
