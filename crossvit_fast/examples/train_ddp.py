"""Train a crossvit_fast CrossViT with DistributedDataParallel, resumably.

    torchrun --standalone --nproc-per-node 2 -m crossvit_fast.examples.train_ddp --steps 100
    torchrun --standalone --nproc-per-node 8 -m crossvit_fast.examples.train_ddp \\
        --data /data/imagenet/train --model crossvit_18_240 --batch-size 128 --amp --compile

Synthetic images by default, or an ImageFolder-style directory (one subdirectory of images
per class) with ``--data``. Each process takes its shard of every global batch
(``DistributedSampler``); gradients are averaged by DDP (NCCL on GPUs, gloo on the CPU).
Every ``--save-every`` steps and at the end rank 0 writes ``--checkpoint`` (model, optimizer,
step; by default ``train_ddp_checkpoint.pt`` in the working directory, said at the start), and
``--resume`` continues from it where it stopped, mid-epoch included. The model weights in it load
with ``crossvit_fast.create_model(name, checkpoint_path=..., num_classes=K)``, K being the
example's class count (``--num-classes``, or the class directories of ``--data``), and with the
same ``--model-kwargs``: the example prints that call when it saves. Run without torchrun, it
trains in one process. An example, not a training recipe: no augmentation, schedule or EMA (timm's
train.py has those, and takes this model too).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import crossvit_fast
from crossvit_fast.cli import OneLineErrorParser, model_name, non_negative_int, positive_int

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def directory(text: str) -> Path:
    """``--data``'s type: an existing directory (else one line and exit code 2, not a traceback
    from the first listing of it)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory" if path.exists()
                                         else f"{text!r} does not exist")
    return path


def training_device(text: str) -> str:
    """``--device``'s type: a device torch knows, CUDA only where it is available (else one line
    and exit code 2, not a traceback from the first tensor moved there)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA device found" if torch.version.cuda else "this torch is a build without CUDA"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch {torch.__version__}: "
                                             f"{why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: expected an index below {torch.cuda.device_count()} "
                                             f"(the number of CUDA devices here)")
    return text


def model_kwargs(text: str) -> dict:
    """A JSON object of create_model arguments; the class count comes from --data or
    --num-classes, so it is not among them."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of create_model "
                                         f"arguments, got a {type(value).__name__}")
    if "num_classes" in value:
        raise argparse.ArgumentTypeError(f"{text!r}: num_classes is not a model argument here; "
                                         f"the classes come from --data or --num-classes")
    return value


DEFAULT_CHECKPOINT = Path("train_ddp_checkpoint.pt")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default: ``off`` for a flag; an option without one (None)
    says in its help what happens then, as do those that give their default themselves."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "(default:" in help_ or action.default is None or action.default is argparse.SUPPRESS:
            return help_
        if isinstance(action.default, bool) and action.nargs == 0:   # store_true / store_false
            return f"{help_} (default: {'on' if action.default else 'off'})"
        return f"{help_} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m crossvit_fast.examples.train_ddp", formatter_class=_DefaultsFormatter,
        description="Train a crossvit_fast CrossViT with DDP (launch with torchrun), resumably.")
    parser.add_argument("--model", default="crossvit_tiny_240", type=model_name, metavar="NAME",
                        help="variant name (crossvit_fast.list_models())")
    parser.add_argument("--model-kwargs", default="{}", type=model_kwargs, metavar="JSON",
                        help="JSON of create_model arguments, e.g. '{\"drop_path_rate\": 0.1}'")
    parser.add_argument("--pretrained", action="store_true", help="start from timm's published weights")
    parser.add_argument("--data", type=directory, metavar="DIR",
                        help="ImageFolder-style directory (default: synthetic images)")
    parser.add_argument("--synthetic-size", type=positive_int, default=1024, help="number of synthetic images")
    parser.add_argument("--num-classes", type=positive_int, default=10, help="classes of the synthetic data")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per process and step")
    parser.add_argument("--steps", type=non_negative_int, default=100,
                        help="optimizer steps in all (a resumed run continues to it)")
    parser.add_argument("--opt", choices=("adamw", "sgd"), default="adamw", help="optimizer")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05,
                        help="AdamW/SGD weight decay (none on biases, norms, CLS tokens, position embeddings)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DDP model")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute the blocks in the backward")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes per rank")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, metavar="PATH",
                        help=f"file rank 0 writes (model, optimizer, step: about 80 MB for crossvit_tiny_240 "
                             f"with AdamW) every "
                             f"--save-every steps and at the end (default: {DEFAULT_CHECKPOINT}, in the "
                             f"working directory)")
    parser.add_argument("--save-every", type=positive_int, default=50, help="steps between checkpoints (and at the end)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and random draws")
    parser.add_argument("--device", type=training_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (under torchrun each process takes cuda:LOCAL_RANK) "
                             "(default: cuda where CUDA is available, else cpu)")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ---- processes ---------------------------------------------------------------------------------

def init_distributed(device: str) -> Tuple[int, int, torch.device]:
    """``(rank, world size, device)``: joins torchrun's process group (NCCL for CUDA, gloo
    otherwise) where torchrun started this process, else one process on its own."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device)
    on_cuda = torch.device(device).type == "cuda"
    dist.init_process_group("nccl" if on_cuda else "gloo")
    if on_cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


# ---- data --------------------------------------------------------------------------------------

class SyntheticImages(Dataset):
    """Random images and labels, the same for an index in every process and run."""

    def __init__(self, size: int, image_size: Tuple[int, int], num_classes: int, seed: int):
        self.size, self.image_size, self.num_classes, self.seed = size, image_size, num_classes, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(3, *self.image_size, generator=generator)
        return image, int(torch.randint(self.num_classes, (), generator=generator))


class ImageFolder(Dataset):
    """``root/<class>/<image>``: classes in sorted order, each image resized (shorter side) and
    centre-cropped to ``image_size``, normalized with ``mean``/``std``. Reads with Pillow
    (torchvision not needed)."""

    def __init__(self, root: Path, image_size: Tuple[int, int], mean, std):
        try:
            import PIL.Image
        except ImportError as err:
            raise SystemExit("--data needs Pillow to read images: pip install pillow") from err
        self._open, self._bicubic = PIL.Image.open, PIL.Image.Resampling.BICUBIC
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [(path, label) for label, name in enumerate(self.classes)
                        for path in sorted((root / name).rglob("*"))
                        if path.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise SystemExit(f"--data {root}: no images found in class subdirectories")
        self.image_size = image_size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with self._open(path) as image:
            image = self._resize_and_crop(image.convert("RGB"))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255
        return (pixels - self.mean) / self.std, label

    def _resize_and_crop(self, image):
        (h, w), (height, width) = self.image_size, (image.height, image.width)
        scale = max(h / height, w / width)
        image = image.resize((max(w, round(width * scale)), max(h, round(height * scale))), self._bicubic)
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return image.crop((left, top, left + w, top + h))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch after its first ``start`` indices."""

    start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


def make_dataset(args: argparse.Namespace, model: crossvit_fast.CrossViT) -> Dataset:
    cfg = model.pretrained_cfg
    if args.data is not None:
        return ImageFolder(args.data, model.img_size, cfg["mean"], cfg["std"])
    return SyntheticImages(args.synthetic_size, model.img_size, args.num_classes, args.seed)


def num_classes(args: argparse.Namespace) -> int:
    """The classes of ``--data`` (its subdirectories), else ``--num-classes``."""
    if args.data is None:
        return args.num_classes
    return sum(1 for d in args.data.iterdir() if d.is_dir())


# ---- model, optimizer and checkpoint -----------------------------------------------------------

def make_optimizer(args: argparse.Namespace, model: crossvit_fast.CrossViT) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9); no weight decay on biases, norms, CLS tokens and position
    embeddings, as timm."""
    skip = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in skip]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in skip]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=args.lr)


def resume_from(path: Path, model, optimizer, device: torch.device) -> int:
    """Model and optimizer state from ``path``; the step to continue from."""
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def save_checkpoint(path: Path, model, optimizer, step: int, args: argparse.Namespace) -> None:
    """Written to a temporary file, then renamed: a run killed while saving leaves the last
    checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, tmp)
    os.replace(tmp, path)


def say(line: str) -> None:
    print(f"train_ddp: {line}", flush=True)


def start_message(args: argparse.Namespace, step: int) -> str:
    """Where the checkpoint goes (the default is a file in the working directory)."""
    path = args.checkpoint.resolve()
    if step >= args.steps:
        return f"{path} is at step {step} already (--steps {args.steps}): nothing to train"
    start = f"resuming from {path} at step {step}; " if step else ""
    every = "every step" if args.save_every == 1 else f"every {args.save_every} steps and at step {args.steps}"
    return f"{start}writing the checkpoint to {path} {every} (--checkpoint to change)"


def load_call(args: argparse.Namespace) -> str:
    """The ``crossvit_fast.create_model`` call that loads the checkpoint's weights: the example's
    class count and ``--model-kwargs`` (the head and the architecture it trained)."""
    kwargs = dict(num_classes=num_classes(args), **args.model_kwargs)
    named = {k: v for k, v in kwargs.items() if k.isidentifier()}
    others = {k: v for k, v in kwargs.items() if k not in named}
    parts = [repr(args.model), f"checkpoint_path={str(args.checkpoint.resolve())!r}"]
    parts += [f"{k}={v!r}" for k, v in named.items()] + ([f"**{others!r}"] if others else [])
    return f"crossvit_fast.create_model({', '.join(parts)})"


def saved_message(args: argparse.Namespace, step: int) -> str:
    path = args.checkpoint.resolve()
    size = path.stat().st_size / 1e6
    return (f"saved step {step} to {path} ({size:.1f} MB: model, optimizer, step); its weights load "
            f"with {load_call(args)}")


# ---- training ----------------------------------------------------------------------------------

def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one process's random draws (dropout, stochastic depth) in one step: other
    masks on every process, as timm's train.py seeds ``seed + rank``, and the same ones again
    when a run resumes at that step, with no generator state in the checkpoint."""
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2 ** 63

def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    model = crossvit_fast.create_model(args.model, pretrained=args.pretrained,
                                       num_classes=num_classes(args), **args.model_kwargs).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = make_optimizer(args, model)
    step = 0
    if args.resume and args.checkpoint.exists():
        step = resume_from(args.checkpoint, model, optimizer, device)
    if rank == 0:
        say(start_message(args, step))
    # every rank starts from rank 0's weights (DDP broadcasts them)
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if world > 1 else model)
    forward = torch.compile(ddp) if args.compile else ddp

    dataset = make_dataset(args, model)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images make no batch of {args.batch_size} per process on {world}")
    progress = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train", unit="step")
    saved = None
    while step < args.steps:
        epoch, done = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = done * args.batch_size
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda")
        for images, labels in loader:
            torch.manual_seed(step_seed(args.seed, rank, step))
            loss = train_step(forward, optimizer, images.to(device), labels.to(device), args.amp)
            step += 1
            progress.update()
            progress.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
            if rank == 0 and (step % args.save_every == 0 or step == args.steps):
                save_checkpoint(args.checkpoint, model, optimizer, step, args)
                saved = step
            if step == args.steps:
                break
    progress.close()
    if rank == 0 and saved is not None:
        say(saved_message(args, saved))


def train_step(forward, optimizer, images: torch.Tensor, labels: torch.Tensor, amp: bool) -> float:
    """One optimizer step on the mean cross-entropy; the loss (this process's)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(forward(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    try:
        train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
