"""Any input resolution: models built at other sizes, checkpoints resampled to them,
``dynamic_img_size``, and timm's resizing of other inputs (with one warning per model)."""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossvit_fast
from crossvit_fast import create_model
from crossvit_fast.layers import patches_along
from crossvit_fast.resolution import branch_sizes, timm_runs_at

from .numerics import FP32_PAIR_TOL, rel_err
from .test_model import VARIANTS, small_model
from .timm_import import import_timm

NAME = "crossvit_tiny_240"


@pytest.fixture(scope="module")
def checkpoint_240(tmp_path_factory):
    """A crossvit_tiny_240 state dict saved to a file, and the model it came from."""
    torch.manual_seed(0)
    model = create_model(NAME).eval()
    path = tmp_path_factory.mktemp("ckpt") / "crossvit_tiny_240.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


@pytest.mark.parametrize("name", VARIANTS)
def test_pretrained_sizes_are_timms(name):
    """Where timm's int(size * scale) tiles (every pretrained configuration) the sizes are timm's."""
    with torch.device("meta"):
        model = create_model(name)
    timm_sizes = [tuple(int(s * scale) for s in model.img_size) for scale in model.img_scale]
    assert model.img_size_scaled == timm_sizes
    assert [p.grid_size for p in model.patch_embed] == [(h // p, w // p) for (h, w), p in
                                                        zip(timm_sizes, model.patch_size)]


@pytest.mark.parametrize("img_size, sizes", [
    (224, [(228, 228), (208, 208)]), (288, [(288, 288), (272, 272)]),
    (384, [(384, 384), (352, 352)]), (448, [(444, 444), (416, 416)]),
    ((240, 320), [(240, 324), (224, 304)]),
])
def test_any_img_size_builds_and_runs(img_size, sizes):
    """Each branch's size is img_size scaled by its img_scale, rounded to whole patches. (Shapes
    on the meta device; real runs at 224, 240x320 and 384 in the checkpoint tests below.)"""
    with torch.device("meta"):
        model = create_model("crossvit_tiny_240", img_size=img_size).eval()
        x = torch.randn(1, 3, *model.img_size)
    assert model.img_size_scaled == sizes
    assert [p.num_patches + 1 for p in model.patch_embed] == [model.pos_embed_0.shape[1], model.pos_embed_1.shape[1]]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")          # the model's own size: no resizing warning
        assert model(x).shape == (1, 1000)
        feats = model.forward_intermediates(x, intermediates_only=True)
    grids = [(h // p, w // p) for (h, w), p in zip(sizes, model.patch_size)]
    assert [tuple(f.shape[-2:]) for f in feats] == [grids[0]] * 3 + [grids[1]] * 3


@pytest.mark.parametrize("img_size, nearest", [(5, (9, 9)), ((300, 4), (300, 9))])
def test_too_small_sizes_name_the_nearest_valid_size(img_size, nearest):
    with pytest.raises(ValueError, match="too small.*nearest valid size is " + re.escape(str(nearest))):
        create_model(NAME, img_size=img_size)
    model = create_model("crossvit_tiny_240")
    assert branch_sizes(nearest, model.img_scale, model.patch_size)


@pytest.mark.parametrize("bad", [0, -240, (240,), (240.5, -1), "240", float("inf"), True])
def test_bad_img_size_is_named(bad):
    with pytest.raises(ValueError, match="img_size must be"):
        create_model(NAME, img_size=bad)


def test_a_stem_timm_has_no_design_for_is_named():
    with pytest.raises(ValueError, match="multi_conv supports patch_size 12 or 16, got 8"):
        crossvit_fast.CrossViT(patch_size=(8, 16), multi_conv=True)


def test_whole_float_and_numpy_sizes_are_taken_as_timm_takes_them():
    np = pytest.importorskip("numpy")
    with torch.device("meta"):
        model = crossvit_fast.CrossViT(img_size=(240.0, 240), img_scale=np.array([1.0, 224 / 240]),
                                       patch_size=(12, 16), embed_dim=(96, 192), depth=((1, 1, 0),),
                                       num_heads=(3, 3), mlp_ratio=(4, 4, 1))
    assert model.img_size == (240, 240) and model.img_size_scaled == [(240, 240), (224, 224)]


@pytest.mark.parametrize("img_size, sizes", [(240.5, [(240, 240), (224, 224)]),
                                             ((250.7, 240.2), [(250, 240), (233, 224)])])
def test_non_whole_sizes_are_taken_as_timm_takes_them(img_size, sizes):
    """timm scales a non-whole img_size and truncates (``int(size * scale)``): the same branch
    sizes and logits; the model's img_size is the whole part (the input it takes unresized)."""
    timm = import_timm()
    # (timm's factory takes a non-whole size as a pair only; its CrossVit as a number too)
    reference = timm.create_model(NAME, img_size=crossvit_fast.layers._pair(img_size)).eval()
    model = create_model(NAME, img_size=img_size).eval()
    assert reference.img_size_scaled == sizes and model.img_size_scaled == sizes
    assert model.img_size == sizes[0]
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, *model.img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")          # the model's own size: no resizing warning
        assert rel_err(model(x), reference(x)) < FP32_PAIR_TOL


@pytest.mark.parametrize("name, img_size, sizes", [
    (NAME, 156, [(156, 156), (145, 145)]),                  # 145 = 9 patches of 16 and a pixel
    (NAME, 72, [(72, 72), (67, 67)]),
    (NAME, (250, 240), [(250, 240), (233, 224)]),
    ("crossvit_9_dagger_240", 240, [(240, 240), (224, 224)]),
    ("crossvit_9_dagger_240", (155, 52), [(155, 52), (144, 48)]),   # the stem: 13 x 4 patches
])
def test_sizes_where_timm_runs_are_timms_with_its_logits(name, img_size, sizes):
    """Where timm's CrossVit runs at ``int(size * scale)`` (its position embeddings count the
    tokens its patch embedding makes), those are the branch sizes, remainders the conv drops
    included: timm's state dict loads strictly and gives timm's logits."""
    timm = import_timm()
    reference = timm.create_model(name, img_size=img_size).eval()
    model = create_model(name, img_size=img_size).eval()
    assert reference.img_size_scaled == sizes and model.img_size_scaled == sizes
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, *model.img_size)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) < FP32_PAIR_TOL
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-2] * f.shape[-1] + 1 for f in feats[::3]] == [model.pos_embed_0.shape[1],
                                                                   model.pos_embed_1.shape[1]]


@pytest.mark.parametrize("multi_conv", [False, True], ids=["conv", "dagger_stem"])
def test_patch_counts_and_where_timm_runs_follow_timms_modules(multi_conv):
    """``patches_along`` is what timm's patch embeddings make along each side (sides 1 to 200),
    and ``timm_runs_at`` is True exactly where timm's CrossVit runs (tiny models, random sizes
    and scales, both branches: at a False the forward raises, or the size is degenerate)."""
    timm = import_timm()
    for patch in (12, 16):
        embed = timm.models.crossvit.PatchEmbed(img_size=8, patch_size=patch, in_chans=1,
                                                embed_dim=4, multi_conv=multi_conv)

        def rows_made(side):   # 0 where the image is smaller than a conv's kernel (it raises)
            try:
                with torch.no_grad():
                    return embed.proj(torch.zeros(1, 1, side, 16)).shape[-2]
            except RuntimeError:
                return 0
        made = [rows_made(side) for side in range(1, 201)]
        assert made == [patches_along(side, patch, multi_conv) for side in range(1, 201)]
    gen = torch.Generator().manual_seed(0)
    cases = [((96, 48), (1.0, 0.5)), ((155, 52), (1.0, 224 / 240))]   # where the dagger stem runs
    for _ in range(24):
        h, w = (int(v) for v in torch.randint(12, 120, (2,), generator=gen))
        cases.append(((h, w), (1.0, float(torch.empty(1).uniform_(0.5, 1.0, generator=gen)))))
    outcomes = set()
    for (h, w), scale in cases:
        kw = dict(img_size=(h, w), img_scale=scale, patch_size=(12, 16), embed_dim=(8, 16),
                  depth=((1, 1, 0),), num_heads=(1, 1), mlp_ratio=(1, 1, 1), multi_conv=multi_conv)
        reference = timm.models.crossvit.CrossVit(**kw).eval()
        expected = all(timm_runs_at(size, p, multi_conv)
                       for size, p in zip(reference.img_size_scaled, (12, 16)))
        try:
            with torch.no_grad():
                reference(torch.randn(1, 3, h, w))
            runs = True
        except RuntimeError:
            runs = False
        degenerate = any(a // p * b // p == 0 for (a, b), p in zip(reference.img_size_scaled, (12, 16)))
        assert runs == expected or (runs and degenerate), (kw, reference.img_size_scaled)
        outcomes.add(expected)
    assert outcomes == {True, False}   # the sample holds sizes where timm runs and where it fails


@pytest.mark.parametrize("name, img_size, timm_sizes, sizes", [
    (NAME, 224, [(224, 224), (209, 209)], [(228, 228), (208, 208)]),
    ("crossvit_9_dagger_240", 156, [(156, 156), (145, 145)], [(156, 156), (144, 144)]),
])
def test_sizes_where_timm_fails_are_rounded_to_whole_patches(name, img_size, timm_sizes, sizes):
    """At 224 timm's branch-0 position embeddings count 336 patches for the conv's 18 x 18;
    with the dagger stem (padded convs that round up) 145 px makes 10 x 10 patches, not 9 x 9."""
    timm = import_timm()
    reference = timm.create_model(name, img_size=img_size).eval()
    assert reference.img_size_scaled == timm_sizes
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():
        reference(torch.randn(1, 3, img_size, img_size))
    model = create_model(name, img_size=img_size).eval()
    assert model.img_size_scaled == sizes
    with torch.no_grad():
        assert model(torch.randn(1, 3, img_size, img_size)).shape == (1, 1000)


@pytest.mark.parametrize("img_size", [224, (240, 320)])
def test_checkpoint_from_240_loads_as_timms_resampling_by_hand(checkpoint_240, img_size):
    """Both branches' position embeddings resampled as timm's resample_abs_pos_embed does for
    ViTs (bicubic on the patch grid, antialiased, the CLS row kept): the same logits."""
    timm = import_timm()
    source, path = checkpoint_240
    model = create_model(NAME, img_size=img_size, checkpoint_path=path).eval()
    by_hand = create_model(NAME, img_size=img_size).eval()
    state = dict(source.state_dict())
    for i, embed in enumerate(by_hand.patch_embed):
        state[f"pos_embed_{i}"] = timm.layers.resample_abs_pos_embed(state[f"pos_embed_{i}"], list(embed.grid_size))
    by_hand.load_state_dict(state, strict=True)
    for key, value in by_hand.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 3, *model.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), by_hand(x))


def test_pretrained_file_at_another_size_is_resampled_and_logged(checkpoint_240, caplog):
    _, path = checkpoint_240
    with caplog.at_level("INFO", logger="crossvit_fast.resolution"):
        model = create_model(NAME, img_size=384, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert model.pos_embed_0.shape[1] == 1 + 32 * 32 and model.pos_embed_1.shape[1] == 1 + 22 * 22
    assert [r.getMessage() for r in caplog.records] == [
        "Resized position embedding pos_embed_0: (20, 20) to (32, 32).",
        "Resized position embedding pos_embed_1: (14, 14) to (22, 22)."]


def test_a_checkpoint_at_the_models_size_loads_without_a_resampling_logged(checkpoint_240, caplog):
    _, path = checkpoint_240
    with caplog.at_level("INFO", logger="crossvit_fast.resolution"):
        create_model(NAME, checkpoint_path=path)
    assert caplog.records == []


def smooth_image(seed, size=240):
    gen = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(1, 3, 6, 6, generator=gen), size=(size, size), mode="bicubic",
                         align_corners=False)


def test_240_model_at_384_stays_close_on_an_upsampled_image(checkpoint_240):
    """A sanity bound, with random weights (no trained ones here): on a smooth image upsampled
    from 240 to 384, the 384 model (240 weights, resampled position embeddings) gives logits
    within 15% of the 240 model's (measured: 2-4%), and three times closer to them than
    the 240 model's logits of another image are (measured: 70-90% apart)."""
    source, path = checkpoint_240
    model = create_model(NAME, img_size=384, checkpoint_path=path).eval()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        for seed in range(2):
            x = smooth_image(seed)
            at_240 = source(x)
            at_384 = model(F.interpolate(x, size=(384, 384), mode="bicubic", align_corners=False))
            other = source(smooth_image(seed + 10))
            assert rel(at_384, at_240) < 0.15
            assert rel(at_384, at_240) < rel(other, at_240) / 3
            assert at_384.argmax() == at_240.argmax()


def test_dynamic_img_size_runs_each_input_at_its_own_size(checkpoint_240):
    """A dynamic model with the 240 weights gives, for an input of another size, the logits of a
    model built at that size from the same checkpoint (the same resampling, per call)."""
    source, path = checkpoint_240
    model = create_model(NAME, dynamic_img_size=True, checkpoint_path=path).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.randn(1, 3, 240, 240)
        assert torch.equal(model(x), source(x))
        x = torch.randn(1, 3, 240, 320)
        fixed = create_model(NAME, img_size=(240, 320), checkpoint_path=path).eval()
        assert rel_err(model(x), fixed(x)) < FP32_PAIR_TOL
        feats = model.forward_intermediates(x, intermediates_only=True)
        assert [f.shape[-2:] for f in feats] == [f.shape[-2:] for f in fixed.forward_intermediates(x, intermediates_only=True)]
    with pytest.raises(ValueError, match="input image size .* too small"):
        model(torch.randn(1, 3, 240, 6))


def test_dynamic_img_size_compiles_and_matches_eager():
    torch.manual_seed(0)
    model = small_model(dynamic_img_size=True).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for hw in ((48, 48), (72, 60)):
            x = torch.randn(2, 3, *hw)
            assert rel_err(compiled(x), model(x)) < 1e-5


def test_other_inputs_of_a_fixed_size_model_are_resized_with_one_warning():
    model = small_model().eval()
    x = torch.randn(1, 3, 64, 40)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="resized to the model's img_size 48x48"):
            resized = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(model(x), resized)        # once per model (timm's resizing itself:
                                                         # tests/test_timm_parity.py)
    with pytest.warns(UserWarning, match="resized"):
        small_model()(x)                                 # another model warns again


def test_the_resize_warning_is_no_guard_of_a_compiled_model():
    """An eager call that warns (and sets the once-per-model flag) between compiled calls of
    another size than the model's makes no second graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = small_model().eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(1, 3, 64, 40)
    with torch.no_grad():
        compiled(x)
        with pytest.warns(UserWarning, match="resized"):
            model(x)
        compiled(x)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_dynamic_img_size_is_a_factory_argument():
    """As for timm's ViTs, create_model takes dynamic_img_size=True for every variant."""
    with torch.device("meta"):
        model = crossvit_fast.create_model("crossvit_tiny_240", dynamic_img_size=True)
    assert model.dynamic_img_size and all(not p.strict_img_size for p in model.patch_embed)
