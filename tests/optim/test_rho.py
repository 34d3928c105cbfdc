"""ρ in paper 000's units (a Hessian eigenvalue, like λ = 1/lr) and ``rho="auto"``.

Every identity stated in docs/decompositions.md ("ρ in the paper's units") is checked here against
an independent computation: dense autograd Hessians, the paper's own MSE case, linear algebra.
"""
import copy

import pytest
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
from dca_nets import (
    Net,
    batch,
    closure_of,
    counter_loss_hessian,
    eq17_c,
    flat_cat,
    flat_grad,
    gauss_newton,
    sqnorm,
)

from dcanets.optim import DcaL2, measured_curvature, prepare, remember_batch


def _orthogonal_pair(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, c = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    c = c - (c @ a) / (a @ a) * a                          # a ⊥ c (eq. 18)
    return a, 0.6 * c


@pytest.mark.parametrize("kappa, rho", [(0.3, 0.0), (0.3, 2.0), (2.0, 2.0), (5.0, 40.0)])
def test_eq19_with_rho_in_hessian_units_is_the_newton_step_of_eq14(kappa, rho):
    """With ∂²_zL = κ·∂_zL ∂_zLᵀ (eqs. 15, 22) and a = ∇L, c = eq. 17's c in gradient units,
    eq. 14's Hessian is ∂²G2 = κ[aaᵀ + ½(2c − a)(2c − a)ᵀ] + ρ/2·I (eq. 16 ×2, footnote 3), and its
    Newton step −∂²G2⁻¹a is ∝ a + βc with β = ‖a‖²/(2‖c‖² + ρ/(2κ)), not ρ/4 (unless κ = 2)."""
    a, c = _orthogonal_pair(12)
    hess = kappa * (torch.outer(a, a) + 0.5 * torch.outer(2 * c - a, 2 * c - a)) + rho / 2 * torch.eye(12,
                                                                                                  dtype=a.dtype)
    step = -torch.linalg.pinv(hess) @ a          # ρ = 0: rank 2, a in its range (the minimum-norm step)
    beta = float(a @ a) / (2 * float(c @ c) + rho / (2 * kappa))
    coef_a, coef_c = float(step @ a) / float(a @ a), float(step @ c) / float(c @ c)
    assert torch.allclose(step, coef_a * a + coef_c * c, atol=1e-12)      # in the plane of a and c
    assert coef_c / coef_a == pytest.approx(beta, rel=1e-10)
    old = float(a @ a) / (2 * float(c @ c) + rho / 4)                        # the formula before
    assert (old == pytest.approx(beta, rel=1e-6)) is (rho == 0 or kappa == 2.0)


class ScalarNet(Net):
    """The test net with one output: the paper's MSE case L = r², r = hᵀw^L + b^L − target (eq. 15)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 1)


def _mse(out, target):
    return ((out - target) ** 2).sum()       # batch 1, one output: L = r² exactly as eq. 15 writes it


def _eq17_c_for(model, x, y, loss_fn):
    """c = (∂h^{L−1}/∂w)ᵀ ∂L/∂h^L, by hand (h^{L−1}, h^L: the last block's input and output)."""
    h1 = model.stage[0](torch.tanh(model.stem(x)))
    h2 = model.stage[1](h1)
    (g2,) = torch.autograd.grad(loss_fn(model.head(h2), y), [h2], retain_graph=True)
    return flat_grad((g2.detach() * h1).sum(), model)


def test_on_the_papers_mse_case_kappa_is_eq15_and_beta_is_eq19_verbatim():
    """MSE with one output and one sample: ∂²_hL = 2w^L w^Lᵀ = κ·∂_hL ∂_hLᵀ with κ = 1/(2L) (eq. 15).
    The measured κ (Gauss–Newton curvature along a over ‖a‖²) is that κ, and β is eq. 19 evaluated
    on the paper's own a = Aᵀw^L = ∇L/(2r) and c = Cᵀw^L (eq. 17): ‖a‖²/(2‖c‖² + ρ/4)."""
    torch.manual_seed(0)
    model = ScalarNet().double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([[0.7]], dtype=torch.float64)
    rho = 0.8
    ref = copy.deepcopy(model)
    out = ref(x).detach()
    r, loss = float(out - y), float(_mse(out, y))
    grad = flat_grad(_mse(ref(x), y), ref)
    a_paper = [g / (2 * r) for g in grad]                              # ∂_hL = 2r·w^L (eq. 15)
    c_paper = [g / (2 * r) for g in _eq17_c_for(ref, x, y, _mse)]
    beta = sqnorm(a_paper) / (2 * sqnorm(c_paper) + rho / 4)                 # eq. 19, word for word
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=0.1, momentum=0.0, rho=rho)
    assert prepare(opt, model) is False
    opt.zero_grad()
    _mse(model(x), y).backward()
    remember_batch(opt, x, y, _mse)
    opt.step()
    assert opt.diagnostics["kappa"] == pytest.approx(1 / (2 * loss), rel=1e-9)
    assert opt.diagnostics["beta"] == pytest.approx(beta, rel=1e-9)
    assert opt.rho_history == [{"step": 0, "kappa": opt.diagnostics["kappa"]}]


def test_measured_kappa_is_the_gauss_newton_curvature_along_a():
    """Cross-entropy, a batch of 16: κ = aᵀJᵀ∂²_zL J a/‖a‖⁴ (JVP and the dense Hessian in z by
    autograd), and the step is eq. 19 with it."""
    torch.manual_seed(0)
    model = Net().double()
    x, y = batch()
    x = x.double()
    rho, lr = 0.5, 0.1
    ref = copy.deepcopy(model)
    a, c = flat_grad(F.cross_entropy(ref(x), y), ref), eq17_c(ref, x, y)
    kappa = gauss_newton(ref, x, y, 1.0, flat_cat(a)) / sqnorm(a) ** 2
    beta = sqnorm(a) / (2 * sqnorm(c) + rho / (2 * kappa))
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=lr, momentum=0.0, rho=rho)
    prepare(opt, model)
    remember_batch(opt, x, y)
    opt.step(closure_of(model, opt, x, y))
    assert opt.diagnostics["kappa"] == pytest.approx(kappa, rel=1e-9)
    assert opt.diagnostics["beta"] == pytest.approx(beta, rel=1e-9)
    d = [(p0 - p).detach() / lr for p, p0 in zip(model.parameters(), ref.parameters())]
    assert torch.allclose(flat_cat(d), flat_cat(a) + beta * flat_cat(c), atol=1e-10)


def _lam_min(hess):
    return float(torch.linalg.eigvalsh(hess)[0])


def _auto_step(name, model, x, y, **kwargs):
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.1, momentum=0.0, rho="auto", **kwargs)
    prepare(opt, model)
    remember_batch(opt, x, y)
    opt.step(closure_of(model, opt, x, y))
    return opt


def _double_net():
    torch.manual_seed(0)
    model = Net().double()
    x, y = batch()
    return model, x.double(), y, sum(p.numel() for p in model.parameters())


def test_rho_auto_makes_the_proximal_g_exactly_convex():
    """dcaprox, G = L + ρ·L2: ρ = −λ_min(∇²L) (dense autograd Hessian; Lanczos over all 135 directions)."""
    model, x, y, dim = _double_net()
    lam = _lam_min(counter_loss_hessian(model, x, y, 1.0))
    assert lam < 0
    opt = _auto_step("dcaprox", model, x, y, rho_lanczos=dim)
    assert opt.rho == pytest.approx(-lam, rel=1e-8)
    assert opt.rho_history[0]["lam_min_G"] == pytest.approx(lam, rel=1e-8)


def test_rho_auto_makes_g2_and_h2_of_eq12_exactly_convex():
    """dcacounter: G2 = L + ½L'_{−1} + ρ/2·L2 and H2 = ½L'_{−1} + ρ/2·L2 both convex at w_k, and
    not both for a smaller ρ: ρ = max(−2λ_min(∇²(L + ½L'_{−1})), −λ_min(∇²L'_{−1}))."""
    model, x, y, dim = _double_net()
    h_loss, h_neg = (counter_loss_hessian(model, x, y, alpha) for alpha in (1.0, -1.0))
    eye = torch.eye(dim, dtype=torch.float64)
    want = max(-2 * _lam_min(h_loss + 0.5 * h_neg), -_lam_min(h_neg), 0.0)
    opt = _auto_step("dcacounter", model, x, y, rho_lanczos=dim, kappa=1.0)
    rho = opt.rho
    assert rho == pytest.approx(want, rel=1e-8) and rho > 0
    g2, h2 = h_loss + 0.5 * h_neg + rho / 2 * eye, 0.5 * h_neg + rho / 2 * eye
    assert min(_lam_min(g2), _lam_min(h2)) == pytest.approx(0.0, abs=1e-8)      # on the boundary
    assert _lam_min(g2) >= -1e-8 and _lam_min(h2) >= -1e-8
    assert set(opt.rho_history[0]) == {"step", "rho", "lam_min_G", "lam_min_H"}


@pytest.mark.parametrize("name, alpha", [("dcaquasihalf", 0.5), ("dcaquasineghalf", -0.5)])
def test_rho_auto_makes_the_quasi_dc_g_convex(name, alpha):
    """G = L'_α + ρ/2·L2 (eqs. 23, 26; H is not convex by design): ρ = −2λ_min(∇²L'_α)."""
    model, x, y, dim = _double_net()
    want = max(0.0, -2 * _lam_min(counter_loss_hessian(model, x, y, alpha)))
    opt = _auto_step(name, model, x, y, rho_lanczos=dim, direction="projection", kappa=1.0)
    assert opt.rho == pytest.approx(want, rel=1e-8)


def _bn_net():
    model = Net().double()
    model.stage = nn.Sequential(*(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh())
                                  for _ in range(2))).double()
    return model


def test_rho_auto_schedule_safety_and_a_trace_free_measurement():
    """Measured at steps 0, rho_every, 2·rho_every, ...; ρ = rho_safety × the bound; the step is
    the fixed-ρ step with that value: weights, p.grad and BatchNorm statistics alike."""
    torch.manual_seed(0)
    base = _bn_net()
    x, y = batch()
    x = x.double()
    auto, fixed = copy.deepcopy(base), copy.deepcopy(base)
    opt = timm.optim.create_optimizer_v2(auto, "dcacounter", lr=0.05, momentum=0.9, rho="auto", rho_every=2,
                                         rho_safety=1.5, rho_lanczos=4, kappa=0.5)
    prepare(opt, auto)
    for k in range(5):
        remember_batch(opt, x, y)
        opt.step(closure_of(auto, opt, x, y))
        if k == 0:                                    # the first step: a twin with that ρ fixed
            entry = opt.rho_history[0]
            bound = max(-2 * entry["lam_min_G"], -entry["lam_min_H"], 0.0)
            assert opt.rho == pytest.approx(1.5 * bound, rel=1e-12)
            twin = timm.optim.create_optimizer_v2(fixed, "dcacounter", lr=0.05, momentum=0.9, rho=opt.rho,
                                                  kappa=0.5)
            prepare(twin, fixed)
            twin.step(closure_of(fixed, twin, x, y))
            for t1, t2 in zip([*auto.parameters(), *auto.buffers()], [*fixed.parameters(), *fixed.buffers()]):
                assert torch.equal(t1, t2)
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(auto.parameters(), fixed.parameters()))
    assert [e["step"] for e in opt.rho_history] == [0, 2, 4]
    assert measured_curvature(opt) == {f"dca_{k}": v for k, v in opt.rho_history[-1].items() if k != "step"}


def test_measured_kappa_is_refreshed_every_rho_every_steps_in_the_plain_loop():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=0.05, rho=0.3, rho_every=3)
    assert prepare(opt, model) is False                    # ρ > 0 without kappa: still no closure
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        remember_batch(opt, x, y)
        opt.step()
    assert [e["step"] for e in opt.rho_history] == [0, 3] and set(opt.rho_history[0]) == {"step", "kappa"}
    assert measured_curvature(opt) == {"dca_kappa": opt.rho_history[-1]["kappa"]}


@pytest.mark.parametrize("kwargs, what", [({"rho": "auto"}, "rho='auto'"), ({"rho": 0.5}, "kappa")])
def test_a_step_whose_batch_cannot_be_read_off_is_a_one_line_error_naming_the_remedy(kwargs, what):
    """Without remember_batch the step reads the batch off the loop's forward and backward
    (dcanets.optim.batches), which only a softmax cross-entropy allows: an MSE on one-hot targets
    (rows of its output gradient do not sum to 0) is refused in one line that names the remedy."""
    model, (x, y) = Net(), batch()
    opt = timm.optim.create_optimizer_v2(model, "dcacounter", lr=0.1, **kwargs)
    prepare(opt, model)
    opt.zero_grad()
    onehot = F.one_hot(y, 3).float()
    F.mse_loss(model(x), onehot).backward()
    with pytest.raises(RuntimeError, match=f"{what}.* is measured on the current batch .*softmax cross-entropy"
                                           r".*remember_batch\(optimizer, inputs, targets") as err:
        opt.step()
    assert "\n" not in str(err.value)
    remember_batch(opt, x, onehot, F.mse_loss)
    opt.step()                                               # the batch was all it needed
    remember_batch(torch.optim.SGD(model.parameters(), lr=0.1), x, y)       # a no-op for others


@pytest.mark.parametrize("name, kwargs, match", [
    ("dcacounter", {"rho": "fast"}, r"rho must be >= 0 \(a Hessian eigenvalue, in the units of lam = 1/lr\) "
                                    r"or 'auto'; got 'fast'"),
    ("dcaprox", {"rho": -1.0}, "rho must be >= 0"),
    ("dcacounter", {"rho": float("nan")}, "rho must be >= 0"),
    ("dcacounter", {"rho": True}, "rho must be >= 0"),
    ("dcacounter", {"rho": "auto", "rho_every": 0}, "rho_every must be an integer >= 1"),
    ("dcacounter", {"rho": "auto", "rho_safety": 0.0}, r"rho_safety must be > 0"),
    ("dcaprox", {"rho": "auto", "rho_lanczos": 0}, "rho_lanczos must be an integer >= 1"),
    ("dcacounter", {"kappa": 0.0}, "kappa must be > 0"),
    ("dcacounter", {"kappa": 1.0, "solver": "inner"}, "kappa is the curvature scale of the closed-form"),
    ("dcaquasihalf", {"rho": "auto"}, "rho='auto' would measure the curvature for nothing: direction='paper'"),
    ("dcal2", {"rho": "auto"}, "dcal2 has no rho term"),
])
def test_rho_options_are_checked_in_one_line(name, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        timm.optim.create_optimizer_v2(Net(), name, lr=0.1, **kwargs)
    assert "\n" not in str(err.value)


def test_rho_is_accepted_by_every_decomposition():
    DcaL2(Net().parameters(), lr=0.1, rho=0.5)
    for name in ("dcaprox", "dcacounter", "dcaquasineghalf"):
        assert timm.optim.create_optimizer_v2(Net(), name, lr=0.1, rho="auto").options.rho == "auto"


def test_remember_batch_reaches_the_optimizer_inside_timms_lookahead():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    opt = timm.optim.create_optimizer_v2(model, "lookahead_dcacounter", lr=0.1, rho=0.5)
    assert prepare(opt, model) is False
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    remember_batch(opt, x, y)
    opt.step()
    assert set(measured_curvature(opt)) == {"dca_kappa"}
