"""Training under ``torch.distributed``: DDP and FSDP2 (``fully_shard``) on two gloo processes on
the CPU give the parameters of one process trained on the whole batch; a distributed
checkpoint of the FSDP2 model resumes into a fresh FSDP2 model, a plain crossvit_fast model and
timm's CrossVit.

Each test spawns its workers once (importing torch costs seconds per process) and runs its
cases there; the workers save results that the test compares with a single-process run.
Workers find each other through a file in the test's tmp dir (no port), time out their
collectives, and are killed if they outlive :data:`TIMEOUT_S`. Where a GPU is lent, the same
tests run on it with NCCL and one process.
"""
import copy
import dataclasses
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F

from crossvit_fast import layers, ops, use_backend

from .numerics import FP32_REL_TOL, LOWP_FACTOR, rel_err
from .test_model import SMALL_MODEL_ARGS, small_model
from .timm_import import import_timm

TIMEOUT_S = 300
STEPS, BATCH = 3, 8                 # steps of SGD on a global batch of 8 images
LR, MOMENTUM = 0.5, 0.9


@dataclasses.dataclass(frozen=True)
class Setup:
    device: str
    pg_backend: str
    world: int


SETUPS = [
    pytest.param(Setup("cpu", "gloo", 2), id="gloo-cpu-2"),
    pytest.param(Setup("cuda", "nccl", 1), id="nccl-cuda-1",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


# ---- spawning ----------------------------------------------------------------------------------

def use_every_fused_op() -> None:
    """Block norms and CLS projections through the fused ops too (by default these sizes take
    ATen's), in the workers and in the single-process references alike."""
    layers.FUSED_NORM_MIN_ELEMENTS = 0
    layers.FUSED_CLS_PROJECTION = True


def use_every_fused_op_here(monkeypatch) -> None:
    """:func:`use_every_fused_op` for this test process, undone after the test."""
    monkeypatch.setattr(layers, "FUSED_NORM_MIN_ELEMENTS", 0)
    monkeypatch.setattr(layers, "FUSED_CLS_PROJECTION", True)


def _entry(rank: int, setup: Setup, workdir: str, case) -> None:
    """A worker: join the process group, run ``case(rank, setup, workdir)``, leave the group.
    One intra-op thread: two processes on two cores with a thread pool each slow every op
    down by orders of magnitude."""
    torch.set_num_threads(1)
    use_every_fused_op()
    if setup.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(setup.pg_backend, init_method=f"file://{workdir}/rendezvous",
                            rank=rank, world_size=setup.world, timeout=timedelta(seconds=120))
    try:
        case(rank, setup, Path(workdir))
    finally:
        dist.destroy_process_group()


def run_workers(case, setup: Setup, workdir: Path) -> None:
    """Run ``case`` in ``setup.world`` spawned processes; a worker's error is raised here (and
    the others are stopped), and so is a timeout, after killing them all."""
    context = mp.start_processes(_entry, args=(setup, str(workdir), case), nprocs=setup.world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{case.__name__}: workers still running after {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# ---- the training both sides run -------------------------------------------------------------

def make_problem(workdir: Path) -> None:
    """The initial weights and the batches, saved for the workers."""
    torch.manual_seed(0)
    batches = [(torch.randn(BATCH, 3, 48, 48), torch.randint(0, 5, (BATCH,))) for _ in range(STEPS + 1)]
    torch.save({"init": small_model(num_classes=5).state_dict(), "batches": batches},
               workdir / "problem.pt")


def load_problem(workdir: Path, device: str):
    """A model with the initial weights on ``device``, and the batches there (the last one is
    for the step after a resume)."""
    problem = torch.load(workdir / "problem.pt")
    model = small_model(num_classes=5)
    model.load_state_dict(problem["init"])
    batches = [(x.to(device), y.to(device)) for x, y in problem["batches"]]
    return model.to(device), batches[:STEPS], batches[STEPS]


def shard(batches, rank: int, world: int):
    """This rank's contiguous part of every batch."""
    n = BATCH // world
    return [(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) for x, y in batches]


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def train(forward, opt, batches, after_backward=lambda: None) -> None:
    """Steps of ``opt`` on the mean cross-entropy of each batch."""
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x).float(), y).backward()
        after_backward()
        opt.step()


def train_bf16_reference(model, batches) -> None:
    """One process's counterpart of FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16)``:
    the forward and backward run on a bf16 copy of the fp32 parameters, whose gradients, cast
    to fp32, step the fp32 parameters."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    masters, copies = list(model.parameters()), list(low.parameters())
    opt = sgd(masters)
    for x, y in batches:
        with torch.no_grad():
            for c, m in zip(copies, masters):
                c.copy_(m)
        low.zero_grad(set_to_none=True)
        F.cross_entropy(low(x.to(torch.bfloat16)).float(), y).backward()
        for c, m in zip(copies, masters):
            m.grad = c.grad.float()
        opt.step()


def cpu_state(model) -> dict:
    """A copy of the model's weights in fp32 on the CPU, where the results are compared."""
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def update_errors(got: dict, want: dict, init: dict) -> dict:
    """Per parameter, the relative error of the training update ``p - p0`` (what the steps
    changed, not the initial weights that dominate ``p``)."""
    return {k: rel_err(got[k] - init[k], want[k] - init[k]) for k in want}


def total_update_error(got: dict, want: dict, init: dict) -> float:
    """The relative error (2-norm) of the update of all parameters together."""
    update = lambda sd: torch.cat([(sd[k].float() - init[k]).flatten() for k in init])  # noqa: E731
    return ((update(got) - update(want)).norm() / update(want).norm()).item()


def worst(errors: dict) -> str:
    name = max(errors, key=errors.get)
    return f"{name} off by {errors[name]:.2e}"


class References:
    """The single-process runs on the whole batch that the workers' results are held to."""

    def __init__(self, workdir: Path, device: str):
        model, batches, _ = load_problem(workdir, device)
        self.init = cpu_state(model)
        self.fp32 = self._trained(model, batches)
        with use_backend("torch"):        # float64 everywhere, also where CUDA picks Triton
            self.fp64 = self._trained(model.double(), [(x.double(), y) for x, y in batches])
        # The bar for an fp32 run: twice the error of the single fp32 run against float64 (at
        # least FP32_REL_TOL). p0 + update rounds in fp32, which bounds what an update can
        # match: the norm weights (near 1) move by ~1e-3, so ~1e-4 relative is one ulp of p.
        self.fp32_tol = max(FP32_REL_TOL, 2 * max(update_errors(self.fp32, self.fp64, self.init).values()))

    def _trained(self, model, batches) -> dict:
        model.load_state_dict(self.init)
        train(model, sgd(model.parameters()), batches)
        return cpu_state(model)


# ---- DDP ---------------------------------------------------------------------------------------

DDP_CASES = ("eager", "checkpointed", "compiled")


def _assert_every_gradient_reduced(model, world: int) -> None:
    """Every parameter has a gradient, the same on every rank (so DDP reduced it), and the
    absorbed key bias's is exactly zero (it cancels in the softmax)."""
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        gathered = [torch.empty_like(p.grad) for _ in range(world)]
        dist.all_gather(gathered, p.grad)
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name}: not reduced"
        if name.endswith("attn.wk.bias"):
            assert not p.grad.any(), f"{name}: gradient not zero"


def _ddp_case(rank: int, setup: Setup, workdir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    for case in DDP_CASES:
        model, batches, _ = load_problem(workdir, setup.device)
        model.set_grad_checkpointing(case == "checkpointed")
        ddp = DDP(model, device_ids=[rank] if setup.device == "cuda" else None)
        forward = torch.compile(ddp, backend="aot_eager") if case == "compiled" else ddp
        train(forward, sgd(ddp.parameters()), shard(batches, rank, setup.world),
              lambda: _assert_every_gradient_reduced(model, setup.world))
        if rank == 0:
            torch.save(cpu_state(model), workdir / f"ddp-{case}.pt")


@pytest.mark.parametrize("setup", SETUPS)
def test_ddp_matches_one_process_on_the_whole_batch(setup, tmp_path, monkeypatch):
    """DDP eager, with activation checkpointing, and compiled (``torch.compile(ddp,
    backend="aot_eager")``): every parameter reduced, with ``find_unused_parameters=False``
    (the default), and the parameters of the single-process run."""
    use_every_fused_op_here(monkeypatch)
    make_problem(tmp_path)
    run_workers(_ddp_case, setup, tmp_path)
    ref = References(tmp_path, setup.device)
    for case in DDP_CASES:
        errors = update_errors(torch.load(tmp_path / f"ddp-{case}.pt"), ref.fp32, ref.init)
        assert max(errors.values()) < ref.fp32_tol, f"{case}: {worst(errors)} (bar {ref.fp32_tol:.1e})"


# ---- FSDP2 and distributed checkpoints --------------------------------------------------------

def _fully_shard(model, mesh, param_dtype=None):
    """FSDP2 per multi-scale block, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=param_dtype)
    for stage in model.blocks:
        fully_shard(stage, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def _full_state_dict(model) -> dict:
    """The unsharded weights on the CPU, copied: with one process on the CPU,
    ``get_model_state_dict`` returns the parameters themselves, which later steps change."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}


def _record_sharded_inputs(record: dict):
    """Wrap the fused cross-attention op to count its calls and the DTensor (sharded)
    parameters it is given (FSDP2 must hand it the unsharded ones)."""
    from torch.distributed.tensor import DTensor
    op = ops.cls_cross_attention

    def recording(*args, **kwargs):
        record["calls"] += 1
        record["dtensors"] += sum(isinstance(a, DTensor) for a in (*args, *kwargs.values()))
        return op(*args, **kwargs)
    ops.cls_cross_attention = recording


def _resume(model, opt, mesh, batch, device: str, workdir: Path) -> dict:
    """Save model and optimizer with torch.distributed.checkpoint, load them into a fresh FSDP2
    model and optimizer; the logits of both, and the weights of both after one more step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=workdir / "dcp")
    torch.manual_seed(1)                               # other initial weights than the saved ones
    fresh = _fully_shard(small_model(num_classes=5).to(device), mesh)
    fresh_opt = sgd(fresh.parameters())
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)   # (creates the momentum buffers)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=workdir / "dcp")
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out = {}
    for name, m, o in (("saved", model, opt), ("resumed", fresh, fresh_opt)):
        with torch.no_grad():
            out[f"{name}_logits"] = m.eval()(batch[0]).cpu()
        train(m.train(), o, [batch])
        out[f"{name}_next"] = _full_state_dict(m)
    return out


def _assert_every_gradient_there(model) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"


def _fsdp_case(rank: int, setup: Setup, workdir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(setup.device, (setup.world,))
    record = {"calls": 0, "dtensors": 0}
    _record_sharded_inputs(record)
    for case, param_dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model, batches, next_batch = load_problem(workdir, setup.device)
        model.set_grad_checkpointing(case == "fp32")
        _fully_shard(model, mesh, param_dtype)
        opt = sgd(model.parameters())
        train(model, opt, shard(batches, rank, setup.world), lambda: _assert_every_gradient_there(model))
        result = {"trained": _full_state_dict(model), "record": dict(record)}
        if case == "fp32":
            result.update(_resume(model, opt, mesh, next_batch, setup.device, workdir))
        if rank == 0:
            torch.save(result, workdir / f"fsdp-{case}.pt")


@pytest.fixture(scope="module", params=SETUPS)
def fsdp_run(request, tmp_path_factory):
    """The workdir of one FSDP2 run: fp32 with activation checkpointing (then saved with
    torch.distributed.checkpoint and resumed), and bf16 mixed precision."""
    setup, workdir = request.param, tmp_path_factory.mktemp("fsdp")
    make_problem(workdir)
    run_workers(_fsdp_case, setup, workdir)
    return setup, workdir


def test_fsdp2_matches_one_process_on_the_whole_batch(fsdp_run, monkeypatch):
    """FSDP2 (``fully_shard`` per multi-scale block and the root): the fused ops get unsharded
    parameters, and the trained weights are the single-process run's (fp32, with activation
    checkpointing)."""
    setup, workdir = fsdp_run
    use_every_fused_op_here(monkeypatch)
    result = torch.load(workdir / "fsdp-fp32.pt")
    assert result["record"]["calls"] > 0 and result["record"]["dtensors"] == 0
    ref = References(workdir, setup.device)
    errors = update_errors(result["trained"], ref.fp32, ref.init)
    assert max(errors.values()) < ref.fp32_tol, f"{worst(errors)} (bar {ref.fp32_tol:.1e})"


def test_fsdp2_bf16_mixed_precision_matches_the_bf16_single_process_run(fsdp_run, monkeypatch):
    """``MixedPrecisionPolicy(param_dtype=bfloat16)`` (gradients reduced in bf16, its default)
    against one process running bf16 copies of the same fp32 weights.

    The two bf16 runs round differently (half batches, the bf16 reduction), so they may differ
    by about as much as bf16 differs from fp32, and no more: the bar is LOWP_FACTOR times the
    bf16 single run's error against the fp32 one (about 7% here, so the bar is ~30%; a gradient
    summed instead of averaged, or one rank's half of the batch lost, is off by 70-100%).
    Measured over all parameters at once: per parameter, bf16's error after three steps ranges
    from 1% to 40% (small, cancelling gradients), too noisy to bound one by one."""
    setup, workdir = fsdp_run
    use_every_fused_op_here(monkeypatch)
    ref = References(workdir, setup.device)
    model, batches, _ = load_problem(workdir, setup.device)
    train_bf16_reference(model, batches)
    bf16 = cpu_state(model)
    bf16_own = total_update_error(bf16, ref.fp32, ref.init)
    error = total_update_error(torch.load(workdir / "fsdp-bf16.pt")["trained"], bf16, ref.init)
    assert error < LOWP_FACTOR * bf16_own, f"off by {error:.2e}; bf16's own error {bf16_own:.2e}"


def test_distributed_checkpoint_resumes_fsdp2_model_and_optimizer(fsdp_run):
    """The FSDP2 model and optimizer saved with torch.distributed.checkpoint, loaded into a
    fresh FSDP2 model and optimizer: the same logits and the same next step, bit for bit."""
    _, workdir = fsdp_run
    result = torch.load(workdir / "fsdp-fp32.pt")
    assert torch.equal(result["resumed_logits"], result["saved_logits"])
    for name, value in result["saved_next"].items():
        assert torch.equal(result["resumed_next"][name], value), name


@pytest.mark.parametrize("kind", ["crossvit_fast", "timm"])
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")   # what we do here
def test_distributed_checkpoint_loads_into_one_process(fsdp_run, kind):
    """The same checkpoint read by one process without a process group into a plain
    crossvit_fast model or timm's CrossVit (``strict=True``): the FSDP2 model's logits."""
    _, workdir = fsdp_run
    if kind == "timm":
        model = import_timm().models.crossvit.CrossVit(**dict(SMALL_MODEL_ARGS, num_classes=5))
    else:
        model = small_model(num_classes=5)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=workdir / "dcp")
    model.load_state_dict(state["model"], strict=True)
    _, _, batch = load_problem(workdir, "cpu")
    with torch.no_grad():
        logits = model.eval()(batch[0])
    assert rel_err(logits, torch.load(workdir / "fsdp-fp32.pt")["saved_logits"]) < FP32_REL_TOL
