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


def synthetic_image(path, seed):
    """A smooth colour field with a bright disc placed by ``seed``, as a PNG."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:240] / 240.0
    cy, cx = rng.uniform(0.25, 0.75, size=2)
    img = np.stack([0.5 + 0.5 * np.sin(rng.uniform(2, 8) * xx), 0.5 + 0.5 * np.cos(rng.uniform(2, 8) * yy),
                    ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.02).astype(float)], axis=-1)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


def heat_colours(png, columns):
    """The colourfulness (max - min over RGB) of the PNG's heat-map columns: the image column
    excluded, the heat maps are drawn over grey, so any colour there is attention."""
    import numpy as np
    from PIL import Image
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    maps = rgb[:, rgb.shape[1] // columns:]
    return maps.max(axis=-1) - maps.min(axis=-1)


def test_attention_writes_a_png_whose_heat_maps_follow_the_image(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    images = [synthetic_image(tmp_path / f"img{i}.png", seed=i) for i in (0, 1)]
    outs = [tmp_path / f"maps{i}.png" for i in (0, 1, 2)]
    for image, out in zip(images + images[:1], outs):
        assert main(["attention", str(image), "--model", "crossvit_tiny_240", "--device", "cpu",
                     "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    # one row per multi-scale block: the image, then the two directions' head-mean maps
    assert Image.open(outs[0]).size == (900, 990)
    colours = [heat_colours(out, columns=3) for out in outs]
    assert (colours[0] > 40).mean() > 0.2, "the heat maps should be drawn in colour"
    assert np.array_equal(colours[0], colours[2]), "same image, same picture"
    assert np.abs(colours[0] - colours[1]).mean() > 5, "another image should give other heat maps"


def test_attention_per_head(tmp_path):
    from PIL import Image
    image = synthetic_image(tmp_path / "img.png", seed=0)
    assert main(["attention", str(image), "--model", "crossvit_tiny_240", "--device", "cpu",
                 "--out", str(tmp_path / "heads.png"), "--heads"]) == 0
    # one row per block and direction (6), the image and one map per head (3)
    assert Image.open(tmp_path / "heads.png").size == (1200, 1890)
