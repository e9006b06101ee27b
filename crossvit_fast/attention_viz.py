"""``crossvit-fast attention``: a picture of where each branch's CLS token looks.

For every multi-scale block, the fusion's CLS attention (:meth:`CrossViT.forward_attention_maps`)
over the other branch's patch grid, drawn as a heat map over the image: branch 0's CLS (small
patches) over branch 1's grid, and branch 1's CLS over branch 0's grid; the mean over heads, or
with ``--heads`` every head. The heading says how the image was resized and centre-cropped
(the picture shows the crop the model saw) and lists the top-5 classes, by their ImageNet names
where the head has 1000 classes and timm's class list is installed. Needs matplotlib
(``pip install crossvit-fast[viz]``).
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import math
import textwrap
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

PANEL_INCHES = 3.0
DPI = 100
HEADING_POINTS = 9
TOP_PAD_INCHES = 0.1        # above the heading
PANEL_TITLE_INCHES = 0.45   # between the heading and the first row: its two-line panel titles
BOTTOM_INCHES = 0.1
SIDE_INCHES = 0.2           # the heading's margin on each side


def read_image(path: str):  # -> PIL.Image.Image
    """The image at ``path`` as an RGB Pillow image, decoded (an unreadable file fails here,
    before any model is built)."""
    from PIL import Image
    with Image.open(path) as img:
        return img.convert("RGB")


class Preprocessed(NamedTuple):
    batch: Tensor        # [1, C, H, W], normalized as the model expects
    rgb: np.ndarray      # [H, W, 3] in [0, 1]: the crop the model sees
    note: str            # how the image became that crop, for the picture's heading


# timm's evaluation defaults (resolve_data_config) for a model without a pretrained_cfg
EVAL_DEFAULTS = dict(crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225))


def load_image(path, model, name: Optional[str] = None) -> Preprocessed:
    """The image (a path, or a Pillow image; ``name`` for the note) resized and centre-cropped to
    the model's ``img_size`` as timm's evaluation transform does (:func:`eval_resize`, with the
    model's ``pretrained_cfg``: ``crop_pct``, ``interpolation``, ``mean``, ``std``, timm's
    defaults where it has none), with a note saying so (the original size, the resized one, the
    crop, and how much of the image's width and height the crop keeps)."""
    from PIL import Image
    cfg = {**EVAL_DEFAULTS, **(getattr(model, "pretrained_cfg", None) or {})}
    height, width = model.img_size
    if isinstance(path, (str, Path)):
        img = read_image(path)
    elif isinstance(path, Image.Image):
        img = path.convert("RGB")
    else:
        raise TypeError(f"path must be an image file's path or a PIL image, got {type(path).__name__}")
    original = img.size
    crop_pct = cfg["crop_pct"]
    img = img.resize(eval_resize(img.size, (height, width), crop_pct), _resample(cfg["interpolation"]))
    left, top = (_crop_offset(have, want) for have, want in zip(img.size, (width, height)))
    rgb = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
    batch = torch.from_numpy(((rgb - mean) / std).transpose(2, 0, 1).copy()).unsqueeze(0)
    if name is None:
        name = Path(path).name if isinstance(path, (str, Path)) else "the image"
    return Preprocessed(batch, rgb, crop_note(name, original, img.size, (width, height), crop_pct))


def eval_resize(size: Tuple[int, int], img_size: Tuple[int, int], crop_pct: float) -> Tuple[int, int]:
    """The ``(width, height)`` timm's evaluation transform resizes an image of ``size`` (width,
    height) to before its centre crop of ``img_size`` (height, width): each side of ``img_size``
    divided by ``crop_pct``, rounded down; a square target sets the shorter side and the longer
    one keeps the aspect ratio, rounded down (torchvision's ``Resize(int)``), another target is
    met on the side that needs the smaller scale, both rounded (timm's ``ResizeKeepRatio``)."""
    w, h = size
    target_h, target_w = (math.floor(side / crop_pct) for side in img_size)
    if target_h == target_w:
        short, long = min(w, h), max(w, h)
        new_short, new_long = target_h, int(target_h * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    ratio = min(h / target_h, w / target_w)
    return round(w / ratio), round(h / ratio)


def _crop_offset(have: int, want: int) -> int:
    """Where torchvision's ``CenterCrop`` starts a crop of ``want`` along a side of ``have``
    pixels: the middle, rounded half to even; where the side is shorter, padded with black
    (Pillow fills a crop outside the image with black)."""
    return int(round((have - want) / 2)) if have >= want else -((want - have) // 2)


def _resample(interpolation: str):
    """Pillow's filter for a timm ``interpolation`` name."""
    from PIL import Image
    filters = dict(bicubic=Image.BICUBIC, bilinear=Image.BILINEAR, nearest=Image.NEAREST,
                   lanczos=Image.LANCZOS, box=Image.BOX, hamming=Image.HAMMING)
    if interpolation not in filters:
        raise ValueError(f"pretrained_cfg['interpolation'] must be one of {', '.join(filters)}, "
                         f"got {interpolation!r}")
    return filters[interpolation]


def crop_note(name: str, original: Tuple[int, int], resized: Tuple[int, int], crop: Tuple[int, int],
              crop_pct: float) -> str:
    """One line: how an image of ``original`` (width, height) became the model's ``crop``."""
    size = lambda wh: f"{wh[0]}x{wh[1]}"  # noqa: E731
    if tuple(resized) == tuple(crop):
        return f"{name} ({size(original)}) resized to {size(crop)}: all of it shown"
    kept_w, kept_h = crop[0] / resized[0], crop[1] / resized[1]
    kept = " and ".join(f"{k:.0%} of its {what}" for k, what in ((kept_w, "width"), (kept_h, "height"))
                        if round(k * 100) < 100) or "all of it"
    return (f"{name} ({size(original)}) resized to {size(resized)} and centre-cropped to {size(crop)} as "
            f"timm evaluates (crop_pct {crop_pct:g}): the model sees, and this shows, the middle {kept}")


def cls_maps_on_grids(model, maps: Dict[str, Tensor],
                      image_size: Optional[Tuple[int, int]] = None) -> List[List[Tensor]]:
    """Per multi-scale block, per direction (branch 0's CLS, branch 1's CLS): the (first) fusion
    block's attention over the other branch's patches (a one-branch model: its own), the CLS
    column dropped, ``[heads, gh, gw]`` on that branch's patch grid (sample 0). Only a fusion's
    first block attends over the patches: timm chains the next ones on the CLS token alone.
    ``image_size``: the input's (height, width), which sets the grids of a ``dynamic_img_size``
    model; a ValueError where a map's patch count is not its grid's."""
    grids = model.patch_grids(image_size)
    out = []
    for i, stage in enumerate(model.blocks):
        row = []
        for d, fusion in enumerate(stage.fusion):
            first = ".0" if isinstance(fusion, torch.nn.Sequential) else ""
            name = f"blocks.{i}.fusion.{d}{first}.attn.attn_drop"
            gh, gw = grids[(d + 1) % len(grids)]
            patches = maps[name][0, :, 0, 1:]
            if patches.shape[-1] != gh * gw:
                hint = ("pass the input's image_size" if model.dynamic_img_size and image_size is None
                        else "maps from another model or input size?")
                raise ValueError(f"maps[{name!r}] has {patches.shape[-1]} patches; the patch grid "
                                 f"{gh}x{gw} has {gh * gw} ({hint})")
            row.append(patches.float().reshape(patches.shape[0], gh, gw).cpu())
        out.append(row)
    return out


def top5(logits: Tensor) -> List[Tuple[int, float]]:
    probs = logits[0].float().softmax(-1)
    values, indices = probs.topk(min(5, probs.numel()))
    return [(int(i), float(v)) for i, v in zip(indices, values)]


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> Optional[Tuple[str, ...]]:
    """The 1000 ImageNet-1k class names in the order of the ImageNet head (each synset's first
    lemma: ``tench``, ``goldfish``...), from the class list timm ships; None without timm.

    Read from timm's data files without importing timm (which needs torchvision); where their
    layout changes, through ``timm.data.ImageNetInfo``."""
    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    info = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"
    try:
        synsets = (info / "imagenet_synsets.txt").read_text(encoding="utf-8").split()
        with open(info / "imagenet_synset_to_lemma.txt", encoding="utf-8", newline="") as f:
            lemmas = dict(row[:2] for row in csv.reader(f, delimiter="\t") if len(row) >= 2)
        names = tuple(lemmas[s].split(",")[0].strip() for s in synsets)
    except (OSError, KeyError):
        try:
            from timm.data import ImageNetInfo
            names = tuple(d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions())
        except Exception:  # noqa: BLE001 - timm unimportable here (e.g. no torchvision): numbers
            return None
    return names if len(names) == 1000 else None


def class_label(index: int, names: Optional[Sequence[str]]) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else f"class {index}"


def heading_lines(title: str, note: str = "", classes: Optional[List[Tuple[int, float]]] = None,
                  names: Optional[Sequence[str]] = None) -> List[str]:
    """The picture's heading, one paragraph a line: the title, the crop note, the top classes
    (five, or as many as the head has; by name where ``names`` is given, else by number)."""
    lines = [line for line in (title, note) if line]
    if classes:
        lines.append(f"top-{len(classes)}: " + ", ".join(f"{class_label(i, names)} ({p:.3f})" for i, p in classes))
    return lines


def output_format(out: str) -> str:
    """The image format ``out`` is written in: its extension's, PNG where it has none (so the file
    is ``out`` itself; matplotlib would append ``.png``). A ValueError naming ``--out`` where
    ``out`` is a folder or matplotlib cannot write its extension; an ImportError without
    matplotlib."""
    from matplotlib.backend_bases import FigureCanvasBase
    if Path(out).is_dir():
        raise ValueError(f"--out {out}: is a folder; expected a file path")
    blocking = next((p for p in Path(out).parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {out}: {blocking} is a file, so no folder can hold the picture")
    suffix = Path(out).suffix
    fmt = suffix[1:].lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"--out {out}: matplotlib cannot write '{suffix}' files; expected a path "
                         f"ending in one of {', '.join('.' + f for f in sorted(formats))}")
    return fmt


def render(rgb: np.ndarray, grids: Sequence[Sequence[Tensor]], out: str, heads: bool = False,
           title: str = "", classes: Optional[List[Tuple[int, float]]] = None, note: str = "",
           class_names: Optional[Sequence[str]] = None) -> Tuple[int, int]:
    """Draw the image and the heat maps to ``out`` (PNG); returns its ``(width, height)`` in pixels.

    One row per multi-scale block: the image, then each direction's head-mean map; with
    ``heads`` one row per block and direction: the image, then one map per head. A heat map is
    drawn over the image in grey, so its colours come from the attention alone, scaled from its
    smallest weight (dark) to its largest (bright). Above the rows, the heading
    (:func:`heading_lines`: ``title``, ``note``, the top-5 ``classes``), wrapped to the width;
    a PNG keeps it, a paragraph a line, as its ``Description`` text too.
    """
    heading = heading_lines(title, note, classes, class_names)
    fig, _ = figure(rgb, grids, heads, heading)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fmt = output_format(out)
    metadata = {"Title": title, "Description": "\n".join(heading)} if fmt == "png" else None
    fig.savefig(out, dpi=DPI, format=fmt, metadata=metadata)
    width, height = fig.get_size_inches()
    return round(width * DPI), round(height * DPI)


def figure(rgb: np.ndarray, grids: Sequence[Sequence[Tensor]], heads: bool, heading: Sequence[str]):
    """``(matplotlib figure, heading lines)`` of :func:`render`: the figure's height is the rows'
    and the heading's as drawn (measured, wrapped to the width), with room for the first row's
    panel titles below it. Drawn on its own Agg canvas: pyplot's backend and figures are left
    as they are."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []   # (label, [(panel title, map [gh, gw])])
    for i, row in enumerate(grids):
        directions = [(f"branch {d} CLS -> branch {(d + 1) % len(row)} patches", m) for d, m in enumerate(row)]
        if heads:
            rows += [(f"block {i}: {label}", [(f"head {h}", m[h]) for h in range(m.shape[0])])
                     for label, m in directions]
        else:
            rows.append((f"block {i}", [(f"{label} ({m.shape[1]}x{m.shape[2]}), head mean", m.mean(0))
                                        for label, m in directions]))
    cols = 1 + max(len(panels) for _, panels in rows)
    width = PANEL_INCHES * cols
    fig = Figure(figsize=(width, PANEL_INCHES * len(rows)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    text = fig.text(0.5, 1.0, "", ha="center", va="top", fontsize=HEADING_POINTS)
    lines = _wrap(fig, text, heading, (width - 2 * SIDE_INCHES) * DPI)
    top = TOP_PAD_INCHES + text.get_window_extent(fig.canvas.get_renderer()).height / DPI + PANEL_TITLE_INCHES
    height = PANEL_INCHES * len(rows) + top + BOTTOM_INCHES
    fig.set_size_inches(width, height)
    text.set_y(1 - TOP_PAD_INCHES / height)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=BOTTOM_INCHES / height, top=1 - top / height,
                        wspace=0.05, hspace=0.25)
    grey = rgb.mean(axis=2)
    img_h, img_w = grey.shape
    for (label, panels), ax_row in zip(rows, axes):
        ax_row[0].imshow(rgb)
        ax_row[0].set_title(label, fontsize=8)
        for ax, (panel_title, m) in zip(ax_row[1:], panels):
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            lo, hi = float(m.min()), float(m.max())
            ax.imshow(m.numpy(), cmap="inferno", alpha=0.65, vmin=lo, vmax=max(hi, lo + 1e-12),
                      extent=(0, img_w, img_h, 0), interpolation="nearest")
            ax.set_title(f"{panel_title}\nweights {lo:.4f} (dark) to {hi:.4f} (bright)", fontsize=7)
        for ax in ax_row:
            ax.axis("off")
    return fig, lines


def _wrap(fig, text, paragraphs: Sequence[str], max_pixels: float) -> List[str]:
    """Set ``text`` to ``paragraphs`` each wrapped at the most characters a line that keeps every
    line within ``max_pixels`` as drawn; the lines."""
    renderer = fig.canvas.get_renderer()
    lines: List[str] = []
    for paragraph in paragraphs:
        chars = max(len(paragraph), 1)
        while True:
            wrapped = textwrap.wrap(paragraph, chars, break_on_hyphens=False) or [""]
            text.set_text("\n".join(wrapped))
            if text.get_window_extent(renderer).width <= max_pixels or chars <= 20:
                break
            chars = max(20, int(chars * 0.9))
        lines += wrapped
    text.set_text("\n".join(lines))
    return lines


def draw_attention(image: str, model_name: str, out: str, checkpoint: Optional[str] = None,
                   num_classes: Optional[int] = None, heads: bool = False,
                   device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> Tuple[int, int]:
    """Load ``model_name`` (random weights, drawn from seed 0 so that a picture can be made
    again, unless ``checkpoint``; a head of ``num_classes``, default the variant's) and
    ``image``, take the CLS attention maps and draw them to ``out``; returns the PNG's
    ``(width, height)``."""
    from . import backends
    from .variants import create_model
    output_format(out)
    picture = read_image(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        kwargs = {} if num_classes is None else dict(num_classes=num_classes)
        model = create_model(model_name, checkpoint_path=checkpoint, **kwargs).eval().to(device, dtype)
    batch, rgb, note = load_image(picture, model, name=Path(image).name)
    with torch.no_grad():
        logits, maps = model.forward_attention_maps(batch.to(device, dtype))
    weights = f"weights {Path(checkpoint).name}" if checkpoint else "random weights (seed 0, no --checkpoint)"
    title = (f"{model_name}, {weights}: CLS cross-attention on {Path(image).name} "
             f"({backends.resolve(None, device)} backend)")
    names = imagenet_class_names() if model.num_classes == 1000 else None
    classes = top5(logits) if model.num_classes > 0 else None
    return render(rgb, cls_maps_on_grids(model, maps, tuple(batch.shape[-2:])), out, heads=heads, title=title, classes=classes,
                  note=note, class_names=names)
