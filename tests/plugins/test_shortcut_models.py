"""The shortcut family: semantics of the blocks, parameter counts, timm behaviour."""
import pytest
import timm
import torch

import dcanets  # noqa: F401  (registers the models)
from dcanets_plugins.cifar_shortcut import CifarBlock
from dcanets_plugins.shortcut import ShortcutBasicBlock


def _zero_branch(block):
    """Make F(x) = 0: the last BN outputs its bias, which we set to zero (eval mode)."""
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.zeros_(block.bn2.bias)
    return block.eval()


@pytest.mark.parametrize("alpha,placement,expected", [
    (-1.0, "before_add", lambda x: -x),            # NegNet: act(0) - x
    (1.0, "after_add", lambda x: torch.relu(x)),   # timm ResNet: act(0 + x)
    (1.0, "before_add", lambda x: x),              # authors' ResNet: act(0) + x
    (0.0, "after_add", lambda x: torch.zeros_like(x)),  # plain: act(0)
    (-1.0, "after_add", lambda x: torch.relu(-x)),
])
@pytest.mark.parametrize("make", [
    lambda **kw: ShortcutBasicBlock(8, 8, **kw),
    lambda **kw: CifarBlock(8, 8, 1, "pad", **kw),
])
def test_zero_branch_leaves_alpha_times_input(make, alpha, placement, expected):
    block = _zero_branch(make(shortcut_alpha=alpha, act_placement=placement))
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block(x.clone()), expected(x), rtol=0, atol=0)


def test_plain_block_is_act_of_branch():
    block = CifarBlock(8, 8, 1, "pad", shortcut_alpha=0.0).eval()
    x = torch.randn(2, 8, 6, 6)
    branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), torch.relu(branch))


def test_negated_projection_shortcut():
    """NegNet negates the projection shortcut too: out = act(F(x)) - P(x)."""
    torch.manual_seed(1)
    block = _zero_branch(CifarBlock(8, 16, 2, "conv", shortcut_alpha=-1.0, act_placement="before_add"))
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(block(x), -block.downsample(x))
    pad = _zero_branch(CifarBlock(8, 16, 2, "pad", shortcut_alpha=-1.0, act_placement="before_add"))
    out = pad(x)
    assert out.shape == (2, 16, 3, 3)
    torch.testing.assert_close(out[:, 4:12], -x[:, :, ::2, ::2])
    assert out[:, :4].abs().max() == 0 and out[:, 12:].abs().max() == 0


def test_same_weights_give_different_functions():
    resnet, negnet = timm.create_model("resnet18"), timm.create_model("negnet18")
    negnet.load_state_dict(resnet.state_dict())  # interchangeable state dicts
    x = torch.randn(2, 3, 32, 32)
    resnet.eval(), negnet.eval()
    assert not torch.allclose(resnet(x), negnet(x), atol=1e-3)


@pytest.mark.parametrize("depth,millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_parameter_counts_match_he_et_al(depth, millions):
    counts = {f: sum(p.numel() for p in timm.create_model(f"cifar_{f}{depth}").parameters())
              for f in ("resnet", "negnet", "plainnet", "gradnet")}
    assert len(set(counts.values())) == 1, counts
    assert round(counts["resnet"] / 1e6, 2 if depth < 110 else 1) == millions


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_imagenet_names_have_resnet_parameter_counts(depth):
    ref = sum(p.numel() for p in timm.create_model(f"resnet{depth}").parameters())
    for family in ("negnet", "plainnet", "gradnet"):
        model = timm.create_model(f"{family}{depth}")
        assert sum(p.numel() for p in model.parameters()) == ref, family


def test_cifar18_is_the_pytorch_cifar_net():
    model = timm.create_model("cifar_negnet18")
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_gradnet_forward_is_plain_and_block_gradient_is_resnet():
    torch.manual_seed(0)
    plain, grad = timm.create_model("cifar_plainnet20"), timm.create_model("cifar_gradnet20")
    grad.load_state_dict(plain.state_dict())
    plain.eval(), grad.eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(grad(x), plain(x), rtol=0, atol=0)

    # block level: same weights, same input, same upstream gradient -> the ResNet block's gradients
    res_block = CifarBlock(16, 32, 2, "pad", shortcut_alpha=1.0, act_placement="before_add").eval()
    grad_block = CifarBlock(16, 32, 2, "pad", shortcut_alpha=1.0, act_placement="before_add",
                            shortcut_grad_only=True).eval()
    grad_block.load_state_dict(res_block.state_dict())
    h = torch.randn(3, 16, 8, 8)
    upstream = torch.randn(3, 32, 4, 4)
    grads = []
    for block in (res_block, grad_block):
        inp = h.clone().requires_grad_(True)
        block.zero_grad()
        (block(inp) * upstream).sum().backward()
        grads.append([inp.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)

    # network level: the gradient differs from the plain net's (the shortcut gradient is there)
    for model in (plain, grad):
        model.zero_grad()
        model(x).logsumexp(1).sum().backward()
    assert not torch.allclose(plain.conv1.weight.grad, grad.conv1.weight.grad)


def test_timm_arguments_work_as_for_any_model():
    model = timm.create_model("negnet18", num_classes=7, in_chans=1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    feats = timm.create_model("negnet18", features_only=True)(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [64, 64, 128, 256, 512]
    feats = timm.create_model("cifar_resnet56", features_only=True)(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert timm.create_model("cifar_negnet56").pretrained_cfg["input_size"] == (3, 32, 32)
    model = timm.create_model("cifar_negnet20", shortcut_alpha=-0.5)
    assert model.layer1[0].shortcut_alpha == -0.5
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_pretrained_fails_at_once():
    with pytest.raises(ValueError, match="no pretrained weights exist for 'negnet18'"):
        timm.create_model("negnet18", pretrained=True)


def test_bad_block_arguments():
    with pytest.raises(ValueError, match="act_placement must be one of"):
        timm.create_model("cifar_negnet20", act_placement="middle")
    with pytest.raises(ValueError, match="shortcut_type must be"):
        timm.create_model("cifar_negnet20", shortcut_type="dense")
