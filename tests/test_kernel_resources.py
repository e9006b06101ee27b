"""Every Triton kernel compiles for a GPU, without one, at the launches the model makes.

The interpreter the other tests run cannot show what Triton's compiler rejects: on the H200 every
compiled crossvit_fast step failed because inductor typed ``eps`` as fp64, which no CPU test
saw. Here each kernel is compiled for sm_90 as inductor launches it (bench.kernel_resources),
in a process without ``TRITON_INTERPRET``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the kernels need Triton's compiler")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crossvit_18_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.kernel_resources", "--variants", "crossvit_18_240",
                          "--batches", "1", "--targets", "90", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "kernel-resources.json").read_text())


def test_every_kernel_compiles_for_sm90_as_inductor_launches_it(crossvit_18_rows):
    """Forward, backward, maps, the split combine, LayerNorm and the CLS projection, in fp32,
    bf16 and fp32 under bf16 autocast, at both of crossvit_18_240's widths."""
    kernels = {r["kernel"] for r in crossvit_18_rows}
    assert kernels == {"_attn_pool_fwd_kernel", "_attn_pool_combine_kernel", "_attn_pool_bwd_kernel",
                       "_attn_weights_kernel", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel",
                       "_cls_proj_fwd_kernel", "_cls_proj_bwd_kernel"}
    assert {r["mode"] for r in crossvit_18_rows} == {"fp32", "bf16", "autocast"}
    assert {r["op"].split(" C")[-1] for r in crossvit_18_rows if r["op"].startswith("token pass fwd")} \
        == {"224 H7", "448 H7"}
    for row in crossvit_18_rows:
        assert row["registers"] > 0 and row["shared"] >= 0 and row["programs"] >= 1, row


def test_the_token_pass_splits_a_single_sample_across_the_gpu(crossvit_18_rows):
    """At batch 1 the token axis is split (flash-decoding) and combined by a second kernel."""
    fwd = [r for r in crossvit_18_rows if r["kernel"] == "_attn_pool_fwd_kernel"]
    assert all(r["programs"] > 1 for r in fwd)
    assert any(r["kernel"] == "_attn_pool_combine_kernel" for r in crossvit_18_rows)
