"""The GPU scripts' CPU-checkable parts (what a lent GPU's minutes should not be spent finding)."""
import contextlib
import importlib.util
import json
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_compiled_counts_recompiles_and_their_reasons():
    stats = _script("profile_compiled").dynamo_stats
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()           # as profile_compiled does before each row
    compiled = torch.compile(lambda x: x.sin() + 1, backend="eager")
    compiled(torch.ones(2))
    assert stats()["recompiles"] == 0
    compiled(torch.ones(2, 2))                      # a new rank: a recompile
    got = stats()
    assert got["recompiles"] == 1 and got["graphs"] == 2 and not got["graph_breaks"]
    assert any("rank" in reason for reason in got["recompile_reasons"]), got
    torch._dynamo.reset()


def test_graphs_ab_rows_run_their_settings_and_give_timms_logits(monkeypatch):
    """The A/B rows of scripts/graphs_ab.py on the CPU (Triton's interpreter), with a
    pass-through in place of GraphedInference: each row runs the fused CLS projection, the fused
    CLS exchange and the two-stream path where its name says so (and only there), the library's
    settings are back after each call, and every row gives timm's logits; a row whose capture
    fails is left out."""
    from crossvit_fast import branch_streams, create_model, layers, ops, use_backend
    from crossvit_fast.kernels import cls_exchange
    from crossvit_fast.model import MultiScaleBlock

    from .timm_import import import_timm
    ab = _script("graphs_ab")
    timm = import_timm()
    torch.manual_seed(0)
    reference = timm.create_model("crossvit_tiny_240", img_size=120, num_classes=10).eval()
    model = create_model("crossvit_tiny_240", img_size=120, num_classes=10).eval()
    model.load_state_dict(reference.state_dict())
    projections, exchanges, concurrent = [], [], []
    projection, exchange = ops.cls_projection, cls_exchange.cls_exchange
    is_concurrent = MultiScaleBlock._concurrent
    monkeypatch.setattr(ops, "cls_projection", lambda *a, **k: projections.append(1) or projection(*a, **k))
    monkeypatch.setattr(cls_exchange, "cls_exchange",
                        lambda *a, **k: exchanges.append(1) or exchange(*a, **k))
    monkeypatch.setattr(MultiScaleBlock, "_concurrent",
                        lambda self, x: concurrent.append(is_concurrent(self, x)) or concurrent[-1])
    calls = ab.implementations(reference, model, graphed=lambda m: m, autocast=contextlib.nullcontext)
    assert list(calls) == ["timm+graphs", *ab.SETTINGS]
    x = torch.randn(1, 3, 120, 120)
    with torch.no_grad(), use_backend("triton"):
        expected = reference(x)
        for name, call in calls.items():
            projections.clear(), exchanges.clear(), concurrent.clear()
            assert ab.relative_error(call(x), expected) < 1e-5, name
            setting = ab.SETTINGS.get(name, ab.Setting())
            exchange_fused = setting.cls_exchange_fused
            assert len(exchanges) == (6 if exchange_fused else 0), name              # 3 blocks x 2
            assert len(projections) == (12 if setting.cls_projection_fused else 0), name  # x 2 x 2
            streams = setting.branches_on_two_streams
            assert concurrent == ([streams] * 3 if name != "timm+graphs" else []), name
            assert not (layers.FUSED_CLS_PROJECTION or layers.FUSED_CLS_EXCHANGE
                        or branch_streams.enabled_here())
        kept = ab.captured(dict(calls, broken=lambda x: 1 / 0), x)
    assert list(kept) == list(calls)
    assert "timm+graphs" not in ab.implementations(None, model, lambda m: m, contextlib.nullcontext)
    assert list(ab.chosen_rows(skip="exchange,streams")) == ["fast+graphs", "fast+graphs, CLS projection fused"]
    assert list(ab.chosen_rows(only="exchange")) == ["fast+graphs, CLS exchange fused",
                                                     "fast+graphs, exchange fused, two streams"]
    assert ab.chosen_rows() == ab.SETTINGS
    name = "fast+graphs, exchange fused, two streams"
    row = dict(variant="v", dtype="fp32", batch=1, impl=name, back_to_back_s=1.5e-3,
               latency_s=2e-3, gpu_s=None, kernels=0, vs_timm=1.25, rel_err_vs_timm_fp32=3e-7)
    assert ab.table([row]).splitlines()[-1] == \
        f"| v | fp32 | 1 | {name} | 1500.0 | 2000.0 | — | 0 | 1.25x | 3.0e-07 |"


def test_graphs_ab_writes_what_it_measured_so_far(tmp_path, monkeypatch):
    """Its results are written after each variant, dtype and batch: a process a CUDA fault or
    its time limit ends keeps the rows measured before."""
    ab = _script("graphs_ab")
    monkeypatch.setattr(ab, "environment", lambda device: dict(device="NVIDIA H100 80GB HBM3",
                                                               torch="2.11", triton="3.6", commit="abc"))
    row = dict(variant="v", dtype="fp32", batch=1, impl="timm+graphs", back_to_back_s=1e-3,
               latency_s=1e-3, gpu_s=None, kernels=0, vs_timm=1.0, rel_err_vs_timm_fp32=0.0)
    ab.write([row], tmp_path / "out")
    written = json.loads((tmp_path / "out" / "graphs-ab-nvidia-h100-80gb-hbm3.json").read_text())
    assert written["rows"] == [row] and written["environment"]["commit"] == "abc"
    assert "| v | fp32 | 1 | timm+graphs |" in (tmp_path / "out" / "graphs-ab-nvidia-h100-80gb-hbm3.md").read_text()
