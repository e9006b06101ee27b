"""What both studies share: device choice, result file names, the JSON/Markdown/PNG writers.

Timing itself is :func:`crossvit_fast.benchmarking.time_fn` and ``summarize``; nothing here times.
"""
from __future__ import annotations

import json
import math
import re
import signal
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from crossvit_fast.benchmarking import DTYPES, environment

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SMOKE_OUT = Path(tempfile.gettempdir()) / "crossvit-fast-bench-smoke"


def out_dir(requested: Optional[str], smoke: bool) -> Path:
    """``--out``, else bench/results, or a temporary folder for a smoke run (never bench/results:
    a smoke run must not sit beside, or replace, measured results)."""
    return Path(requested) if requested else SMOKE_OUT if smoke else DEFAULT_OUT


def pick_device(name: Optional[str], smoke: bool) -> torch.device:
    """``--device``: explicit, or the CPU for a smoke run, else CUDA where there is one."""
    if name is None or name == "auto":
        name = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available here")
    return device


def parse_list(text: str, convert: Callable[[str], object] = str) -> list:
    """``"1,32,256"`` → ``[1, 32, 256]`` with ``convert`` applied to each comma-separated item."""
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def parse_dtype(name: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` → the torch dtype (the names ``crossvit-fast`` uses)."""
    if name not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def device_slug(device_name: str) -> str:
    """A file-name-safe form of a device name: ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"


def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted with ``spec``, or an em dash where there is no value (skipped, OOM)."""
    return "—" if value is None else format(value, spec)


def geomean(values: Sequence[float]) -> float:
    """The geometric mean (the mean of speedups across cases)."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_lines(env: dict) -> List[str]:
    """The environment as Markdown bullet lines, for the head of a results table."""
    return [f"- {key}: {value}" for key, value in env.items()]


class StudyResults:
    """One study's result files ``<out>/<study>-<device-slug>.{json,md,png}``.

    The JSON is rewritten after every measured row with ``"complete": false`` so that a run cut
    short (a time limit, a crash) leaves what it measured; :meth:`finish` marks it complete and
    writes the Markdown table and the plot.
    """

    def __init__(self, out_dir: Path | str, study: str, device: torch.device, config: dict,
                 **sections: object):
        """``config``: the run's settings; ``sections``: more top-level JSON entries (e.g. peaks)."""
        self.env = environment(device)
        self.stem = Path(out_dir) / f"{study}-{device_slug(self.env['device'])}"
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.payload = dict(study=study, complete=False, environment=self.env, config=config,
                            **sections, rows=[])

    def add(self, row: dict) -> None:
        """Record one row and rewrite the JSON."""
        self.payload["rows"].append(row)
        self._write_json()

    def stop(self, reason: str) -> None:
        """Record that the run stopped early and why, before its Markdown is made (which says so)."""
        self.payload["stopped"] = reason
        self._write_json()

    def finish(self, markdown: str, draw: Callable[[object, List[dict]], object]) -> List[Path]:
        """Write the JSON (complete unless :meth:`stop` was called), ``markdown`` and the PNG
        ``draw(pyplot, rows)`` makes."""
        self.payload["complete"] = "stopped" not in self.payload
        written = [self._write_json()]
        md_path = self.stem.with_suffix(".md")
        md_path.write_text(markdown + "\n")
        written.append(md_path)
        png = save_plot(self.stem.with_suffix(".png"), lambda plt: draw(plt, self.payload["rows"]))
        return written + ([png] if png else [])

    def _write_json(self) -> Path:
        path = self.stem.with_suffix(".json")
        tmp = path.with_suffix(".json.tmp")  # write then rename: never a half-written file
        tmp.write_text(json.dumps(self.payload, indent=1))
        tmp.replace(path)
        return path


class Stopped(BaseException):
    """Raised in the main thread on SIGTERM (``timeout``), so a study still writes what it measured.

    A BaseException, so that the per-row ``except Exception`` that keeps a study going past one
    failing row does not swallow it."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Stopped`: ``timeout 120 python -m bench...`` then still leaves the
    Markdown and plot of the rows done so far (send SIGKILL later, ``timeout -k``, as a backstop)."""
    def handler(signum, frame):
        raise Stopped("stopped by SIGTERM (time limit)")
    signal.signal(signal.SIGTERM, handler)


def save_plot(path: Path, draw: Callable[[object], object]) -> Optional[Path]:
    """Save the figure ``draw(pyplot)`` returns to ``path`` (Agg backend); None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so {path.name} was not drawn "
              "(pip install -e '.[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        figure = draw(plt)
        figure.savefig(path, dpi=110, bbox_inches="tight")
    except Exception as err:  # noqa: BLE001 - the JSON and Markdown are written; the plot is extra
        print(f"note: {path.name} was not drawn: {type(err).__name__}: {err}")
        return None
    finally:
        plt.close("all")
    return path
