"""The fused ReLU tail of the shortcut family (NegNet, actresnet) against the reference merge().

The fused path must be invisible: the same forward (bitwise) and the same gradients as
``unfused()`` under every way the repository runs these models: plain and channels-last, fp64,
autocast, double backward (curvature's Hessian-vector products), torch.func, forward-mode AD,
torch.compile, hooks on the block's activation.

"The same gradients": bitwise, unless the forward hit the one documented rounding case of
``ReluTail`` (a positive ReLU output rounded away in the sum, ``_lost_elements``). One such element
moves a small net's gradients by up to ~0.7% (relative L2; merge() itself moves them by 1-2.5%
between the NCHW and the channels-last layout), so then the check is 1% relative L2 per tensor; a
real error (a sign, a lost shortcut gradient) is of order 1.
"""
from contextlib import nullcontext
from typing import List, Optional, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F

import dcanets  # noqa: F401  (registers the models)
from dcanets.hessian import hvp
from dcanets.layers import shortcut
from dcanets.layers.shortcut import ReluTail, unfused
from dcanets_plugins.cifar_shortcut import CifarBlock

Grads = List[Optional[torch.Tensor]]


def _tails(out: torch.Tensor) -> int:
    """How many fused tails the graph of ``out`` holds."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += "ReluTail" in type(node).__name__
        stack.extend(n for n, _ in node.next_functions)
    return count


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool) -> Tuple[torch.Tensor, Grads, int]:
    """Output, input and parameter gradients of one cross-entropy backward, and the fused tails used."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with nullcontext() if fused else unfused():
        out = model(x)
        F.cross_entropy(out, y).backward()
    return out.detach(), [x.grad] + [p.grad for p in model.parameters()], _tails(out)


def _lost_elements(model: torch.nn.Module, x: torch.Tensor) -> int:
    """How many 0 < relu(F(x)) the sum act(F(x)) + alpha*s rounds away in ``model(x)``: the
    elements where the fused backward takes the ReLU's derivative as 0 and merge()'s as 1."""
    lost, reference = [0], shortcut.merge

    def counting(branch, thunk, act, alpha, placement, grad_only):
        if placement == "before_add" and not grad_only and alpha != 0:
            r, s = torch.relu(branch), thunk()
            lost[0] += int(((r > 0) & (torch.add(torch.add(r, s, alpha=alpha), s, alpha=-alpha) <= 0)).sum())
        return reference(branch, thunk, act, alpha, placement, grad_only)

    with pytest.MonkeyPatch.context() as patch, torch.no_grad(), unfused():
        patch.setattr(shortcut, "merge", counting)
        model(x)
    return lost[0]


def _assert_grads_close(grads: Grads, ref: Grads, exact: bool = True) -> None:
    """Bitwise equal, or (``exact=False``) within 1% relative L2 per tensor."""
    for g, r in zip(grads, ref):
        assert (g is None) == (r is None)
        if g is None:
            continue
        if exact:
            torch.testing.assert_close(g, r, rtol=0, atol=0)
        else:
            assert g.shape == r.shape and (g - r).norm() <= 1e-2 * r.norm()


def _assert_same(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, expect_tails: int) -> None:
    out, grads, tails = _step(model, x, y, fused=True)
    ref, ref_grads, ref_tails = _step(model, x, y, fused=False)
    assert (tails, ref_tails) == (expect_tails, 0)
    assert torch.equal(out, ref)
    _assert_grads_close(grads, ref_grads, exact=_lost_elements(model, x) == 0)


def _blocks(model: torch.nn.Module) -> int:
    return sum(hasattr(m, "shortcut_alpha") for m in model.modules())


@pytest.mark.parametrize("name", ["cifar_negnet20", "cifar_negnet56", "negnet18", "cifar_actresnet20"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fused_equals_reference(name, layout):
    model = timm.create_model(name, num_classes=10).to(memory_format=layout)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=layout)
    _assert_same(model, x, torch.randint(0, 10, (4,)), expect_tails=_blocks(model))


@pytest.mark.parametrize("name", ["cifar_negnet56", "negnet18"])
def test_fused_equals_reference_in_fp64(name):
    model = timm.create_model(name, num_classes=10).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _assert_same(model, x, torch.tensor([1, 2]), expect_tails=_blocks(model))


def test_channels_last_gradients_stay_channels_last():
    """The pooled head sends an NCHW gradient back; below the last block every block's output
    gradient is channels-last again (merge() kept it NCHW: mixed-layout kernels, a speed matter)."""
    model = timm.create_model("cifar_negnet20", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    seen = []

    def keep_layout(module, inputs, out):
        out.register_hook(lambda g: seen.append(g.is_contiguous(memory_format=torch.channels_last)))

    for block in (model.layer3[0], model.layer3[1]):
        block.register_forward_hook(keep_layout)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert seen == [True, True]


def test_only_the_before_add_unit_alpha_blocks_are_fused():
    """ResNet, plain and gradient-only nets keep merge(); so does NegNet with |alpha| != 1."""
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    for name, kwargs in [("cifar_resnet20", {}), ("cifar_plainnet20", {}), ("cifar_gradnet20", {}),
                         ("cifar_negnet20", {"shortcut_alpha": -0.5})]:
        _assert_same(timm.create_model(name, num_classes=10, **kwargs), x, y, expect_tails=0)


def test_autocast_bf16_takes_the_reference_path():
    model = timm.create_model("cifar_negnet20", num_classes=10)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(model, x, y, expect_tails=0)


def test_hessian_vector_product_equals_reference():
    """Double backward (dcanets.hessian.hvp, create_graph=True) through the fused tail."""
    model = timm.create_model("cifar_negnet20", num_classes=10)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    params = list(model.parameters())
    vec = [torch.randn_like(p) for p in params]

    def loss() -> torch.Tensor:
        out = model(x)
        assert _tails(out) == (0 if ref else 9)
        return F.cross_entropy(out, y)

    ref = False
    fused = hvp(loss, params, vec)
    ref = True
    with unfused():
        expected = hvp(loss, params, vec)
    # the double backward adds the shortcut's terms in another order: fp32 rounding apart
    assert _lost_elements(model, x) == 0
    for a, b in zip(fused, expected):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_input_gradient_alone_and_a_block_without_input_gradient():
    """autograd.grad w.r.t. the input only; and a block fed a tensor that needs no gradient."""
    model = timm.create_model("cifar_negnet20", num_classes=10)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    fused = torch.autograd.grad(model(x).sum(), x)
    with unfused():
        ref = torch.autograd.grad(model(x).sum(), x)
    _assert_grads_close(list(fused), list(ref), exact=_lost_elements(model, x) == 0)

    block = CifarBlock(8, 8, 1, "pad", shortcut_alpha=-1.0, act_placement="before_add")
    h = torch.randn(2, 8, 6, 6)
    grads = []
    for ctx in (nullcontext(), unfused()):
        block.zero_grad(set_to_none=True)
        with ctx:
            block(h.clone()).square().sum().backward()
        grads.append([p.grad for p in block.parameters()])
    _assert_grads_close(*grads, exact=_lost_elements(block, h) == 0)


def test_torch_func_grad_and_forward_mode_ad_match_autograd():
    """Under torch.func transforms and forward-mode AD the blocks take merge(), which supports them."""
    model = timm.create_model("cifar_negnet20", num_classes=10).eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    params = dict(model.named_parameters())

    def loss(p: dict) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    by_func = torch.func.grad(loss)(params)
    model.zero_grad(set_to_none=True)
    loss(params).backward()
    for name, p in params.items():
        torch.testing.assert_close(by_func[name], p.grad)

    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(model, (x,), (v,))
    with unfused():
        _, ref = torch.func.jvp(model, (x,), (v,))
    torch.testing.assert_close(tangent, ref)


def test_a_hook_on_the_activation_still_fires():
    model = timm.create_model("cifar_negnet20", num_classes=10)
    calls = []
    model.layer1[0].act2.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    model(x)
    assert len(calls) == 1
    _assert_same(model, x, y, expect_tails=8)


@pytest.mark.slow
def test_compiled_block_equals_eager():
    """Under torch.compile the block takes merge() (dynamo traces it whole: fullgraph)."""
    block = CifarBlock(8, 8, 1, "pad", shortcut_alpha=-1.0, act_placement="before_add")
    h = torch.randn(2, 8, 8, 8)
    grads = []
    for run in (block, torch.compile(block, fullgraph=True)):
        block.zero_grad(set_to_none=True)
        x = h.clone().requires_grad_(True)
        out = run(x)
        out.square().sum().backward()
        grads.append([out.detach(), x.grad] + [p.grad for p in block.parameters()])
    torch.testing.assert_close(grads[1][0], grads[0][0])  # inductor rounds its fused kernels its own way
    _assert_grads_close(grads[1][1:], grads[0][1:], exact=False)


def test_relu_lost_in_the_sum_gets_the_rounded_forwards_derivative():
    """The one documented difference: 0 < relu(y) below half an ulp of s vanishes in the fp32 sum,
    and the fused backward sees it as a zero of the ReLU (merge() sees a positive input)."""
    y = torch.tensor([1e-9, 0.5, -0.5], requires_grad=True)
    s = torch.ones(3)
    out = ReluTail.apply(y.clone(), s, -1.0, False)
    assert torch.equal(out, torch.relu(y) - s)
    out.sum().backward()
    assert y.grad.tolist() == [0.0, 1.0, 0.0]
