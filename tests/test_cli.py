"""The crossvit-fast command line: info, check, bench, as a newcomer runs them, and as a newcomer
gets them wrong: one line and exit code 2 for a bad argument, one line and exit code 1 for a
failure the user can act on, a traceback only with --debug."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossvit_fast import backends, benchmarking, cli, commands
from crossvit_fast.cli import main

MODEL = "crossvit_9_240"


def console_script() -> str:
    """The installed ``crossvit-fast``: beside this Python (a virtual environment need not be on
    PATH), else on PATH."""
    beside = Path(sys.executable).parent / "crossvit-fast"
    exe = str(beside) if beside.exists() else shutil.which("crossvit-fast")
    assert exe, "crossvit-fast is not installed: pip install -e ."
    return exe


def run_main(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``crossvit-fast argv``, run in this process."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    """``err`` (stderr) ends with one line that has every fragment, after nothing but a progress bar."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines and "Traceback" not in err, err
    assert all(line.startswith("bench crossvit") for line in lines[:-1]), err   # bench's tqdm bar
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def test_info_lists_backends_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "requested backend" in out
    assert "torch   on cpu  : usable" in out


def test_check_passes_and_fails_past_the_bar(capsys, recwarn):
    assert main(["check", "--model", MODEL, "--batch", "1", "--device", "cpu", "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "param grads (worst)" in out and "ok: worst relative error" in out
    assert not recwarn.list, [str(w.message) for w in recwarn.list]
    assert main(["check", "--model", MODEL, "--batch", "1", "--device", "cpu", "--backends", "torch",
                 "--tol", "1e-12"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "new" / "bench.json"
    assert main(["bench", "--model", MODEL, "--device", "cpu", "--batch-sizes", "1,2",
                 "--warmup", "0", "--iters", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "naive img/s" in out and "speedup" in out
    data = json.loads(path.read_text())
    assert data["model"] == MODEL and data["environment"]["device"].startswith("cpu")
    assert {(r["batch"], r["impl"]) for r in data["results"]} == {(1, "naive"), (1, "fused"), (2, "naive"), (2, "fused")}
    assert all(r["images_per_s"] > 0 for r in data["results"])


# ---- argument errors: one line naming the argument and what it expects, exit code 2 ----------

ARGUMENT_ERRORS = [
    (["bench", "--batch-sizes", "0"], "argument --batch-sizes: expected a positive integer below 2**63, got '0'"),
    (["bench", "--batch-sizes", "-1"], "argument --batch-sizes: expected a positive integer below 2**63, got '-1'"),
    (["bench", "--batch-sizes", "abc"], "argument --batch-sizes: expected a positive integer below 2**63, got 'abc'"),
    (["bench", "--batch-sizes", "1,,4"], "argument --batch-sizes: expected a comma-separated list"),
    (["bench", "--iters", "0"], "argument --iters: expected a positive integer below 2**63, got '0'"),
    (["bench", "--warmup", "-1"], "argument --warmup: expected a non-negative integer below 2**63, got '-1'"),
    (["bench", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["check", "--batch", "0"], "argument --batch: expected a positive integer below 2**63, got '0'"),
    (["check", "--batch", "2.5"], "argument --batch: expected a positive integer below 2**63, got '2.5'"),
    (["check", "--batch", str(2 ** 63)],
     f"argument --batch: expected a positive integer below 2**63, got '{2 ** 63}'"),
    (["bench", "--batch-sizes", "99999999999999999999"],
     "argument --batch-sizes: expected a positive integer below 2**63, got '99999999999999999999'"),
    (["check", "--seed", "-1"], "argument --seed: expected an integer seed from 0 to 2**63 - 1"),
    (["check", "--seed", str(2 ** 63)], "argument --seed: expected an integer seed from 0 to 2**63 - 1"),
    (["check", "--tol", "0"], "argument --tol: expected a positive number, got '0'"),
    (["check", "--checkpoint", ""], "argument --checkpoint: expected the path of a checkpoint file, got an empty one"),
    (["check", "--tol", "nan"], "argument --tol: expected a positive number, got 'nan'"),
    (["check", "--model", "crossvit_99"], "argument --model: unknown model 'crossvit_99'; expected one of crossvit_9_240,"),
    (["check", "--backends", "torch,gpu"], "argument --backends: unknown backend 'gpu'; expected one of auto, triton, cuda, torch"),
    (["check", "--device", "gpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["check", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize("argv,says", ARGUMENT_ERRORS, ids=[" ".join(a) for a, _ in ARGUMENT_ERRORS])
def test_a_bad_argument_is_one_line_and_exit_code_2(capsys, argv, says):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, "error: " + says)


# ---- failures the user can act on: one line, exit code 1; --debug shows the traceback --------

def test_a_backend_that_cannot_run_here_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: "it is not here (test)")
    code, _, err = run_main(capsys, "check", "--model", MODEL, "--device", "cpu", "--backends", "torch")
    assert code == 1
    assert_one_line_error(err, "crossvit-fast check: error: --backends torch: backend 'torch' cannot run on cpu: "
                               "it is not here (test)")
    with pytest.raises(commands.CommandError) as err:
        main(["check", "--model", MODEL, "--device", "cpu", "--backends", "torch", "--debug"])
    assert isinstance(err.value.__cause__, backends.BackendUnavailableError)


def test_a_bad_backend_variable_is_one_line_for_bench_and_shown_by_info(capsys, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    monkeypatch.setattr(backends, "_requested", None)   # as in a fresh process
    code, out, err = run_main(capsys, "info")
    assert code == 0 and err == ""
    assert ("requested backend: none: CROSSVIT_FAST_BACKEND: unknown backend 'fastest'; expected one of "
            "auto, triton, cuda, torch") in out
    assert "torch   on cpu  : usable" in out
    code, out, err = run_main(capsys, "bench", "--model", MODEL, "--device", "cpu", "--batch-sizes", "1")
    assert code == 1 and out == ""
    assert_one_line_error(err, "crossvit-fast bench: error: CROSSVIT_FAST_BACKEND: unknown backend 'fastest'")


# The least each command needs to parse; the image need not exist: the variable is checked first.
MODEL_COMMAND_ARGS = {
    "check": ["--model", MODEL, "--device", "cpu", "--batch", "1"],
    "bench": ["--model", MODEL, "--device", "cpu", "--batch-sizes", "1"],
    "attention": ["no-such-image.png", "--out", "maps.png", "--device", "cpu"],
}


def test_every_model_command_is_listed_here():
    """A command added later is checked for the variable too: list its arguments above."""
    subparsers = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(subparsers.choices) == set(MODEL_COMMAND_ARGS) | set(commands.NO_MODEL_COMMANDS)


@pytest.mark.parametrize("command", sorted(MODEL_COMMAND_ARGS))
def test_a_bad_backend_variable_stops_every_model_command_before_any_work(capsys, monkeypatch, tmp_path,
                                                                         command):
    """One line naming the variable, its value and the accepted names, exit code 1, before the
    model is built (was: check ran and exited 0 without a word; attention printed a traceback)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    monkeypatch.setattr(backends, "_requested", None)   # as in a fresh process
    def no_work(*args, **kwargs):
        pytest.fail("the command did work before checking CROSSVIT_FAST_BACKEND")
    monkeypatch.setattr(commands, "create_model", no_work)
    monkeypatch.setattr("crossvit_fast.variants.create_model", no_work)
    code, out, err = run_main(capsys, command, *MODEL_COMMAND_ARGS[command])
    assert code == 1 and out == ""
    assert_one_line_error(err, f"crossvit-fast {command}: error: CROSSVIT_FAST_BACKEND: unknown backend "
                               f"'nonsense'; expected one of auto, triton, cuda, torch")
    assert not (tmp_path / "maps.png").exists()


def test_attention_checks_the_variables_backend_on_the_device_before_the_model(capsys, monkeypatch, tmp_path):
    """A valid name that cannot run on the device: one line naming the variable, before the
    model is built (was: the same line, after the model was built)."""
    monkeypatch.setattr(backends, "_requested", "cuda")
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device: "needs a CUDA device (test)" if name == "cuda" else None)
    monkeypatch.setattr("crossvit_fast.variants.create_model",
                        lambda *a, **k: pytest.fail("the model was built before the backend was checked"))
    image = synthetic_image(tmp_path / "img.png", seed=0)
    code, _, err = run_main(capsys, "attention", str(image), "--out", str(tmp_path / "maps.png"),
                            "--device", "cpu")
    assert code == 1
    assert_one_line_error(err, "CROSSVIT_FAST_BACKEND=cuda: backend 'cuda' cannot run on cpu: needs a CUDA device (test)")


def test_out_of_memory_is_one_line(capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(commands, "time_fn", out_of_memory)
    code, _, err = run_main(capsys, "bench", "--model", MODEL, "--device", "cpu", "--batch-sizes", "1")
    assert code == 1
    assert_one_line_error(err, "crossvit-fast bench: error: out of memory: CUDA out of memory",
                          "(try a smaller batch)")


def test_cpu_allocator_failure_counts_as_out_of_memory():
    with pytest.raises(RuntimeError) as err:
        torch.empty(2 ** 62, dtype=torch.uint8)   # far past any machine: refused at once, never touched
    assert commands.expected_failure(err.value).startswith("out of memory: ")


def test_a_bad_checkpoint_is_one_line(capsys, tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"not a checkpoint")
    code, _, err = run_main(capsys, "check", "--model", MODEL, "--device", "cpu", "--backends", "torch",
                            "--checkpoint", str(path))
    assert code == 1
    assert_one_line_error(err, f"crossvit-fast check: error: checkpoint {path}: not a readable .safetensors file")
    code, _, err = run_main(capsys, "check", "--model", MODEL, "--checkpoint", str(tmp_path / "missing.pth"))
    assert code == 1
    assert_one_line_error(err, "no such file")


def test_check_runs_with_a_checkpoint(capsys, tmp_path):
    from crossvit_fast import create_model
    torch.save(create_model(MODEL).state_dict(), tmp_path / "w.pth")
    code, out, _ = run_main(capsys, "check", "--model", MODEL, "--batch", "1", "--device", "cpu",
                            "--backends", "torch", "--checkpoint", str(tmp_path / "w.pth"))
    assert code == 0 and "ok: worst relative error" in out


def test_a_fine_tuned_heads_checkpoint_needs_num_classes_and_says_so(capsys, tmp_path):
    from crossvit_fast import create_model
    torch.save(create_model(MODEL, num_classes=10).state_dict(), tmp_path / "ft.pth")
    code, _, err = run_main(capsys, "check", "--model", MODEL, "--device", "cpu", "--backends", "torch",
                            "--checkpoint", str(tmp_path / "ft.pth"))
    assert code == 1
    assert_one_line_error(err, "does not fit this model", "its head has 10 classes: pass --num-classes 10")
    code, out, _ = run_main(capsys, "check", "--model", MODEL, "--batch", "1", "--device", "cpu",
                            "--backends", "torch", "--checkpoint", str(tmp_path / "ft.pth"), "--num-classes", "10")
    assert code == 0 and "ok: worst relative error" in out
    code, _, err = run_main(capsys, "check", "--model", MODEL, "--device", "cpu", "--backends", "torch",
                            "--checkpoint", str(tmp_path / "ft.pth"), "--num-classes", "12")
    assert code == 1
    assert_one_line_error(err, "head.0.bias (checkpoint (10,), model (12,))")
    assert "--num-classes" not in err


def test_check_without_a_classifier(capsys):
    """``--num-classes 0``: timm's head-less model, whose output is both branches' pooled features."""
    code, out, _ = run_main(capsys, "check", "--model", MODEL, "--batch", "1", "--device", "cpu",
                            "--backends", "torch", "--num-classes", "0")
    assert code == 0 and "ok: worst relative error" in out


def test_json_path_is_checked_before_the_benchmark_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "time_fn", lambda *a, **k: pytest.fail("benchmark ran"))
    code, _, err = run_main(capsys, "bench", "--model", MODEL, "--device", "cpu", "--json", str(tmp_path))
    assert code == 1
    assert_one_line_error(err, f"--json {tmp_path}: is a folder; expected a file path")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_cuda_device_is_one_line(capsys):
    code, _, err = run_main(capsys, "check", "--model", MODEL, "--device", "cuda:1")
    assert code == 1
    assert_one_line_error(err, "--device cuda:1: no CUDA device is available here")


def test_a_bug_still_shows_its_traceback(capsys, monkeypatch):
    """Only failures the user can act on become one line; anything else is raised as it is."""
    monkeypatch.setattr(commands, "summarize", lambda times: {}["median_s"])
    with pytest.raises(KeyError):
        main(["bench", "--model", MODEL, "--device", "cpu", "--batch-sizes", "1", "--warmup", "0", "--iters", "1"])


# ---- the console script, as a user runs it ------------------------------------------------------

def test_console_script_is_installed():
    out = subprocess.run([console_script(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "check" in out.stdout and "bench" in out.stdout


def test_console_script_failure_is_one_line_and_debug_shows_the_traceback():
    """Triton on CPU tensors needs its interpreter: without TRITON_INTERPRET it cannot run there."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [console_script(), "check", "--model", MODEL, "--device", "cpu", "--backends", "triton"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1 and out.stdout == ""
    assert_one_line_error(out.stderr, "crossvit-fast check: error: --backends triton: backend 'triton' cannot "
                                      "run on cpu")
    out = subprocess.run(argv + ["--debug"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1 and "Traceback" in out.stderr and "BackendUnavailableError" in out.stderr


# Measured on the 2-core CPU machine (load average 9): `crossvit-fast --help` took 0.02-0.09 s;
# 1.6-1.9 s before, when it imported torch first (`import torch` alone: 1.0-1.6 s there).
HELP_SECONDS = 1.0


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["bench", "--iters", "0"]], ids=" ".join)
def test_help_and_argument_errors_come_back_before_torch_is_imported(argv):
    code = (f"import sys\nfrom crossvit_fast.cli import main\ntry:\n    main({argv!r})\n"
            f"except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines()[-1] == "[]", out.stdout + out.stderr


def test_import_is_light_and_every_public_name_loads_on_first_use():
    code = "\n".join([
        "import sys, crossvit_fast",
        "print('torch' in sys.modules)",
        "print(all(getattr(crossvit_fast, name) is not None for name in crossvit_fast.__all__))",
        "print(crossvit_fast.ops.cls_cross_attention.__name__, crossvit_fast.reference.naive_math.__name__)",
        "print(set(crossvit_fast.__all__) <= set(dir(crossvit_fast)), hasattr(crossvit_fast, 'nothing'))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["False", "True", "cls_cross_attention naive_math", "True False"], out.stderr


def test_every_public_submodule_loads_as_an_attribute_in_a_fresh_process():
    """README names crossvit_fast.branch_streams.concurrent_branches() and the like: reachable
    after ``import crossvit_fast`` alone, not only once a model was built."""
    import crossvit_fast
    package = Path(crossvit_fast.__file__).parent
    public = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    public |= {p.parent.name for p in package.glob("*/__init__.py")} | {"kernels"}
    assert public == set(crossvit_fast._SUBMODULES)
    code = ("import crossvit_fast; print(crossvit_fast.branch_streams.concurrent_branches.__name__, "
            "crossvit_fast.fused_exchange.applies.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["concurrent_branches", "applies"], out.stderr


def test_help_takes_well_under_a_second():
    exe = console_script()
    subprocess.run([exe, "--help"], capture_output=True, timeout=120)   # warm the file cache
    start = time.perf_counter()
    out = subprocess.run([exe, "--help"], capture_output=True, timeout=120)
    seconds = time.perf_counter() - start
    assert out.returncode == 0
    assert seconds < HELP_SECONDS, f"crossvit-fast --help took {seconds:.2f} s"


def test_the_parser_knows_every_dtype_and_bar_of_the_commands(capsys):
    assert set(cli.DTYPE_NAMES) == set(benchmarking.DTYPES) == set(commands.DEFAULT_TOL)
    code, out, _ = run_main(capsys, "check", "--help")
    check_help = " ".join(out.split())
    assert code == 0
    said = {dtype: float(bar) for bar, dtype in re.findall(r"([0-9.]+e-[0-9]+) (fp32|bf16|fp16)", check_help)}
    assert said == commands.DEFAULT_TOL, check_help


# ---- a clean first run prints no warnings ---------------------------------------------------------

def test_numpy_is_a_dependency():
    """torch warns "Failed to initialize NumPy" on import where numpy is missing: every command
    imports torch, so the package depends on numpy."""
    import importlib.metadata
    requires = importlib.metadata.requires("crossvit-fast")
    assert "numpy" in requires, requires


@pytest.mark.parametrize("argv", [
    ["info"],
    ["bench", "--model", "crossvit_tiny_240", "--device", "cpu", "--batch-sizes", "1", "--warmup", "0", "--iters", "1"],
], ids=lambda argv: argv[0])
def test_readme_commands_print_no_warnings(argv):
    """In a fresh process, as a user runs them (check: see test_check_passes_and_fails_past_the_bar)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    out = subprocess.run([console_script(), *argv], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert "Warning" not in out.stderr and "warn" not in out.stderr.lower(), out.stderr


# ---- the attention command ----------------------------------------------------------------------

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
    # one row per multi-scale block: the image, then the two directions' head-mean maps, under
    # the heading (title, crop note, top-5)
    width, height = Image.open(outs[0]).size
    assert width == 900 and 900 + 60 < height < 900 + 200
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
    width, height = Image.open(tmp_path / "heads.png").size
    assert width == 1200 and 1800 + 60 < height < 1800 + 200


@pytest.mark.parametrize("missing", ["matplotlib", "PIL"])
def test_attention_without_matplotlib_or_pillow_is_one_line(capsys, monkeypatch, tmp_path, missing):
    """The [viz] extra not installed: one line saying what to install, before the model runs."""
    import matplotlib  # noqa: F401  imported first: matplotlib failing halfway on a hidden PIL
    import PIL  # noqa: F401         would leave its half-imported submodules to later tests
    monkeypatch.setitem(sys.modules, missing, None)   # import fails as if not installed
    from crossvit_fast import variants
    monkeypatch.setattr(variants, "create_model", None)   # the model must not be built
    code, out, err = run_main(capsys, "attention", str(tmp_path / "img.png"), "--out", str(tmp_path / "x.png"),
                              "--device", "cpu")
    assert code == 1 and out == ""
    assert_one_line_error(err, f"({missing} is not installed): pip install 'crossvit-fast[viz]'")


@pytest.mark.parametrize("case", ["missing", "not_an_image", "folder"])
def test_attention_with_a_bad_image_is_one_line(tmp_path, capsys, monkeypatch, case):
    """Read before the model is built (a large model takes a while to build for nothing)."""
    image = {"missing": tmp_path / "nope.png", "not_an_image": tmp_path / "notes.png", "folder": tmp_path}[case]
    if case == "not_an_image":
        image.write_text("not an image")
    monkeypatch.setattr("crossvit_fast.variants.create_model",
                        lambda *a, **k: pytest.fail("the model was built before the image was read"))
    code, _, err = run_main(capsys, "attention", str(image), "--model", MODEL, "--device", "cpu",
                            "--out", str(tmp_path / "maps.png"))
    assert code == 1
    assert_one_line_error(err, "crossvit-fast attention: error:", str(image))
    assert not (tmp_path / "maps.png").exists()


@pytest.mark.parametrize("out, message", [
    ("maps.xyz", "--out {out}: matplotlib cannot write '.xyz' files"),
    (".", "--out {out}: is a folder; expected a file path"),
    ("img.png/maps.png", "is a file, so no folder can hold the picture"),   # was: Errno 17, after the model ran
])
def test_attention_with_a_bad_out_is_one_line_before_the_model_runs(tmp_path, capsys, monkeypatch,
                                                                     out, message):
    """An --out matplotlib cannot write (was: its ValueError's traceback, after the model ran) or
    a folder (was: 'wrote FOLDER' while matplotlib wrote FOLDER.png beside it)."""
    out = str(tmp_path / out)
    image = synthetic_image(tmp_path / "img.png", seed=0)
    monkeypatch.setattr("crossvit_fast.variants.create_model",
                        lambda *a, **k: pytest.fail("the model ran before --out was checked"))
    code, _, err = run_main(capsys, "attention", str(image), "--model", MODEL, "--device", "cpu", "--out", out)
    assert code == 1
    assert_one_line_error(err, message.format(out=out))
    assert not Path(out + ".png").exists()


def test_attention_picture_goes_to_exactly_the_out_path(tmp_path):
    """An --out without an extension gets a PNG at that path (matplotlib would append '.png',
    and the command would report a file it did not write)."""
    from PIL import Image

    from crossvit_fast.attention_viz import render
    out = tmp_path / "maps"
    grids = [[torch.rand(2, 3, 3), torch.rand(2, 4, 4)]]
    assert render(torch.rand(24, 24, 3).numpy(), grids, str(out)) == Image.open(out).size
    assert Image.open(out).format == "PNG" and not (tmp_path / "maps.png").exists()



def test_attention_says_the_image_was_centre_cropped_and_names_the_classes(tmp_path, capsys):
    """A 320x200 image: the heading (kept as the PNG's Description) says how it was resized and
    cropped; the top-5 classes are ImageNet names where timm's class list is installed."""
    from PIL import Image

    from crossvit_fast.attention_viz import imagenet_class_names
    Image.new("RGB", (320, 200), (90, 140, 200)).save(tmp_path / "wide.png")
    out = tmp_path / "maps.png"
    assert main(["attention", str(tmp_path / "wide.png"), "--model", "crossvit_tiny_240", "--device", "cpu",
                 "--out", str(out)]) == 0
    title, note, top5 = Image.open(out).text["Description"].split("\n", 2)
    assert "crossvit_tiny_240" in title
    # shorter side to 240 / 0.875 = 274 (timm's crop_pct), then the middle 240x240
    assert note == ("wide.png (320x200) resized to 438x274 and centre-cropped to 240x240 as timm evaluates "
                    "(crop_pct 0.875): the model sees, and this shows, the middle 55% of its width and "
                    "88% of its height")
    assert top5.startswith("top-5: ") and top5.count("(0.") == 5
    if imagenet_class_names() is not None:
        assert "class " not in top5
        assert any(name in top5 for name in imagenet_class_names())


def test_attention_loads_a_fine_tuned_head_with_num_classes(tmp_path, capsys):
    from PIL import Image

    from crossvit_fast import create_model
    torch.save(create_model("crossvit_tiny_240", num_classes=3).state_dict(), tmp_path / "ft.pth")
    image, out = synthetic_image(tmp_path / "img.png", seed=0), tmp_path / "maps.png"
    argv = ["attention", str(image), "--model", "crossvit_tiny_240", "--device", "cpu", "--out", str(out),
            "--checkpoint", str(tmp_path / "ft.pth")]
    code, _, err = run_main(capsys, *argv)
    assert code == 1
    assert_one_line_error(err, "pass --num-classes 3")
    assert main(argv + ["--num-classes", "3"]) == 0
    top = Image.open(out).text["Description"].split("\n")[-1]
    assert top.startswith("top-") and top.count("(0.") + top.count("(1.") == 3, top


def test_attention_class_names_from_timm_and_numbers_without(monkeypatch):
    import importlib.util

    from crossvit_fast import attention_viz
    classes = [(0, 0.5), (999, 0.25)]
    assert attention_viz.heading_lines("t", "", classes, None)[-1] == "top-2: class 0 (0.500), class 999 (0.250)"
    attention_viz.imagenet_class_names.cache_clear()
    names = attention_viz.imagenet_class_names()
    if importlib.util.find_spec("timm") is not None:
        assert names is not None and len(names) == 1000
        assert (names[0], names[1], names[999]) == ("tench", "goldfish", "toilet tissue")
        assert attention_viz.heading_lines("t", "", classes, names)[-1] == "top-2: tench (0.500), toilet tissue (0.250)"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)   # timm not installed
    attention_viz.imagenet_class_names.cache_clear()
    try:
        assert attention_viz.imagenet_class_names() is None
    finally:
        attention_viz.imagenet_class_names.cache_clear()


@pytest.mark.parametrize("size, img_size, crop_pct, resized", [
    # torchvision's Resize(int): the shorter side to floor(240 / 0.875) = 274, the longer one
    # int(274 * long / short), rounded down (was 439 for 438.4, and 366 for 365.3)
    ((320, 200), (240, 240), 0.875, (438, 274)),
    ((480, 640), (240, 240), 0.875, (274, 365)),
    ((640, 480), (384, 384), 1.0, (512, 384)),
    ((500, 500), (408, 408), 1.0, (408, 408)),
    # timm's ResizeKeepRatio for a non-square target (274, 365): the smaller scale, each side rounded
    ((640, 480), (240, 320), 0.875, (365, 274)),
    ((1000, 300), (240, 320), 0.875, (913, 274)),
])
def test_attention_resizes_as_timms_evaluation_transform(size, img_size, crop_pct, resized):
    from crossvit_fast.attention_viz import eval_resize
    assert eval_resize(size, img_size, crop_pct) == resized


def test_attention_centre_crop_starts_where_torchvisions_does():
    """torchvision's CenterCrop: int(round((have - want) / 2)), half to even; a shorter side is
    padded with black around the image (the crop starts before it)."""
    from crossvit_fast.attention_viz import _crop_offset
    assert [_crop_offset(have, 240) for have in (240, 241, 243, 438, 439)] == [0, 0, 2, 99, 100]
    assert _crop_offset(200, 240) == -20 and _crop_offset(201, 240) == -19


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_attention_loads_any_pillow_image_and_a_model_without_pretrained_cfg(mode):
    """A Pillow image in any mode is taken as RGB (was: a numpy broadcast error on L, RGBA, P);
    a model built directly (no pretrained_cfg) takes timm's evaluation defaults (was: an
    AttributeError)."""
    import numpy as np
    from PIL import Image
    from crossvit_fast import CrossViT
    from crossvit_fast.attention_viz import load_image
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 320, 3), dtype=np.uint8))
    model = CrossViT(img_size=48, img_scale=(1.0, 32 / 48), patch_size=(12, 16), embed_dim=(24, 48),
                     depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2, 2, 1), num_classes=10)
    assert not hasattr(model, "pretrained_cfg")
    batch, shown, note = load_image(rgb.convert(mode), model)
    assert batch.shape == (1, 3, 48, 48) and shown.shape == (48, 48, 3)
    assert "resized to 86x54 and centre-cropped to 48x48" in note   # floor(48 / 0.875) = 54, int(54 * 1.6) = 86
    expected, _, _ = load_image(rgb.convert(mode).convert("RGB"), model)
    assert torch.equal(batch, expected)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(batch * std + mean, torch.from_numpy(shown).permute(2, 0, 1)[None], atol=1e-6)
    with pytest.raises(TypeError, match="path must be an image file's path or a PIL image"):
        load_image(np.zeros((48, 48, 3)), model)


def test_attention_drawing_leaves_pyplots_backend_alone(tmp_path):
    """render draws on its own Agg canvas: a notebook's backend (here svg) and pyplot's figures
    are as they were (was: matplotlib.use('Agg') for the whole process)."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np
    from crossvit_fast.attention_viz import render
    before = matplotlib.get_backend()
    try:
        plt.switch_backend("svg")
        figures = plt.get_fignums()
        grids = [[torch.rand(2, 4, 4), torch.rand(2, 3, 3)]]
        render(np.random.rand(48, 48, 3), grids, str(tmp_path / "maps.png"), title="t")
        assert (tmp_path / "maps.png").stat().st_size > 0
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
    finally:
        plt.switch_backend(before)


def test_attention_square_image_crop_note():
    from crossvit_fast.attention_viz import crop_note
    assert crop_note("sq.png", (240, 240), (274, 274), (240, 240), 0.875).endswith(
        "the middle 88% of its width and 88% of its height")
    assert crop_note("sq.png", (500, 500), (408, 408), (408, 408), 1.0) == "sq.png (500x500) resized to 408x408: all of it shown"


@pytest.mark.parametrize("heads", [False, True], ids=["head_mean", "heads"])
def test_attention_heading_overlaps_nothing(heads):
    """The heading (title, crop note, a long top-5 line wrapped to the width) stays inside the
    picture and clear of every panel and panel title (was: the top-5 line over the first row's
    head labels with --heads)."""
    import numpy as np

    from crossvit_fast.attention_viz import figure, heading_lines
    grids = [[torch.rand(3, 14, 14), torch.rand(3, 20, 20)] for _ in range(3)]
    names = [f"a rather long class name number {i}" for i in range(1000)]
    heading = heading_lines("crossvit_tiny_240, random weights: CLS cross-attention on a_long_file_name.png",
                            "a_long_file_name.png (480x300) resized to 439x274 and centre-cropped to 240x240 "
                            "as timm evaluates (crop_pct 0.875): the model sees the middle 55% of its width",
                            [(i, 0.1) for i in range(5)], names)
    fig, lines = figure(np.random.rand(240, 240, 3), grids, heads, heading)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        head = fig.texts[0].get_window_extent(renderer)
        assert len(lines) > len(heading), "the long top-5 line should wrap"
        assert 0 <= head.x0 and head.x1 <= fig.bbox.width and head.y1 <= fig.bbox.height
        titles = [ax.title.get_window_extent(renderer) for ax in fig.axes]
        boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
        for box in titles + boxes:
            assert not head.overlaps(box), (head, box)
        for i, title in enumerate(titles):
            assert not any(title.overlaps(b) for b in boxes), title
            assert not any(title.overlaps(t) for j, t in enumerate(titles) if j != i), title
    finally:
        fig.clear()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_check_in_16_bits_holds_each_output_to_timms_own_error(capsys, dtype):
    """A pure-16-bit model's gradients are off by up to tens of percent in timm's math too: each
    output's bar is 4x that (at least the fixed floor), so a correct model passes; a bar given
    with --tol is held to as it is."""
    args = ["check", "--model", MODEL, "--batch", "1", "--device", "cpu", "--backends", "torch",
            "--dtype", dtype]
    code, out, _ = run_main(capsys, *args)
    assert code == 0 and "timm's own" in out and "ok: worst relative error" in out, out
    code, out, _ = run_main(capsys, *args, "--tol", "1e-3")
    assert code == 1 and "FAIL" in out and "timm's own" not in out
