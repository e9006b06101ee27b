"""Every Triton kernel fits, without spilling, every NVIDIA GPU from the A100 on, and the token pass
fills the GPU: compiled without a GPU at the launches the model makes (issue 19).

bench.kernel_resources records the launch wrappers' launches on meta tensors for all 11 variants,
batch 1, 8 and 256, fp32 / bf16 / fp32 under bf16 autocast (forward, backward, maps, LayerNorm,
CLS projection; the fused CLS exchange at the batches and modes it runs at), and compiles each
distinct launch for sm_80, sm_86, sm_89 and sm_90 as inductor types it, in a process without
``TRITON_INTERPRET`` (the interpreter the other tests run cannot show what Triton's compiler
does: on the H200 every compiled step once failed because inductor typed ``eps`` as fp64, which
no CPU test saw).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.kernel_resources import PROGRAMS_PER_SM_AT_256, TARGETS, TOKEN_PASS_KERNELS, violations

pytest.importorskip("triton", reason="the kernels need Triton's compiler")

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 256)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.kernel_resources", "--batches",
                          ",".join(map(str, BATCHES)), "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "kernel-resources.json").read_text())


def test_every_kernel_is_compiled_for_every_gpu_variant_batch_and_mode(rows):
    from crossvit_fast.variants import list_models
    assert {r["kernel"] for r in rows} == {
        *TOKEN_PASS_KERNELS, "_pool_combine_kernel", "_layer_norm_fwd_kernel",
        "_layer_norm_bwd_kernel", "_cls_proj_fwd_kernel", "_cls_proj_bwd_kernel",
        "_cls_exchange_kernel"}
    assert {r["variant"] for r in rows} == set(list_models())
    assert {r["batch"] for r in rows} == set(BATCHES)
    assert {r["mode"] for r in rows} == {"fp32", "bf16", "autocast"}
    assert {r["target"] for r in rows} == {f"sm_{cc}" for cc in TARGETS}
    for row in rows:
        assert row["registers"] > 0 and row["shared"] >= 0 and row["programs"] >= 1, row


def test_no_kernel_needs_more_than_the_gpu_grants_spills_or_leaves_the_gpu_idle(rows):
    misses = violations(rows)
    assert not misses, f"{len(misses)} configurations miss a target:\n" + "\n".join(misses[:40])


def test_the_targets_can_fail():
    """The check itself: a row over the limit, one that spills, and token-pass launches under a
    wave or under the programs per SM asked at batch 256 are each reported."""
    good = dict(target="sm_90", variant="v", batch=256, mode="bf16", op="op", kernel="_scores_kernel",
                shared=1024, shared_limit=232448, fits=True, registers=128, stack_bytes=0, sms=132,
                programs=132 * PROGRAMS_PER_SM_AT_256, programs_per_sm=PROGRAMS_PER_SM_AT_256)
    assert violations([good]) == []
    bad = [dict(good, shared=240000, fits=False), dict(good, stack_bytes=8),
           dict(good, batch=8, programs=100, programs_per_sm=100 / 132),
           dict(good, programs=256, programs_per_sm=256 / 132)]
    assert [len(violations([r])) for r in bad] == [1, 1, 1, 1]
    # other kernels (the split combine, LayerNorm, the CLS projection) have no wave target
    assert violations([dict(bad[2], kernel="_pool_combine_kernel")]) == []


def test_a_single_sample_is_split_across_the_gpu(rows):
    """At batch 1 the pooling kernels split the token axis (flash-decoding), combined by a second
    kernel, and the token kernels take a few tokens per program."""
    one = [r for r in rows if r["batch"] == 1 and r["target"] == "sm_90"]
    assert any(r["kernel"] == "_pool_combine_kernel" for r in one)
    for r in one:
        if r["kernel"] in TOKEN_PASS_KERNELS:
            assert r["programs"] >= 32, r
