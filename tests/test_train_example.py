"""``crossvit_fast.examples.train_ddp`` end to end: two processes under ``torchrun`` with gloo on
a tiny model, stopped and resumed mid-epoch, against an uninterrupted run and one process on
the whole batch; an ImageFolder directory; the checkpoint loads with ``create_model``."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import crossvit_fast
from crossvit_fast import layers
from crossvit_fast.examples import train_ddp

from .conftest import LIBRARY_FUSED_NORM_MIN_ELEMENTS
from .numerics import FP32_REL_TOL

MODEL_KWARGS = {"img_size": 48, "img_scale": [1.0, 1.0], "embed_dim": [24, 48],
                "depth": [[1, 1, 0], [1, 1, 0]], "num_heads": [2, 2]}
# 12 images, 2 per process and step on 2 processes: 3 steps an epoch, so a run of 5 steps
# crosses an epoch boundary, and a stop after 2 is mid-epoch.
ARGS = ["--model-kwargs", json.dumps(MODEL_KWARGS), "--synthetic-size", "12", "--opt", "sgd",
        "--lr", "0.1", "--workers", "0"]
TIMEOUT_S = 120


def run_killing_the_group(cmd, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)`` in a process group of its own, all of which is killed on timeout:
    killing torchrun alone (what ``subprocess.run``'s timeout does) leaves its workers running,
    blocked in a collective."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def torchrun(*args: str) -> None:
    """The example on 2 CPU processes; fails the test with the output on error or timeout."""
    torchrun_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", "-m", "crossvit_fast.examples.train_ddp"]
    done = run_killing_the_group([*torchrun_cmd, *ARGS, "--batch-size", "2", *args], TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_a_timed_out_run_leaves_no_process_behind(tmp_path):
    """A launcher whose child outlives it (as torchrun's workers would, blocked in a
    collective): on timeout the child is killed too."""
    pid_file = tmp_path / "child.pid"
    launcher = ("import subprocess, sys, time; "
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    with pytest.raises(subprocess.TimeoutExpired):
        run_killing_the_group([sys.executable, "-c", launcher], timeout=3)
    child = int(pid_file.read_text())
    for _ in range(50):                   # SIGKILL is delivered asynchronously; reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the launcher's child outlived the timeout")


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


# Stochastic depth on in the resumed runs: a resume must draw the masks the uninterrupted run drew.
WITH_DROP_PATH = ["--model-kwargs", json.dumps(dict(MODEL_KWARGS, drop_path_rate=0.3))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of a 2-process run with stochastic depth stopped after 2 steps and resumed
    to 5, of one such run straight to 5, and of one without it (``plain.pt``)."""
    tmp = tmp_path_factory.mktemp("train_ddp")
    torchrun("--steps", "2", "--checkpoint", str(tmp / "resumed.pt"), *WITH_DROP_PATH)
    shutil.copy(tmp / "resumed.pt", tmp / "after2.pt")
    torchrun("--steps", "5", "--resume", "--checkpoint", str(tmp / "resumed.pt"), *WITH_DROP_PATH)
    torchrun("--steps", "5", "--checkpoint", str(tmp / "straight.pt"), *WITH_DROP_PATH)
    torchrun("--steps", "5", "--checkpoint", str(tmp / "plain.pt"))
    return tmp


def test_each_process_and_step_draws_its_own_masks():
    seeds = {train_ddp.step_seed(0, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400 and train_ddp.step_seed(0, 1, 7) == train_ddp.step_seed(0, 1, 7)


def test_resumed_run_is_the_uninterrupted_run(runs):
    after2, resumed = (torch.load(runs / name, weights_only=True) for name in ("after2.pt", "resumed.pt"))
    straight = torch.load(runs / "straight.pt", weights_only=True)
    assert (after2["step"], resumed["step"], straight["step"]) == (2, 5, 5)
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert not torch.equal(after2["model"]["head.0.weight"], straight["model"]["head.0.weight"])


def test_two_processes_train_as_one_on_the_whole_batch(runs, tmp_path, monkeypatch):
    """The same 5 global batches: each process takes its shard, DDP averages the gradients.
    Updates within 1e-4 (2-norm, per parameter): the 2-process run sums in another order, and
    p0 + update rounds in fp32, which for the norm weights (near 1, moved by ~1e-3) is
    ~1e-5 of the update already (measured worst: 2.2e-5)."""
    monkeypatch.setattr(layers, "FUSED_NORM_MIN_ELEMENTS", LIBRARY_FUSED_NORM_MIN_ELEMENTS)
    train_ddp.main([*ARGS, "--batch-size", "4", "--steps", "5", "--checkpoint", str(tmp_path / "one.pt")])
    one, two = weights(tmp_path / "one.pt"), weights(runs / "plain.pt")
    torch.manual_seed(0)                                     # the example's --seed
    init = crossvit_fast.create_model("crossvit_tiny_240", num_classes=10, **MODEL_KWARGS)
    for name, p0 in init.state_dict().items():
        update, want = two[name] - p0, one[name] - p0
        assert (update - want).norm() <= 10 * FP32_REL_TOL * want.norm() + 1e-7, name


def test_checkpoint_loads_with_create_model(runs):
    model = crossvit_fast.create_model("crossvit_tiny_240", num_classes=10,
                                       checkpoint_path=str(runs / "straight.pt"), **MODEL_KWARGS)
    for name, value in weights(runs / "straight.pt").items():
        assert torch.equal(model.state_dict()[name], value), name


def test_image_folder(tmp_path):
    """Two class directories of Pillow-written images, one process, one step."""
    PIL_image = pytest.importorskip("PIL.Image")
    for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            PIL_image.new("RGB", (64 + 16 * i, 50), colour).save(tmp_path / "data" / label / f"{i}.png")
    dataset = train_ddp.ImageFolder(tmp_path / "data", (48, 48), (0.5,) * 3, (0.25,) * 3)
    image, label = dataset[2]
    assert dataset.classes == ["cat", "dog"] and label == 1 and image.shape == (3, 48, 48)
    assert torch.allclose(image[2], torch.full((48, 48), (200 / 255 - 0.5) / 0.25), atol=1e-2)
    train_ddp.main(["--model-kwargs", json.dumps(MODEL_KWARGS), "--data", str(tmp_path / "data"),
                    "--batch-size", "2", "--steps", "1", "--workers", "0",
                    "--checkpoint", str(tmp_path / "ck.pt")])
    assert weights(tmp_path / "ck.pt")["head.0.weight"].shape == (2, 24)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_ddp.main(["--help"])
    assert exit_.value.code == 0 and "--resume" in capsys.readouterr().out


def test_help_shows_every_default(capsys):
    """Each option's entry in --help ends with its default; the checkpoint's says it is a file
    in the working directory."""
    with pytest.raises(SystemExit):
        train_ddp.main(["--help"])
    options = capsys.readouterr().out.partition("options:")[2]
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options) if entry.strip()]
    assert len(entries) == len(train_ddp.build_parser()._actions)
    for entry in entries:
        if not entry.startswith("-h, --help"):
            assert re.search(r"\(default: [^)]+\)$", entry), entry
    checkpoint = next(e for e in entries if e.startswith("--checkpoint"))
    assert "(default: train_ddp_checkpoint.pt, in the working directory)" in checkpoint
    assert "(default: off)" in next(e for e in entries if e.startswith("--resume"))


def test_device_cuda_without_cuda_is_one_line(capsys, monkeypatch):
    """Exit code 2 and one line naming --device and that CUDA is not available (was a 28-line
    traceback from the model's first move to the GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(SystemExit) as exit_:
            train_ddp.main(["--device", device, "--steps", "1"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_.value.code == 2 and len(lines) == 1, lines
        assert f"argument --device: '{device}': CUDA is not available here" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_as_a_user_runs_it():
    done = subprocess.run([sys.executable, "-m", "crossvit_fast.examples.train_ddp", "--device", "cuda"],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "--device" in lines[0], done.stderr
    assert "CUDA is not available" in lines[0] and done.stdout == ""


def test_says_where_it_writes_the_checkpoint_and_how_to_load_it(tmp_path, monkeypatch, capsys):
    """By default the checkpoint goes to the working directory: the run says so at the start, and
    when it saves prints the create_model call that loads its weights (the example's class count
    and --model-kwargs), which does."""
    monkeypatch.chdir(tmp_path)
    train_ddp.main([*ARGS, "--batch-size", "2", "--steps", "3", "--save-every", "2", "--num-classes", "7"])
    path = tmp_path / "train_ddp_checkpoint.pt"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"train_ddp: writing the checkpoint to {path} every 2 steps and at step 3 "
                        f"(--checkpoint to change)")
    assert len(lines) == 2 and lines[1].startswith(f"train_ddp: saved step 3 to {path} (")
    call = lines[1].partition("its weights load with ")[2]
    assert call.startswith(f"crossvit_fast.create_model('crossvit_tiny_240', checkpoint_path={str(path)!r}, "
                           f"num_classes=7, ")
    model = eval(call, {"crossvit_fast": crossvit_fast})
    assert model.num_classes == 7
    for name, value in weights(path).items():
        assert torch.equal(model.state_dict()[name], value), name
    # as README documents it: create_model(name, checkpoint_path=PATH, num_classes=K) and the kwargs
    crossvit_fast.create_model("crossvit_tiny_240", checkpoint_path=str(path), num_classes=7, **MODEL_KWARGS)


@pytest.mark.parametrize("data", ["missing", "file"])
def test_data_that_is_not_a_directory_is_a_usage_error(tmp_path, capsys, data):
    """``--data`` naming nothing or a file: one line naming the argument and exit code 2."""
    (tmp_path / "file").touch()
    with pytest.raises(SystemExit) as exit_:
        train_ddp.main(["--data", str(tmp_path / data), "--steps", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--data" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--save-every", "0"], ["--workers", "-1"],
                                  ["--num-classes", "0"], ["--synthetic-size", "0"], ["--steps", "-1"],
                                  ["--model", "nope"]],
                         ids=" ".join)
def test_a_bad_argument_is_a_usage_error(capsys, argv):
    """One line naming the argument and exit code 2 (was a ZeroDivisionError, or a torch,
    DataLoader or create_model error, from inside the training loop)."""
    with pytest.raises(SystemExit) as exit_:
        train_ddp.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {argv[0]}: " in err and "Traceback" not in err


@pytest.mark.parametrize("value, says", [
    ("[1]", "expected a JSON object of create_model arguments, got a list"),
    ("{bad", "expected a JSON object"),
    ('{"num_classes": 5}', "num_classes is not a model argument here"),
])
def test_bad_model_kwargs_are_one_line(capsys, value, says):
    with pytest.raises(SystemExit) as exit_:
        train_ddp.main(["--model-kwargs", value, "--steps", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert "argument --model-kwargs" in lines[0] and says in lines[0]
