"""The GPU scripts' CPU-checkable parts (what a lent GPU's minutes should not be spent finding)."""
import importlib.util
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
