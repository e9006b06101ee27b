"""``features_only=True`` as timm 1.0.31 builds CrossVit: the same wrapper, keys, outputs and
``feature_info`` as timm's (its ``FeatureGetterNet`` over ``forward_intermediates``)."""
import pytest
import torch

from crossvit_fast import create_model
from crossvit_fast.features import FeatureGetterNet

from .numerics import rel_err
from .timm_import import import_timm

NAME = "crossvit_tiny_240"


@pytest.fixture(scope="module")
def timm():
    return import_timm()


@pytest.mark.parametrize("kwargs", [{}, dict(out_indices=(0, 4)), dict(out_indices=(1, 2, 3))],
                         ids=["default", "two_blocks", "three"])
def test_features_only_equals_timms(timm, kwargs):
    torch.manual_seed(0)
    ref = timm.create_model(NAME, features_only=True, **kwargs).eval()
    ours = create_model(NAME, features_only=True, **kwargs).eval()
    assert isinstance(ours, FeatureGetterNet)
    ours.load_state_dict(ref.state_dict(), strict=True)      # same wrapper keys, same pruning
    assert len(ours.model.blocks) == len(ref.model.blocks)
    for what in ("channels", "reduction", "module_name"):
        assert getattr(ours.feature_info, what)() == getattr(ref.feature_info, what)(), what
    assert ours.feature_info.out_indices == ref.feature_info.out_indices
    for args in ({}, dict(keys=["num_chs", "module"]), dict(idx=1), dict(idx=[0, 5], keys=["index"])):
        assert ours.feature_info.get_dicts(**args) == ref.feature_info.get_dicts(**args), args
    for out_indices in (2, (1, 4)):
        other, ref_other = (f.feature_info.from_other(out_indices) for f in (ours, ref))
        assert (other.out_indices, other.info) == (ref_other.out_indices, ref_other.info)
    assert ours.pretrained_cfg == ref.pretrained_cfg and ours.in_chans == 3
    for attribute in ("out_indices", "out_map", "return_dict", "output_fmt", "norm"):
        assert getattr(ours, attribute) == getattr(ref, attribute), attribute
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        got, expected = ours(x), ref(x)
    assert len(got) == len(expected) == len(ours.feature_info.out_indices)
    for g, e, chs, red in zip(got, expected, ours.feature_info.channels(), ours.feature_info.reduction()):
        assert g.shape == e.shape and g.shape[1] == chs and g.shape[-1] == round(240 / red)
        assert rel_err(g, e) < 1e-5


def test_default_features_are_the_last_blocks_of_each_branch():
    torch.manual_seed(0)
    full = create_model(NAME).eval()
    net = create_model(NAME, features_only=True).eval()
    net.model.load_state_dict({k: v for k, v in full.state_dict().items()
                               if not k.startswith(("head.", "norm."))}, strict=True)
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=[2, 5], intermediates_only=True)
        got = net(x)
    assert [tuple(t.shape) for t in got] == [(1, 96, 20, 20), (1, 192, 14, 14)]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert net.feature_info.channels() == [96, 192] and net.feature_info.module_name() == ["blocks.2"] * 2


def test_timms_own_getter_class_and_unsupported_kinds(timm):
    from timm.models._features import FeatureGetterNet as TimmGetter
    net = create_model(NAME, features_only=True, feature_cls=TimmGetter, out_indices=(0,))
    assert len(net.model.blocks) == 1 and len(net(torch.randn(1, 3, 240, 240))) == 1
    with pytest.raises(ValueError, match="feature_cls 'hook' is not supported"):
        create_model(NAME, features_only=True, feature_cls="hook")
    # timm lower-cases the name
    assert isinstance(create_model(NAME, features_only=True, feature_cls="Getter"), FeatureGetterNet)


def test_the_getter_keeps_out_map_and_return_dict_as_timms_does(timm):
    """timm's FeatureGetterNet takes both, keeps them and returns its list all the same."""
    from timm.models._features import FeatureGetterNet as TimmGetter
    torch.manual_seed(0)
    ours = FeatureGetterNet(create_model(NAME).eval(), out_indices=2, out_map=(0, 1), return_dict=True)
    ref = TimmGetter(timm.create_model(NAME).eval(), out_indices=2, out_map=(0, 1), return_dict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert (ours.out_map, ours.return_dict) == (ref.out_map, ref.return_dict) == ((0, 1), True)
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        got, expected = ours(x), ref(x)
    assert isinstance(got, list) and len(got) == len(expected) == 2
    assert all(rel_err(g, e) < 1e-5 for g, e in zip(got, expected))


def test_pretrained_features_only_loads_the_weights(tmp_path):
    torch.manual_seed(0)
    source = create_model(NAME).eval()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    net = create_model(NAME, features_only=True, pretrained=True,
                       pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"))).eval()
    assert torch.equal(net.model.pos_embed_1, source.pos_embed_1)
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        expected = source.forward_intermediates(x, indices=[2, 5], intermediates_only=True)
        assert all(torch.equal(g, e) for g, e in zip(net(x), expected))
