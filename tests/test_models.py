"""envs.models: forward shapes, parameter counts of the zoo, torchvision models and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from envs.cost import count_params
from envs.models import ZOO, build_model, known_models

EXPECTED_PARAMS = {  # width 1, 3 input channels, 10 classes
    "resnet18": 11_173_962,
    "resnet20": 272_474,  # 269,722 of option A + 2,752 for the two 1x1 projection shortcuts (option B)
    "resnet56": 855_770,
    "vgg16_bn": 14_724_042,  # no conv bias, one linear classifier
    "mobilenetv2": 2_236_682,
}


def test_zoo_names():
    assert set(ZOO) == set(EXPECTED_PARAMS)
    names = known_models()
    assert list(ZOO) == names[: len(ZOO)]
    assert "tv:resnet18" in names


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_forward_shapes(name, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=shape[0], width=0.25).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZOO)
def test_train_mode_backward(name):
    model = build_model(name, num_classes=7, in_channels=1, width=0.25).train()
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_param_counts(name):
    model = build_model(name, num_classes=10, in_channels=3, width=1.0)
    assert count_params(model) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", ZOO)
def test_width_shrinks_model(name):
    small = count_params(build_model(name, 10, 3, width=0.25))
    half = count_params(build_model(name, 10, 3, width=0.5))
    assert small < half < EXPECTED_PARAMS[name]


def test_in_channels_only_changes_stem():
    # 1 vs 3 input channels: only the 3x3 stem conv differs (2 * 9 * 16 weights for resnet20).
    assert (
        count_params(build_model("resnet20", 10, 3)) - count_params(build_model("resnet20", 10, 1)) == 2 * 9 * 16
    )


def test_resnet20_projection_shortcuts():
    model = build_model("resnet20")
    shortcuts = [m for n, m in model.named_modules() if n.endswith("downsample")]
    assert len(shortcuts) == 2
    extra = sum(p.numel() for s in shortcuts for p in s.parameters())
    assert extra == 2752  # 16*32 + 2*32 + 32*64 + 2*64
    assert count_params(model) - extra == 269_722


def test_torchvision_resnet18_one_channel():
    model = build_model("tv:resnet18", num_classes=10, in_channels=1).eval()
    assert model.conv1.in_channels == 1
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert not any(isinstance(m, nn.Conv2d) and m.in_channels == 3 for m in model.modules())


@pytest.mark.parametrize("name", ["resnet19", "tv:not_a_model", "", "RESNET18"])
def test_unknown_model(name):
    with pytest.raises(ValueError) as exc:
        build_model(name)
    msg = str(exc.value)
    assert "unknown model" in msg
    for known in ZOO:
        assert known in msg
    assert "tv:" in msg


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"width": -1}, {"num_classes": 1}, {"in_channels": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        build_model("resnet20", **kwargs)
