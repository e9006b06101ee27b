"""Checkpoint loading: file formats, wrappers, key styles, errors, and pretrained via the Hub cache."""
import json
import logging
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

import crossvit_fast
from crossvit_fast import CheckpointError, create_model

from .timm_import import import_timm

NAME = "crossvit_9_240"


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return create_model(NAME).eval()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# safetensors files hold a flat mapping of tensors; pickles may wrap it as training scripts do
ROUND_TRIPS = [("safetensors", None)] + [(fmt, wrapper) for fmt in ("pth", "pt", "bin")
                                         for wrapper in (None, "model", "state_dict")]


@pytest.mark.parametrize("fmt,wrapper", ROUND_TRIPS)
def test_round_trip(source, tmp_path, fmt, wrapper):
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrapper: state, "epoch": 3} if wrapper else state, path)
    assert same_weights(create_model(NAME, checkpoint_path=str(path)), source)


@pytest.mark.parametrize("name", ["ckpt.bin", "ckpt.pth", "ckpt"])
def test_a_safetensors_file_under_another_name_is_read_as_one(source, tmp_path, name):
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / name))
    assert same_weights(create_model(NAME, checkpoint_path=str(tmp_path / name)), source)


def test_ibm_key_style_and_ddp_prefix_load(source, tmp_path):
    state = {("module." + k).replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
             for k, v in source.state_dict().items()}
    assert "module.pos_embed.1" in state
    torch.save(state, tmp_path / "ibm.pth")
    assert same_weights(create_model(NAME, checkpoint_path=str(tmp_path / "ibm.pth")), source)


def test_mismatched_keys_and_shapes_are_named(source, tmp_path):
    state = dict(source.state_dict())
    del state["blocks.0.fusion.0.attn.wq.weight"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["head.0.weight"] = torch.zeros(10, 128)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        create_model(NAME, checkpoint_path=str(tmp_path / "bad.pth"))
    msg = str(err.value)
    assert "missing keys: blocks.0.fusion.0.attn.wq.weight" in msg
    assert "unexpected keys: blocks.0.extra.weight" in msg
    assert "head.0.weight (checkpoint (10, 128), model (1000, 128))" in msg


def test_timm_train_script_checkpoint_loads_its_ema_weights(source, tmp_path):
    """timm's train.py writes model_best.pth.tar with the args and, with --model-ema, EMA weights:
    timm's loader prefers those, and so does create_model (use_ema=False takes the plain ones)."""
    import argparse
    plain = create_model(NAME).state_dict()
    ema = source.state_dict()
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": NAME, "state_dict": plain, "state_dict_ema": ema,
                "args": argparse.Namespace(lr=0.1, model=NAME, amp=True)}, path)
    assert same_weights(create_model(NAME, checkpoint_path=str(path)), source)
    model = create_model(NAME)
    crossvit_fast.checkpoint.load_checkpoint(model, path, use_ema=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.items())
    torch.save({"model": plain, "model_ema": ema}, tmp_path / "last.ckpt")
    assert same_weights(create_model(NAME, checkpoint_path=str(tmp_path / "last.ckpt")), source)


def test_loading_logs_timms_lines(source, tmp_path, caplog):
    """What was loaded, in timm's words (was: nothing; timm's inference.py users read this line
    to see that the EMA weights were taken)."""
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": create_model(NAME).state_dict(), "state_dict_ema": source.state_dict()}, path)
    plain = tmp_path / "plain.pth"
    torch.save(source.state_dict(), plain)
    with caplog.at_level(logging.INFO, logger="crossvit_fast"):
        create_model(NAME, checkpoint_path=str(path))
        create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(plain)))
        make_hub_cache(tmp_path, NAME, source.state_dict())
        create_model(NAME, pretrained=True, cache_dir=str(tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        f"Loaded state_dict_ema from checkpoint '{path}'",
        f"Loading pretrained weights from file ({plain})", f"Loaded  from checkpoint '{plain}'",
        f"Loading pretrained weights from Hugging Face hub (timm/{NAME}.in1k)",
        f"Loaded  from checkpoint '{tmp_path}/models--timm--{NAME}.in1k/snapshots/{HUB_COMMIT}/model.safetensors'"]


def test_another_variant_is_refused(tmp_path):
    torch.save(create_model("crossvit_tiny_240").state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        create_model(NAME, checkpoint_path=str(tmp_path / "tiny.pth"))


def _write_bad_checkpoint(kind: str, path, source) -> None:
    """One way a checkpoint file can be wrong (``kind``), written to ``path``."""
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if kind in ("truncated", "garbage", "empty"):
        if path.suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
        data = path.read_bytes()
        path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[kind])
    elif kind == "whole model":
        torch.save(source, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "not tensors":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    elif kind == "int keys":
        torch.save({0: torch.zeros(3)}, path)
    elif kind == "sparse tensor":
        state["head.0.bias"] = state["head.0.bias"].to_sparse()
        torch.save(state, path)
    elif kind == "missing key":
        del state["head.0.bias"]
        torch.save(state, path)
    elif kind == "wrong shape":
        state["head.0.bias"] = torch.zeros(3)
        torch.save(state, path)
    elif kind == "no patch positions":
        state["pos_embed_0"] = state["pos_embed_0"][:, :1]
        torch.save(state, path)
    elif kind != "missing":
        raise AssertionError(kind)


# (kind, file name, what the message says)
BAD_CHECKPOINTS = [
    ("missing", "w.pth", "no such file"),
    ("truncated", "w.pth", "neither a .safetensors file nor a torch.save file of tensors, truncated or corrupt"),
    ("garbage", "w.pth", "truncated or corrupt"),
    ("empty", "w.pth", "truncated or corrupt? (EOFError)"),
    ("garbage", "weights.npz", "neither a .safetensors file nor a torch.save file"),
    ("truncated", "w.safetensors", "not a readable .safetensors file, truncated or corrupt"),
    ("garbage", "w.safetensors", "not a readable .safetensors file"),
    ("empty", "w.safetensors", "not a readable .safetensors file"),
    ("whole model", "w.pth", "holds pickled Python objects, not only tensors (Unsupported global: GLOBAL "
                             "crossvit_fast.model.CrossViT"),
    ("list", "w.pth", "expected a mapping of parameter names to tensors"),
    ("not tensors", "w.pth", "expected a mapping of parameter names to tensors"),
    ("int keys", "w.pth", "expected a mapping of parameter names to tensors"),
    ("sparse tensor", "w.pth", "copy_() between dense and sparse Tensors is not implemented"),
    ("missing key", "w.pth", "does not fit this model: missing keys: head.0.bias"),
    ("wrong shape", "w.pth", "head.0.bias (checkpoint (3,), model (1000,))"),
    ("no patch positions", "w.pth", "pos_embed_0 (checkpoint (1, 1, 128), model (1, 401, 128))"),
]


@pytest.fixture(scope="module")
def target():
    """A model that bad checkpoints are loaded into (a failed load may leave it half loaded)."""
    return create_model(NAME)


@pytest.mark.parametrize("kind,name,says", BAD_CHECKPOINTS, ids=[f"{k}-{n}" for k, n, _ in BAD_CHECKPOINTS])
def test_every_bad_checkpoint_raises_one_plain_line(source, target, tmp_path, kind, name, says):
    """Whatever is wrong with the file, a CheckpointError (a RuntimeError, as timm's errors) whose
    message is one line of plain text naming the file and what is wrong."""
    path = tmp_path / name
    _write_bad_checkpoint(kind, path, source)
    with pytest.raises(CheckpointError) as err:
        crossvit_fast.load_checkpoint(target, path)
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert says in msg and str(path) in msg
    assert "\n" not in msg and "\x1b" not in msg, repr(msg)


def test_checkpoint_errors_are_what_timm_raises_there(source, target, tmp_path):
    """For each bad file, timm's own load_checkpoint raises some type; ours is an instance of it
    (FileNotFoundError, RuntimeError, SafetensorError), except where timm fails by accident with
    an AttributeError (not a mapping) or an EOFError (empty pickle): there ours is a RuntimeError.
    (timm reads .npz files as JAX checkpoints, through the model's own loader: not compared.)"""
    timm = import_timm()
    checked = set()
    for i, (kind, name, _) in enumerate(BAD_CHECKPOINTS):
        if name.endswith(".npz"):
            continue
        path = tmp_path / str(i) / name
        path.parent.mkdir()
        _write_bad_checkpoint(kind, path, source)
        with pytest.raises(Exception) as theirs:
            timm.models.load_checkpoint(target, str(path))
        with pytest.raises(CheckpointError) as ours:
            crossvit_fast.load_checkpoint(target, path)
        if type(theirs.value) in (AttributeError, EOFError):
            continue
        assert isinstance(ours.value, type(theirs.value)), (kind, name, type(theirs.value))
        checked.add(type(theirs.value).__name__)
    assert checked == {"FileNotFoundError", "RuntimeError", "SafetensorError"}


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file"):
        create_model(NAME, checkpoint_path=str(tmp_path))


def test_compiled_model_checkpoint_loads(source, tmp_path):
    """torch.compile's ``_orig_mod.`` prefix (with or around DDP's ``module.``) is dropped, as timm does."""
    state = {f"_orig_mod.module.{k}": v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "compiled.pth")
    assert same_weights(create_model(NAME, checkpoint_path=str(tmp_path / "compiled.pth")), source)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(root, name, state, repo_id=None, filename="model.safetensors"):
    """The on-disk layout huggingface_hub uses for a cached file of repo ``repo_id`` (default
    timm/<name>.in1k)."""
    repo = root / ("models--" + (repo_id or f"timm/{name}.in1k").replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    snap = repo / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in state.items()}
    (snap / filename).parent.mkdir(parents=True, exist_ok=True)
    if filename.endswith(".safetensors"):
        save_file(state, str(snap / filename))
    else:
        torch.save(state, snap / filename)


def test_pretrained_from_a_local_hub_cache(source, tmp_path):
    make_hub_cache(tmp_path, NAME, source.state_dict())
    assert same_weights(create_model(NAME, pretrained=True, cache_dir=str(tmp_path)), source)
    # another num_classes keeps the fresh head, as timm does
    model = create_model(NAME, pretrained=True, cache_dir=str(tmp_path), num_classes=7)
    assert model.head[0].weight.shape == (7, 128)
    assert torch.equal(model.blocks[0].projs[0][2].weight, source.blocks[0].projs[0][2].weight)


@pytest.mark.parametrize("filename, overlay", [
    ("model.safetensors", {}), ("pytorch_model.bin", {}),          # timm's fallback file
    ("weights/ft.safetensors", {"hf_hub_filename": "weights/ft.safetensors"}),
])
def test_pretrained_from_the_configs_hub_repo(source, tmp_path, filename, overlay):
    """``pretrained_cfg_overlay=dict(hf_hub_id=...)`` loads that repository's weights, not timm's
    (which are cached too, and differ), as timm does."""
    make_hub_cache(tmp_path, NAME, create_model(NAME).state_dict())          # timm's in1k
    make_hub_cache(tmp_path, NAME, source.state_dict(), repo_id="myorg/finetuned", filename=filename)
    model = create_model(NAME, pretrained=True, cache_dir=str(tmp_path),
                         pretrained_cfg_overlay=dict(hf_hub_id="myorg/finetuned", **overlay))
    assert same_weights(model, source)


def test_pretrained_strict_false_loads_what_the_file_has(source, tmp_path):
    path = tmp_path / "no_head.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("head.")},
              str(path))
    with pytest.raises(CheckpointError, match="missing keys: head.0.bias"):
        create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model = create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                         pretrained_strict=False)
    assert torch.equal(model.pos_embed_0, source.pos_embed_0)
    assert not torch.equal(model.head[0].weight, source.head[0].weight)


def test_pretrained_from_the_configs_url_downloads_once(source, tmp_path):
    """A config with a ``url`` and no ``hf_hub_id`` (e.g. the official IBM release) loads the
    file there, official key style included, downloaded once into ``cache_dir``, as timm."""
    ibm = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
           for k, v in source.state_dict().items()}
    served = tmp_path / "served" / "crossvit_9_224.pth"
    served.parent.mkdir()
    torch.save(ibm, served)
    cache = tmp_path / "cache"
    overlay = dict(hf_hub_id=None, url=served.as_uri())
    assert same_weights(create_model(NAME, pretrained=True, cache_dir=str(cache),
                                     pretrained_cfg_overlay=overlay), source)
    assert (cache / "crossvit_9_224.pth").is_file()
    served.unlink()   # the cached copy is used from now on
    assert same_weights(create_model(NAME, pretrained=True, cache_dir=str(cache),
                                     pretrained_cfg_overlay=overlay), source)
    timm_model = import_timm().create_model(NAME, pretrained=True, cache_dir=str(cache),
                                            pretrained_cfg_overlay=overlay)
    assert same_weights(timm_model, source)


def test_a_pretrained_cfg_dict_names_its_own_weights(source, tmp_path):
    """A ``pretrained_cfg`` dict replaces where the weights come from, as timm's does (was: merged,
    so its url lost to timm's hf_hub_id and timm's published weights loaded): its url's file
    loads; a dict naming no weights has none to load (RuntimeError, as timm's); an overlay
    sharing keys with the dict wins over it (was: TypeError 'multiple values')."""
    served = tmp_path / "served" / "mine.pth"
    served.parent.mkdir()
    torch.save(source.state_dict(), served)
    make_hub_cache(tmp_path, NAME, create_model(NAME).state_dict())          # timm's in1k, cached
    # (timm's dict replaces the whole config: its input size is given, else timm's default 224)
    size = dict(input_size=(3, 240, 240), fixed_input_size=True, num_classes=1000)
    for factory in (create_model, import_timm().create_model):
        model = factory(NAME, pretrained=True, cache_dir=str(tmp_path),
                        pretrained_cfg=dict(url=served.as_uri(), **size))
        assert same_weights(model, source), factory
        with pytest.raises(RuntimeError, match=f"No pretrained weights exist for {NAME}"):
            factory(NAME, pretrained=True, cache_dir=str(tmp_path),
                    pretrained_cfg=dict(architecture=NAME, **size))
        model = factory(NAME, pretrained_cfg=dict(size, num_classes=10), pretrained_cfg_overlay=dict(num_classes=5))
        assert model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5
    # a model source's config with an overlay of a key it has (was: the same TypeError)
    folder = tmp_path / "saved"
    import_timm().models.save_for_hf(source, str(folder))
    model = create_model(f"local-dir:{folder}", pretrained=True, pretrained_cfg_overlay=dict(crop_pct=0.95))
    assert model.pretrained_cfg["crop_pct"] == 0.95 and same_weights(model, source)


def test_pretrained_cfg_of_another_type_is_named():
    with pytest.raises(TypeError, match="pretrained_cfg must be a tag, a dict or timm's PretrainedCfg, got int"):
        create_model(NAME, pretrained_cfg=123)
    with pytest.raises(TypeError, match="pretrained_cfg_overlay must be a dict, got list"):
        create_model(NAME, pretrained_cfg_overlay=[("num_classes", 5)])


def test_pretrained_source_order_is_timms(source, tmp_path):
    """state_dict, then file, then hf_hub_id, then url: the first the config names is loaded."""
    other = create_model(NAME)
    make_hub_cache(tmp_path, NAME, other.state_dict(), repo_id="myorg/other")
    hub_then_url = dict(hf_hub_id="myorg/other", url=(tmp_path / "absent.pth").as_uri())
    assert same_weights(create_model(NAME, pretrained=True, cache_dir=str(tmp_path),
                                     pretrained_cfg_overlay=hub_then_url), other)
    state = create_model(NAME, pretrained=True, cache_dir=str(tmp_path),
                         pretrained_cfg_overlay=dict(hub_then_url, state_dict=source.state_dict()))
    assert same_weights(state, source)
    path = tmp_path / "file.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert same_weights(create_model(NAME, pretrained=True, cache_dir=str(tmp_path),
                                     pretrained_cfg_overlay=dict(hub_then_url, file=str(path))), source)


def test_timm_use_old_cache_prefers_a_cached_url(source, tmp_path, monkeypatch):
    """With TIMM_USE_OLD_CACHE=1 a config's url whose file is already in torch hub's checkpoints
    folder wins over its hf_hub_id, as in timm; without it the Hub's weights load."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    old_cache = tmp_path / "torch" / "hub" / "checkpoints"
    old_cache.mkdir(parents=True)
    torch.save(source.state_dict(), old_cache / "crossvit_9_240.pth")
    other = create_model(NAME)
    make_hub_cache(tmp_path, NAME, other.state_dict(), repo_id="myorg/other")
    overlay = dict(hf_hub_id="myorg/other", url="https://example.com/weights/crossvit_9_240.pth")
    build = lambda: create_model(NAME, pretrained=True, cache_dir=str(tmp_path),
                                 pretrained_cfg_overlay=overlay)
    assert same_weights(build(), other)
    monkeypatch.setenv("TIMM_USE_OLD_CACHE", "1")
    assert same_weights(build(), source)


def test_pretrained_url_errors_and_no_source(tmp_path):
    absent = (tmp_path / "absent.pth").as_uri()
    with pytest.raises(OSError, match=f"could not fetch pretrained weights for {NAME} from "
                                      f"{absent}: .*pretrained_cfg_overlay=dict\\(file=PATH\\) "
                                      f"with pretrained=True$"):
        create_model(NAME, pretrained=True, cache_dir=str(tmp_path / "cache"),
                     pretrained_cfg_overlay=dict(hf_hub_id=None, url=absent))
    assert not (tmp_path / "cache" / "absent.pth").exists()
    with pytest.raises(CheckpointError, match="the URL 'https://example.com/' names no file"):
        create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=None,
                                                                       url="https://example.com/"))
    # a config naming no weights: timm raises a RuntimeError (CheckpointError is one)
    for factory in (create_model, import_timm().create_model):
        with pytest.raises(RuntimeError, match=f"No pretrained weights exist for {NAME}"):
            factory(NAME, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=None))


@pytest.mark.parametrize("source", ["local-dir", "hf-hub", "hf_hub"])
def test_timm_model_sources_load_the_saved_model(source, tmp_path):
    """A CrossViT saved by timm's ``save_for_hf`` (config.json + model.safetensors) loads from
    ``local-dir:<folder>`` or, placed in a Hub cache, ``hf-hub:<repo>`` (or timm's deprecated
    ``hf_hub:``): the variant, its arguments, classes and weights."""
    timm = import_timm()
    torch.manual_seed(1)
    saved = create_model("crossvit_tiny_240", num_classes=7, qkv_bias=False).eval()
    folder = tmp_path / "saved"
    timm.models.save_for_hf(saved, folder)
    if source == "local-dir":
        name, cache = f"local-dir:{folder}", None
    else:
        cache = tmp_path / "cache"
        config = json.loads((folder / "config.json").read_text())
        make_hub_cache(cache, None, saved.state_dict(), repo_id="myorg/crossvit-ft")
        snapshot = next((cache / "models--myorg--crossvit-ft" / "snapshots").iterdir())
        (snapshot / "config.json").write_text(json.dumps(config))
        name, cache = f"{source}:myorg/crossvit-ft", str(cache)
    model = create_model(name, pretrained=True, cache_dir=cache).eval()
    assert model.num_classes == 7 and model.blocks[0].blocks[0][0].attn.qkv.bias is None
    assert same_weights(model, saved)
    assert model.pretrained_cfg["source"] == source.replace("_", "-")
    # the source's own weights win over a state_dict or file an overlay names, as in timm
    other = create_model("crossvit_tiny_240", num_classes=7, qkv_bias=False)
    overlay = dict(state_dict=other.state_dict())
    assert same_weights(create_model(name, pretrained=True, cache_dir=cache,
                                     pretrained_cfg_overlay=overlay), saved)
    assert same_weights(timm.create_model(f"local-dir:{folder}", pretrained=True,
                                          pretrained_cfg_overlay=overlay), saved)


def test_a_model_source_is_read_as_timms_loader_reads_it(tmp_path):
    """What timm records from a ``save_for_hf`` folder, ours records too: the labels at the top of
    config.json, ``input_size`` as a tuple (timm's ``onnx_export`` adds tuples to it), the saved
    arguments as ``pretrained_model_args``; and timm's script helper
    ``resolve_model_input_args`` (which names the variant ``model_name``) builds the model."""
    timm = import_timm()
    torch.manual_seed(1)
    saved = create_model("crossvit_tiny_240", num_classes=3).eval()
    labels = dict(label_names=["cat", "dog", "bird"], label_descriptions={"cat": "a cat"})
    timm.models.save_for_hf(saved, tmp_path, model_config=labels)
    name = f"local-dir:{tmp_path}"
    theirs = timm.create_model(name, pretrained=True)
    ours = create_model(name, pretrained=True)
    for key in ("label_names", "label_descriptions", "input_size", "num_classes"):
        assert ours.pretrained_cfg[key] == theirs.pretrained_cfg[key], key
    assert ours.pretrained_cfg["input_size"] == (3, 240, 240)
    assert ours.pretrained_model_args == theirs.pretrained_model_args != {}
    assert ours._model_args == theirs._model_args
    for source, args in ((name, {}), ("crossvit_tiny_240", {"img_size": 240, "in_chans": 3})):
        kwargs = timm.models.resolve_model_input_args(source, args, pretrained=source == name)
        ours, theirs = create_model(**kwargs), timm.create_model(**kwargs)
        assert ours.pretrained_model_args == theirs.pretrained_model_args, source
        assert ours._model_args == theirs._model_args, source
        assert ours.num_classes == theirs.num_classes
        if source == name:
            assert same_weights(ours, saved)


def test_timm_model_source_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json in"):
        create_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet50", "pretrained_cfg": {}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="holds a 'resnet50' model, not a CrossViT variant"):
        create_model(f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="model source 'hf:' .* is not known"):
        create_model("hf:timm/crossvit_9_240.in1k")
    for prefix in ("hf-hub:", "hf_hub:", "local-dir:"):
        with pytest.raises(ValueError, match="has no model id or path after"):
            create_model(prefix)


def test_an_empty_checkpoint_path_loads_nothing():
    """timm's training scripts pass ``checkpoint_path=''`` for none; timm's create_model then
    builds the model as without it."""
    torch.manual_seed(3)
    model = create_model(NAME, checkpoint_path="")
    torch.manual_seed(3)
    assert same_weights(model, create_model(NAME))


NO_WEIGHTS = (r"could not fetch pretrained weights for crossvit_9_240 from the Hugging Face Hub.*"
              r"pretrained_cfg_overlay=dict\(file=PATH\) with pretrained=True \(another num_classes or "
              r"in_chans is adapted as from the Hub\)")
FAST_S = 5.0   # huggingface_hub's own retries took about 23 s


def test_pretrained_without_network_or_cache_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()   # the lookup alone: building the model takes seconds under load
    with pytest.raises(CheckpointError, match=NO_WEIGHTS + "$") as err:
        crossvit_fast.checkpoint.pretrained_path(NAME, cache_dir=str(tmp_path))
    assert time.perf_counter() - start < FAST_S and "HF_HUB_OFFLINE" in str(err.value)
    # an OSError too, as huggingface_hub's error that timm lets through (was: not one)
    with pytest.raises(OSError, match=NO_WEIGHTS + "$"):
        create_model(NAME, pretrained=True, cache_dir=str(tmp_path))


@pytest.fixture
def silent_server():
    """The address of a socket that takes connections and never answers (a network that drops
    packets, or a stuck proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()
    server.close()


@pytest.mark.parametrize("network", ["unresolvable", "silent"])
def test_pretrained_offline_fails_fast_and_quietly(tmp_path, monkeypatch, capfd, caplog, network, request):
    """No network to the Hub: the same one-line CheckpointError in well under 5 s, with nothing
    printed (was: about 23 s of huggingface_hub's retries, six resolver errors on stderr). Host
    names resolve to nothing (no DNS), or to a server that never answers (the probe's timeout)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if network == "unresolvable":
        def getaddrinfo(host, *args, **kwargs):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    else:
        address = request.getfixturevalue("silent_server")
        def getaddrinfo(host, port, *args, **kwargs):
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    capfd.readouterr()
    # the lookup alone is timed (the silent server's probe waits its 3 s timeout): building the
    # model takes seconds on a loaded machine
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=NO_WEIGHTS + "$") as err:
        crossvit_fast.checkpoint.pretrained_path(NAME, cache_dir=str(tmp_path))
    seconds = time.perf_counter() - start
    assert seconds < FAST_S, f"took {seconds:.1f} s"
    assert "\n" not in str(err.value)
    if network == "unresolvable":   # create_model raises the same, untimed
        with pytest.raises(CheckpointError, match=NO_WEIGHTS + "$"):
            create_model(NAME, pretrained=True, cache_dir=str(tmp_path))
    assert capfd.readouterr().err == ""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_load_checkpoint_is_exported(source, tmp_path):
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = create_model(NAME)
    result = crossvit_fast.load_checkpoint(model, tmp_path / "w.pt")
    assert same_weights(model, source)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_a_non_strict_load_returns_what_it_skipped_as_timms_does(source, tmp_path):
    """With strict=False a checkpoint whose keys do not match loads nothing: the missing and
    unexpected keys come back, as from timm's load_checkpoint, for the caller to see."""
    torch.save({"state_dict": {"model." + k: v for k, v in source.state_dict().items()}},
               tmp_path / "lightning.ckpt")
    model = create_model(NAME)
    result = crossvit_fast.load_checkpoint(model, tmp_path / "lightning.ckpt", strict=False)
    assert set(result.missing_keys) == set(model.state_dict())
    assert len(result.unexpected_keys) == len(source.state_dict())


def test_a_checkpoint_path_with_a_tilde_is_the_home_folder(source, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(source.state_dict(), tmp_path / "w.pt")
    assert same_weights(create_model(NAME, checkpoint_path="~/w.pt"), source)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_pretrained_with_other_in_chans_adapts_the_first_convs(source, tmp_path, in_chans):
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_model(NAME, pretrained=True, in_chans=in_chans, pretrained_cfg_overlay=dict(file=str(path)))
    for branch in (0, 1):
        rgb = source.patch_embed[branch].proj.weight
        got = model.patch_embed[branch].proj.weight
        # one channel: the sum over RGB (a grey image gets the RGB model's response to grey);
        # more: RGB repeated cyclically, scaled by 3 / in_chans
        want = rgb.sum(dim=1, keepdim=True) if in_chans == 1 else torch.cat([rgb, rgb[:, :1]], 1) * 0.75
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert torch.equal(model.blocks[0].projs[0][2].weight, source.blocks[0].projs[0][2].weight)


@pytest.mark.parametrize("kwargs", [dict(img_size=480), dict(qkv_bias=False, crop_scale=True),
                                    dict(dynamic_img_size=True)])
def test_timms_factory_records_input_config_and_model_args(kwargs, tmp_path):
    """What timm's builder records on a model (``_traits``, ``_model_args``) is there, so timm's
    input config sees the model's size, and ``timm.models.save_for_hf`` followed by timm's
    ``create_model("local-dir:...")`` rebuilds the same model (timm has no dynamic_img_size)."""
    timm = import_timm()
    model = create_model("crossvit_tiny_240", **kwargs).eval()
    config = timm.models.get_model_input_config(model)
    size = kwargs.get("img_size", 240)
    assert config["input_size"] == (3, size, size)
    assert config["fixed_input_size"] == (not kwargs.get("dynamic_img_size", False))
    assert model._model_args == kwargs
    if kwargs.get("dynamic_img_size"):
        return
    timm.models.save_for_hf(model, tmp_path)
    rebuilt = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-4, atol=1e-5)
