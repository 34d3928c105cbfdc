"""Double ResNet models in timm, the batched heads, and the linear double network (paper 003)."""
from __future__ import annotations

import pytest
import timm
import torch

import dcanets
from dcanets.papers.p003_convex import ConvexResNets, convexity_gap
from dcanets.papers.p003_linear_double import LinearDouble, LinearProduct, fit_gd, random_diagonalizable


@pytest.mark.parametrize("name,shape", [("double_resnet_mnist", (1, 28, 28)),
                                        ("double_resnet_cifar", (3, 32, 32)),
                                        ("double_resnet_flat", (1, 8, 8))])
def test_registered_and_built_by_timm(name, shape):
    assert dcanets.list_models()[name] == "double_resnet"
    model = timm.create_model(name, hidden=4)
    assert model.pretrained_cfg["input_size"] == shape
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_mnist_model_is_the_papers_layout():
    model = timm.create_model("double_resnet_mnist")
    conv, pool = model.stem
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (1, 64, (6, 6))
    assert pool.kernel_size == 4 and pool.stride == 4          # non-overlapping 4x4 windows
    assert model.num_features == 64 * 5 * 5                      # (28 - 6 + 1) // 4 = 5
    assert (model.head.num_nets, model.head.layers) == (20, 3)   # 10 pairs of 3-layer nets
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)) for m in model.modules())


def test_num_classes_in_chans_and_pretrained_kwargs():
    model = timm.create_model("double_resnet_mnist", num_classes=3, in_chans=2, hidden=4)
    assert model(torch.randn(2, 2, 28, 28)).shape == (2, 3)
    flat = timm.create_model("double_resnet_flat", img_size=(1, 5), in_chans=1, num_classes=2, hidden=4)
    assert flat.num_features == 5 and flat(torch.randn(3, 5)).shape == (3, 2)
    model.reset_classifier(7)
    assert model(torch.randn(1, 2, 28, 28)).shape == (1, 7)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("double_resnet_mnist", pretrained=True)
    with pytest.raises(ValueError, match="too small"):
        timm.create_model("double_resnet_mnist", img_size=(6, 6))


def test_batched_heads_equal_the_python_loop():
    nets = ConvexResNets(12, num_nets=6, layers=3, hidden=5)
    x = torch.randn(7, 12)
    torch.testing.assert_close(nets(x), nets.forward_loop(x))
    xs = torch.randn(7, 6, 12)  # one input per net
    torch.testing.assert_close(nets(xs), nets.forward_loop(xs))


def test_output_is_r_minus_s():
    model = timm.create_model("double_resnet_flat", num_classes=2, hidden=3)
    x = torch.randn(4, 1, 8, 8)
    out = model.head(x.flatten(1))
    torch.testing.assert_close(model(x), out[:, :2] - out[:, 2:])


def test_convexity_gap_detects_a_concave_function():
    x, y = torch.randn(100, 3), torch.randn(100, 3)
    assert (convexity_gap(lambda z: -(z ** 2).sum(1), x, y) > 0).all()


def test_single_identity_product_cannot_reach_a_negative_eigenvalue():
    """Prop. 3: identity-started w_L..w_1 fitting lambda < 0 goes to 0; the double one fits it."""
    target = torch.tensor([[-0.8]], dtype=torch.float64)
    single = fit_gd(LinearProduct(1, 6), target, step=0.05, iters=400)
    double = fit_gd(LinearDouble(1, 6), target, step=0.05, iters=400)
    assert single["errors"][-1] > 0.99          # F -> 0: relative error (0 - l)^2 / l^2 = 1
    assert double["errors"][-1] < 1e-6


def test_double_beats_single_on_a_random_matrix():
    g = torch.Generator().manual_seed(1)
    target = random_diagonalizable(6, generator=g)
    single = fit_gd(LinearProduct(6, 5), target, step=2e-3, iters=300)
    double = fit_gd(LinearDouble(6, 5), target, step=2e-3, iters=300)
    assert not double["diverged"] and double["errors"][-1] < single["errors"][-1]
