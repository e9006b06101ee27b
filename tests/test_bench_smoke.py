"""The bench/ studies in smoke mode on the CPU: they run, and write complete, plausible results.

Run in-process (``main(argv)``) to share one torch import; about 30 s on two cores.
"""
import argparse
import json
import statistics
from pathlib import Path

import pytest
import torch

from bench import common, e2e, kernels, onnx_runtime
from crossvit_fast.benchmarking import kernel_time, time_fn

pytestmark = pytest.mark.filterwarnings("ignore")


def load(out: Path, study: str) -> dict:
    """The single JSON a smoke run of ``study`` wrote into ``out``, with its Markdown beside it."""
    paths = sorted(out.glob(f"{study}-smoke-*.json"))
    assert len(paths) == 1, paths
    assert paths[0].with_suffix(".md").read_text().startswith("# ")
    payload = json.loads(paths[0].read_text())
    assert payload["complete"] is True and "stopped" not in payload
    for field in ("device", "host", "torch", "triton", "python", "commit"):
        assert payload["environment"][field], field
    assert payload["config"]["smoke"] is True
    return payload


def check_timing(row: dict) -> None:
    assert row["runs"] >= 2
    assert 0 < row["min_s"] <= row["p10_s"] <= row["median_s"] <= row["p90_s"] <= row["max_s"] < 60
    assert row["first_call_s"] > 0


def test_smoke_never_writes_into_bench_results():
    assert common.out_dir(None, smoke=True) != common.DEFAULT_OUT
    assert common.out_dir(None, smoke=False) == common.DEFAULT_OUT


def test_kernels_smoke(tmp_path):
    assert kernels.main(["--smoke", "--out", str(tmp_path)]) == 0
    payload = load(tmp_path, "kernels")
    assert payload["peaks"]["copy"]["GBps"] > 0.1
    assert payload["peaks"]["matmul"]["fp32"]["TFLOPs"] > 1e-4
    assert payload["config"]["dtypes"] == ["fp32"] and payload["skipped"] == []
    rows = payload["rows"]
    # crossvit_tiny_240 has 6 op shapes (2 of each op); each in 2 passes by naive, compiled naive, torch
    impls = {"naive", "naive+compile", "torch"}
    assert {r["impl"] for r in rows} >= impls
    for op in kernels.OPS:
        for pass_name in kernels.PASSES:
            group = [r for r in rows if (r["op"], r["pass_name"]) == (op, pass_name)]
            assert {r["impl"] for r in group} >= impls
            assert len(group) == 2 * len({r["impl"] for r in rows}), (op, pass_name)
    for row in rows:
        check_timing(row)
        assert row["dtype"] == "fp32" and row["shape"]["B"] == 2
        assert row["bytes"] > 0 and row["flops"] > 0
        assert row["GBps"] > 0 and row["TFLOPs"] > 0 and row["bw_fraction"] > 0 and row["flop_fraction"] > 0
        assert row["vs_naive"] > 0 and row["vs_compiled_naive"] > 0
        if row["impl"] == "naive":
            assert row["vs_naive"] == 1.0
    fwd_bwd = {r["op"]: r["bytes"] for r in rows if r["pass_name"] == "fwd+bwd"}
    fwd = {r["op"]: r["bytes"] for r in rows if r["pass_name"] == "fwd"}
    assert all(fwd_bwd[op] > fwd[op] for op in kernels.OPS)


def test_e2e_smoke(tmp_path):
    assert e2e.main(["--smoke", "--out", str(tmp_path)]) == 0
    payload = load(tmp_path, "e2e")
    rows = payload["rows"]
    timm_ok = payload["timm"] == "imported"
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (impl, mode) for impl in (("fast", "timm") if timm_ok else ("fast",)) for mode in e2e.MODES}
    assert [s["impl"] for s in payload["skipped"]] == ([] if timm_ok else ["timm", "timm"])
    infer_flops = next(r["flops_per_image"] for r in rows if r["mode"] == "infer")
    train_flops = next(r["flops_per_image"] for r in rows if r["mode"] == "train")
    assert 1e9 < infer_flops < 1e10  # timm: crossvit_tiny_240 is 1.6 GMACs
    assert 2.5 < train_flops / infer_flops < 3.5  # backward is about twice the forward
    for row in rows:
        check_timing(row)
        assert (row["variant"], row["dtype"], row["batch"]) == ("crossvit_tiny_240", "fp32", 1)
        assert row["images_per_s"] == pytest.approx(1 / row["back_to_back_s"])
        assert row["TFLOPs"] > 0 and row["flop_fraction"] > 0
        assert row["peak_memory_bytes"] is None  # CPU
        assert row["cudagraph_skips"] is None    # recorded for reduce-overhead rows alone
        assert row["graphs"] is None and row["graphs_while_timed"] == 0
        assert len(row["back_to_back_rounds_s"]) == 3
        assert row["back_to_back_s"] == statistics.median(row["back_to_back_rounds_s"])
        assert row["vs_fast"] > 0
        if row["impl"] == "fast":
            assert row["vs_fast"] == 1.0
            # timm's weights on timm's batch: fp32 outputs (and first losses) agree to rounding
            assert (row["output_diff_vs_peer"] is not None) == timm_ok
            assert not timm_ok or row["output_diff_vs_peer"] < 1e-4
            assert e2e.row_notes(row) == []
        assert (row["vs_timm"] is not None) == timm_ok


def test_onnx_runtime_smoke(tmp_path):
    """Both exports of crossvit_tiny_240 run in onnxruntime and are timed side by side."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert onnx_runtime.main(["--smoke", "--out", str(tmp_path)]) == 0
    payload = load(tmp_path, "onnxruntime")
    assert [(r["side"], r["batch"]) for r in payload["rows"]] == [("timm", 1), ("fast", 1)]
    for row in payload["rows"]:
        assert 0 < row["median_s"] < 60 and row["export_s"] > 0 and row["onnx_mb"] > 1
    (md,) = tmp_path.glob("onnxruntime-smoke-*.md")
    assert "| crossvit_tiny_240 | 1 |" in md.read_text()


def test_warm_compile_takes_one_shard_of_the_compiled_rows():
    """--warm-compile K/N: the K-th of every N compiled rows; a bad K/N is an argument error."""
    assert e2e.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "x", "1/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            e2e.parse_shard(bad)
    compiled = [s for s in e2e.PRESETS["compile-race"]() if s.compiled]
    assert len(compiled) == 6 and len([s for s in e2e.PRESETS["compile-quick"]() if s.compiled]) == 4


def test_warm_compile_runs_the_compiled_rows_and_writes_nothing(tmp_path, capsys):
    """A warming process compiles its rows (first step only) and leaves no results behind."""
    assert e2e.main(["--smoke", "--impls", "fast+compile", "--modes", "infer", "--warm-compile", "0/1",
                     "--out", str(tmp_path)]) == 0
    assert "warmed Spec(variant='crossvit_tiny_240', mode='infer'" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_e2e_cut_short_says_so_and_what_it_did_not_reach(tmp_path, monkeypatch):
    """A race stopped by its time limit (SIGTERM: common.Stopped) keeps the comparisons it made,
    and its Markdown, the file quoted in results, says that it is incomplete and which rows were
    not reached."""
    measure_group, calls = e2e.Runner.measure_group, []

    def stopped_at_the_second(self, group):
        calls.append(group)
        if len(calls) == 2:
            raise common.Stopped("stopped by SIGTERM (time limit)")
        return measure_group(self, group)

    monkeypatch.setattr(e2e.Runner, "measure_group", stopped_at_the_second)
    assert e2e.main(["--smoke", "--impls", "fast", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("e2e-smoke-*.json")
    payload = json.loads(path.read_text())
    assert payload["complete"] is False and payload["stopped"] == "stopped by SIGTERM (time limit)"
    assert [r["mode"] for r in payload["rows"]] == [calls[0][0].mode]
    assert [(s["mode"], s["reason"]) for s in payload["skipped"]] == [
        (calls[1][0].mode, "not reached (stopped by SIGTERM (time limit))")]
    text = path.with_suffix(".md").read_text()
    assert "**Incomplete: stopped by SIGTERM (time limit).**" in text
    assert f"{calls[1][0].mode} fp32 batch 1 fast: not reached" in text


def test_e2e_compile_budget_leaves_compiled_rows_out(tmp_path):
    argv = ["--smoke", "--modes", "infer", "--impls", "fast,fast+compile", "--compile-budget-s", "0",
            "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert e2e.main(argv) == 0
    payload = load(tmp_path, "e2e")
    assert [r["impl"] for r in payload["rows"]] == ["fast"]
    assert [(s["impl"], s["reason"]) for s in payload["skipped"]] == [("fast+compile", "compile budget of 0 s spent")]


def test_gpu_quick_preset_counts_its_compilations():
    specs = e2e.PRESETS["gpu-quick"]()
    assert sum(s.compiled for s in specs) == 6
    assert {s.variant for s in specs if s.impl == "fast"} == set(e2e.list_models())


def test_compile_race_preset_has_a_peer_for_every_row():
    """Issue 11's rows: every crossvit_fast row beside timm run the same way."""
    specs = e2e.PRESETS["compile-race"]()
    assert sum(s.compiled for s in specs) == 6
    rows = {(s.variant, s.mode, s.dtype, s.batch, s.impl) for s in specs}
    for variant, mode, dtype, batch, impl in rows:
        if impl.startswith("fast"):
            assert (variant, mode, dtype, batch, e2e.peer(impl)) in rows
    assert e2e.peer("fast+compile-ro") == "timm+compile-ro" and e2e.peer("timm") is None


def test_e2e_compiled_rows_against_their_peers(tmp_path):
    """Both compile modes on both sides (aot_eager on the CPU), each compared with its peer."""
    argv = ["--smoke", "--modes", "infer", "--impls", "fast+compile,fast+compile-ro,timm+compile,timm+compile-ro",
            "--iters", "2", "--warmup", "1", "--steps", "2", "--out", str(tmp_path)]
    assert e2e.main(argv) == 0
    payload = load(tmp_path, "e2e")
    timm_ok = payload["timm"] == "imported"
    rows = {r["impl"]: r for r in payload["rows"]}
    assert set(rows) == ({"fast+compile", "fast+compile-ro", "timm+compile", "timm+compile-ro"} if timm_ok
                         else {"fast+compile", "fast+compile-ro"})
    for impl, row in rows.items():
        check_timing(row)
        assert row["back_to_back_s"] > 0 and row["images_per_s"] == pytest.approx(1 / row["back_to_back_s"])
        assert row["graphs"] >= 1 and row["graph_breaks"] == 0 and row["graphs_while_timed"] == 0
        if impl.startswith("fast") and timm_ok:
            assert row["vs_peer"] == pytest.approx(rows[e2e.peer(impl)]["back_to_back_s"] / row["back_to_back_s"])
            assert row["output_diff_vs_peer"] < 1e-4
        else:
            assert row["vs_peer"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_time_counts_gpu_time_only():
    a = torch.randn(2048, 2048, device="cuda")
    gpu = kernel_time(lambda: a @ a, "cuda")
    latency = min(time_fn(lambda: a @ a, "cuda", iters=10))
    assert 0 < gpu <= 1.5 * latency


def test_kernel_time_is_none_off_cuda():
    assert kernel_time(lambda: None, "cpu") is None


def test_interleaved_back_to_back_alternates_rounds_and_takes_medians():
    from crossvit_fast.benchmarking import interleaved_back_to_back
    order = []
    medians = interleaved_back_to_back({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                       "cpu", steps=2, rounds=3)
    assert order == ["a", "a", "b", "b"] * 3
    assert set(medians) == {"a", "b"} and all(m > 0 for m in medians.values())


def test_each_fast_row_is_grouped_with_its_timm_peer_timm_first():
    specs = e2e.PRESETS["compile-race"]()
    groups = e2e.groups_of(sorted(specs, key=lambda s: s.compiled))
    assert sorted(map(str, (s for g in groups for s in g))) == sorted(map(str, specs))
    for group in groups:
        assert [s.impl for s in group] == ["timm" + group[1].impl[4:], group[1].impl]
        assert len({(s.variant, s.mode, s.dtype, s.batch) for s in group}) == 1
    alone = e2e.groups_of(e2e.expand(["crossvit_tiny_240"], ["infer"], ["fp32"], [1], ["fast", "timm+compile"]))
    assert [len(g) for g in alone] == [1, 1]


def test_a_comparison_that_fails_while_timed_is_left_out_and_the_study_goes_on(tmp_path, monkeypatch):
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)
    real = e2e.interleaved_rounds
    monkeypatch.setattr(e2e, "interleaved_rounds", fail_once)
    argv = ["--smoke", "--impls", "fast", "--iters", "1", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)]
    assert e2e.main(argv) == 0
    payload = load(tmp_path, "e2e")
    assert [(s["mode"], s["reason"]) for s in payload["skipped"]] == [
        ("infer", "failed while timed: RuntimeError: boom")]
    assert [r["mode"] for r in payload["rows"]] == ["train"]


def test_a_row_says_what_makes_it_other_than_its_name():
    row = dict(dtype="bf16", cudagraph_skips=0, graph_breaks=0, graphs_while_timed=0, output_diff_vs_peer=0.01)
    assert e2e.row_notes(row) == []
    assert e2e.row_notes(dict(row, graph_breaks=2, graphs_while_timed=1, output_diff_vs_peer=0.5)) == [
        "2 graph breaks", "1 graphs compiled while timed", "output differs from its peer's by 0.5"]


def test_interleaved_rounds_keeps_every_round():
    from crossvit_fast.benchmarking import interleaved_rounds
    rounds = interleaved_rounds({"a": lambda: None, "b": lambda: None}, "cpu", steps=2, rounds=4)
    assert [len(r) for r in rounds.values()] == [4, 4]


def test_a_reduce_overhead_row_whose_cuda_graphs_were_skipped_says_so():
    """Its peer ran with CUDA graphs where it may not have: the table says how often inductor
    left them out."""
    row = dict(variant="v", mode="infer", dtype="bf16", batch=256, impl="fast+compile-ro",
               images_per_s=1.0, back_to_back_s=1.0, median_s=1.0, p10_s=1.0, p90_s=1.0, gpu_s=None,
               vs_peer=1.0, vs_timm=1.0, vs_fast=1.0, first_call_s=1.0, peak_memory_bytes=None,
               TFLOPs=1.0, flop_fraction=0.1, cudagraph_skips=2)
    assert e2e.table_row(row)[4] == "fast+compile-ro (CUDA graphs skipped 2x)"
    assert e2e.table_row(dict(row, cudagraph_skips=0))[4] == "fast+compile-ro"
