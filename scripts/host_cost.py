"""Host time per call of each fused op, called eagerly, against the ATen ops it replaces.

Each op runs as the model calls it (the drop-in module, default backend) and as timm does
(the same module inside ``reference.naive_math()``: timm's ATen ops), at crossvit_18_240's
shapes and batch 1, where the GPU finishes every kernel long before the host has launched the
next, so the time per call is the host's. Times are medians of rounds of back-to-back calls
with one synchronize per round, with gradients off (inference) and for forward+backward.

    python scripts/host_cost.py [--device cuda] [--out DIR]

writes ``host-cost-<device>.json`` and ``.md`` into ``--out`` (default: bench/results).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from crossvit_fast import backends, layers, reference
from crossvit_fast.benchmarking import back_to_back_time, environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout, for bench/
from bench.common import device_slug, markdown_table  # noqa: E402


def modules(device):
    """(name, module, inputs) at crossvit_18_240's shapes (C 224/448, 7 heads), batch 1."""
    def rows(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)
    out = []
    for n, c in ((400, 224), (196, 448)):
        out.append((f"cross-attention N {n} C {c}", layers.CrossAttentionBlock(c, 7, qkv_bias=True),
                    (rows(1, 1, c), rows(1, n, c))))
        block = layers.Block(c, 7, mlp_ratio=3, qkv_bias=True)
        out.append((f"ViT block (2 norms) N {n + 1} C {c}", block, (rows(1, n + 1, c),)))
    proj = layers.ClsProjection(torch.nn.LayerNorm(224, eps=1e-6), torch.nn.GELU(), torch.nn.Linear(224, 448))
    out.append(("CLS projection 224 → 448", proj, (rows(1, 1, 224),)))
    return [(name, m.to(device), x) for name, m, x in out]


def per_call_us(fn, device):
    """Median µs per call over 5 rounds of 50 calls back to back, one synchronize a round."""
    return statistics.median(back_to_back_time(fn, device, steps=50, rounds=5, warmup=5)) * 1e6


def measure(name, module, inputs, device):
    def forward():
        with torch.no_grad():
            module(*inputs)

    def forward_backward():
        module(*inputs).sum().backward()
    row = dict(op=name)
    for label, context in (("fused", lambda: layers.always_fuse_norms()), ("timm's ATen ops", reference.naive_math)):
        with context():
            row[f"{label} fwd µs"] = per_call_us(forward, device)
            row[f"{label} fwd+bwd µs"] = per_call_us(forward_backward, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bench" / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    layers.FUSED_CLS_PROJECTION = True        # time the fused projection, whatever the default
    rows = [measure(*m, device) for m in modules(device)]
    env = environment(device)
    env["backend"] = backends.resolve(None, device)
    headers = list(rows[0])
    text = "\n".join([f"# Host time per eager call, batch 1, on {env['device']}", "",
                      *(f"- {k}: {v}" for k, v in env.items()), "",
                      markdown_table(headers, [[r[h] if isinstance(r[h], str) else f"{r[h]:.1f}" for h in headers]
                                               for r in rows])])
    stem = Path(args.out) / f"host-cost-{device_slug(env['device'])}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
