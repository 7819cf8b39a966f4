"""envs.cost: MACs / FLOPs by hand on a small network, per-module MACs, params, latency, ResNet-18's figure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from envs.cost import (
    compare_latency,
    count_flops,
    count_macs,
    count_macs_per_module,
    count_params,
    measure_latency,
)
from envs.models import build_model

# Conv(1->4, 3x3, pad 1) on 8x8: 4*8*8 outputs x (1*3*3) MACs; Conv(4->8, 3x3, stride 2, pad 1): 8*4*4 outputs x
# (4*3*3); Linear(128->10): 128*10. Biases, ReLU and flatten are not counted.
MACS_CONV1 = 4 * 8 * 8 * (1 * 3 * 3)  # 2304
MACS_CONV2 = 8 * 4 * 4 * (4 * 3 * 3)  # 4608
MACS_FC = 8 * 4 * 4 * 10  # 1280
PARAMS = (4 * 1 * 9 + 4) + (8 * 4 * 9 + 8) + (128 * 10 + 10)  # 1626


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def test_macs_by_hand():
    assert count_macs(small_net(), torch.zeros(1, 1, 8, 8)) == MACS_CONV1 + MACS_CONV2 + MACS_FC == 8192


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_macs_per_example(batch):
    assert count_macs(small_net(), torch.zeros(batch, 1, 8, 8)) == 8192


def test_flops_twice_macs():
    net = small_net()
    x = torch.zeros(2, 1, 8, 8)
    assert count_flops(net, x) == 2 * count_macs(net, x) == 16384


def test_macs_per_module():
    net = small_net()
    per = count_macs_per_module(net, torch.zeros(2, 1, 8, 8))
    assert per == {"0": MACS_CONV1, "2": MACS_CONV2, "4": MACS_FC}
    names = dict(net.named_modules())
    assert all(k in names for k in per)


def test_macs_per_module_nested_names():
    model = build_model("resnet20", num_classes=10, in_channels=1, width=0.25)
    x = torch.zeros(1, 1, 28, 28)
    per = count_macs_per_module(model, x)
    names = dict(model.named_modules())
    assert set(per) <= set(names)
    assert {"conv1", "layer1.0.conv1", "layer3.2.conv2", "layer2.0.downsample.0", "fc"} <= set(per)
    assert all(isinstance(names[k], (nn.Conv2d, nn.Linear)) for k in per)
    assert sum(per.values()) == count_macs(model, x)
    # Stem conv by hand: 4 output channels (16 * 0.25) at 28x28, 1*3*3 MACs each.
    assert per["conv1"] == 4 * 28 * 28 * 9


def test_functional_ops_are_kept():
    class WithMatmul(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5, bias=False)
            self.w = nn.Parameter(torch.randn(5, 3))

        def forward(self, x):
            return self.fc(x) @ self.w

    per = count_macs_per_module(WithMatmul(), torch.zeros(4, 6))
    assert per == {"fc": 30, "<functional>": 15}
    assert count_macs(WithMatmul(), torch.zeros(4, 6)) == 45


def test_count_macs_keeps_training_mode():
    net = small_net().train()
    count_macs(net, torch.zeros(1, 1, 8, 8))
    assert net.training
    net.eval()
    count_macs(net, torch.zeros(1, 1, 8, 8))
    assert not net.training


def test_count_params_by_hand():
    assert count_params(small_net()) == PARAMS
    bn = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4))
    assert count_params(bn) == 36 + 8  # running statistics are buffers, not parameters


def test_resnet18_fashion_mnist_macs():
    model = build_model("resnet18", num_classes=10, in_channels=1)
    x = torch.zeros(1, 1, 28, 28)
    macs = count_macs(model, x)
    assert macs == 455_800_832
    assert count_flops(model, x) == 911_601_664  # 0.91 GFLOPs
    assert round(2 * macs / 1e9, 2) == 0.91


def test_measure_latency():
    net = small_net()
    threads = torch.get_num_threads()
    t = measure_latency(net, (1, 8, 8), batch_size=2, threads=2, repeats=3, warmup=1)
    assert isinstance(t, float) and t > 0
    assert torch.get_num_threads() == threads  # restored


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": -2}, {"repeats": 0}])
def test_measure_latency_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        measure_latency(small_net(), (1, 8, 8), **kwargs)


# ---------------------------------------------------------------------------------------------- latency (Timer)
def conv_net(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )


def test_measure_latency_on_cpu_is_a_positive_float_and_leaves_the_model_alone():
    net = conv_net(4).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    t = measure_latency(net, (1, 12, 12), batch_size=4, threads=1, repeats=3, warmup=1, device="cpu")
    assert isinstance(t, float) and 0 < t < 1.0
    assert net.training  # training mode restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN statistics untouched
    assert next(net.parameters()).device.type == "cpu"


def test_compare_latency_ranks_a_4x_wider_net_slower():
    narrow, wide = conv_net(8), conv_net(32)  # 4x the channels: ~16x the MACs of the inner convolutions
    t_wide, t_narrow = compare_latency(wide, narrow, (1, 28, 28), batch_size=8, threads=1, rounds=3, repeats=3)
    assert isinstance(t_wide, float) and isinstance(t_narrow, float)
    assert t_wide > t_narrow > 0


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"repeats": 0}, {"batch_size": 0}, {"threads": 0}])
def test_compare_latency_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        compare_latency(small_net(), small_net(), (1, 8, 8), **kwargs)


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", 3])
def test_latency_rejects_unknown_devices(device):
    with pytest.raises(ValueError, match="device"):
        measure_latency(small_net(), (1, 8, 8), repeats=1, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error():
    from envs.latency import LatencyTable

    with pytest.raises(ValueError, match="no CUDA GPU"):
        measure_latency(small_net(), (1, 8, 8), repeats=1, device="cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        compare_latency(small_net(), small_net(), (1, 8, 8), device="cuda:0")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        LatencyTable(None, device="cuda")  # the device is checked before the graph is read


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_latency_on_cuda_leaves_the_model_on_the_cpu():
    net = conv_net(8)
    t = measure_latency(net, (1, 28, 28), batch_size=8, repeats=3, device="cuda")
    t_wide, t_narrow = compare_latency(conv_net(64), net, (1, 28, 28), batch_size=64, repeats=3, device="cuda")
    assert t > 0 and t_wide > 0 and t_narrow > 0
    assert next(net.parameters()).device.type == "cpu"
