"""The crossvit-fast command line: info, check, bench, as a newcomer runs them."""
import json
import shutil
import subprocess

from crossvit_fast.cli import main


def test_info_lists_backends_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "requested backend" in out
    assert "torch   on cpu  : usable" in out


def test_check_passes_and_fails_past_the_bar(capsys):
    assert main(["check", "--model", "crossvit_9_240", "--batch", "1", "--device", "cpu", "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "param grads (worst)" in out and "ok: worst relative error" in out
    assert main(["check", "--model", "crossvit_9_240", "--batch", "1", "--device", "cpu", "--backends", "torch",
                 "--tol", "1e-12"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--model", "crossvit_9_240", "--device", "cpu", "--batch-sizes", "1,2",
                 "--warmup", "0", "--iters", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "naive img/s" in out and "speedup" in out
    data = json.loads(path.read_text())
    assert data["model"] == "crossvit_9_240" and data["environment"]["device"].startswith("cpu")
    assert {(r["batch"], r["impl"]) for r in data["results"]} == {(1, "naive"), (1, "fused"), (2, "naive"), (2, "fused")}
    assert all(r["images_per_s"] > 0 for r in data["results"])


def test_console_script_is_installed():
    exe = shutil.which("crossvit-fast")
    assert exe, "crossvit-fast is not on PATH: install the package (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "check" in out.stdout and "bench" in out.stdout
