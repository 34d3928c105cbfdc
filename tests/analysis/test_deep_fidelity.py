"""The path algebra of dcanets.analysis.paths and the directions of dcanets.analysis.deep_fidelity
against independent computations.

Every identity docs/decompositions.md ("The deep-network question") states is checked here on
cifar_plainnet20 in float64 with tiny batches of 8×8 images: the chain's gradnet gradient is the
twin's, its last single-block c is the one dcacounter/dcaquasihalf use, the single skips sum to
the first-order term of g_ref in the shortcut strength, the path classes sum to g_ref, the span
bound dominates every member, and the rank-one-model Newton step reduces to eq. 19.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

import dcanets  # noqa: F401  (registers the models and decompositions)
from dcanets.analysis import deep_fidelity as D
from dcanets.analysis import paths as P
from dcanets.analysis.fidelity import compare_steps
from dcanets.engine.fidelity import optimizer_step, reference_gradient
from dcanets.layers import shortcut_blocks

TOL = dict(rtol=1e-9, atol=1e-12)


def _setup(name="cifar_plainnet20", n=4, seed=1):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    return model, x, torch.randint(0, 10, (n,), generator=g)


def _flat(chain, grads):
    return chain.layout.flatten(dict(enumerate(grads)))


@pytest.fixture(scope="module")
def net():
    model, x, y = _setup()
    return model, x, y, P.record(model, x, y)


# -- the chain against the model's own autograd -------------------------------------------------

def test_chain_a_is_the_plain_gradient_and_its_gradnet_the_twins(net):
    model, x, y, chain = net
    loss = torch.nn.functional.cross_entropy(model(x), y)
    plain = torch.autograd.grad(loss, chain.layout.params)
    torch.testing.assert_close(chain.a, _flat(chain, plain), **TOL)
    ref, _ = reference_gradient(model, x, y, "gradnet")
    torch.testing.assert_close(P.gradnet_vector(chain), _flat(chain, ref), **TOL)


def test_last_single_skip_is_the_c_of_the_one_block_testnet_and_of_dcaquasihalf(net):
    """a + c_{B−1} = the gradient with a shortcut at the last block only (eq. 17's c), and it is the
    step of the registered dcaquasihalf (paper direction a + c, lr 1, no momentum)."""
    model, x, y, chain = net
    c = P.skip_vector(chain, chain.depth - 1, 1)
    ref, _ = reference_gradient(model, x, y, "last")
    torch.testing.assert_close(chain.a + c, _flat(chain, ref), **TOL)
    twin = copy.deepcopy(model)
    opt = create_optimizer_v2(twin, "dcaquasihalf", lr=1.0, momentum=0.0)
    before = [p.detach().clone() for p in twin.parameters()]
    optimizer_step(twin, opt, x, y)
    step = [w - p.detach() for p, w in zip(twin.parameters(), before)]
    torch.testing.assert_close(_flat(chain, step), chain.a + c, rtol=1e-7, atol=1e-10)


def test_single_skips_sum_to_the_first_order_term_in_the_shortcut_strength(net):
    """Σ_k c_k = d/dt g(t) at t = 0, g(t) the gradient with gradient-only shortcuts of strength t at
    every block (the model's own merge, zero-padding at the transitions): central difference."""
    model, x, y, chain = net
    summed = sum(P.skip_vector(chain, k, 1) for k in range(chain.depth))

    def g(t):
        twin = copy.deepcopy(model)
        for _, b in shortcut_blocks(twin):
            b.shortcut_alpha, b.act_placement, b.shortcut_grad_only = t, "before_add", True
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(twin.train()(x), y), list(twin.parameters()))
        return chain.layout.flatten(dict(enumerate(grads)))

    t = 1e-5     # truncation error t²·(paths skipping 3 blocks)
    diff = summed - (g(t) - g(-t)) / (2 * t)
    assert float(diff.norm() / summed.norm()) < 1e-7


def test_path_classes_sum_to_gradnet_and_their_first_classes_are_the_family_sums(net):
    _, _, _, chain = net
    ref = P.gradnet_vector(chain)
    skips, runs = P.by_skips(chain, 3), P.by_runs(chain, 2)
    torch.testing.assert_close(skips.sum(0), ref, **TOL)
    torch.testing.assert_close(runs.sum(0), ref, **TOL)
    fam = D.family(chain)
    torch.testing.assert_close(skips[0], chain.a, **TOL)
    torch.testing.assert_close(skips[0] + skips[1], fam.rows[fam.singles()].sum(0), **TOL)
    torch.testing.assert_close(runs[0] + runs[1], fam.rows.sum(0), **TOL)


def test_skip_vectors_vanish_on_the_skipped_span_and_above(net):
    _, _, _, chain = net
    c = P.skip_vector(chain, 3, 2)
    groups = chain.layout.groups
    assert all(float(c[g.start:g.stop].abs().max()) == 0.0 for g in groups[4:])   # blocks 3… and the head
    assert float(c[groups[3].start:groups[3].stop].abs().max()) > 0                # block 2 is below
    with pytest.raises(ValueError, match="outside"):
        P.skip_vector(chain, chain.depth - 1, 2)


def test_record_leaves_the_model_as_it_was():
    model, x, y = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    P.record(model, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_record_refuses_models_that_are_not_plain_chains():
    model, x, y = _setup("cifar_resnet20")
    with pytest.raises(ValueError, match="not plain"):
        P.record(model, x, y)
    with pytest.raises(ValueError, match="no blocks of the shortcut family"):
        P.record(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)).double(), x, y)


# -- spans, bounds and Newton steps on Gram matrices --------------------------------------------

def _grams(rows, ref):
    n = rows.shape[1]
    layout = P.Layout([nn.Parameter(torch.zeros(n, dtype=torch.float64))],
                      [P.Group("stem", "stem", 0, n // 2), P.Group("head", "head", n // 2, n)], [[0], []])
    return D.Grams.of(rows, ref, layout)


def test_span_bound_dominates_every_member_and_finer_coefficients_dominate_coarser(net):
    _, _, _, chain = net
    fam = D.family(chain, max_len=2)
    grams = D.Grams.of(fam.rows, P.gradnet_vector(chain), chain.layout)
    n = fam.rows.shape[0]
    whole, stage, group = (D.best_in_span(grams, p)["whole"] for p in ("whole", "stage", "group"))
    members = [grams.cosines(D.indicator(n, [i]))["whole"] for i in range(n)]
    assert whole >= max(members) - 1e-12
    assert group >= stage - 1e-12 >= whole - 2e-12
    assert D.best_in_span(grams.sub(fam.singles()))["whole"] <= whole + 1e-12
    with pytest.raises(ValueError, match="per must be"):
        D.best_in_span(grams, "block")


def test_span_bound_is_one_when_the_reference_is_in_the_span():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 40, generator=g, dtype=torch.float64)
    ref = rows[0] - 2 * rows[2]
    assert D.best_in_span(_grams(rows, ref))["whole"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_counter_newton_is_eq19_for_one_block_with_a_orthogonal_to_c(rho):
    a = torch.tensor([3.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    c = torch.tensor([0.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    grams = _grams(torch.stack([a, c]), torch.ones(4, dtype=torch.float64))
    t = D.counter_newton(grams, [0, 1], 2, rho)
    beta = float(a @ a) / (2 * float(c @ c) + rho)
    torch.testing.assert_close(t / t[0], torch.tensor([1.0, beta], dtype=torch.float64), **TOL)
    torch.testing.assert_close(D.eq19(grams, rho), torch.tensor([1.0, beta], dtype=torch.float64), **TOL)


def test_counter_newton_solves_the_rank_one_model_exactly():
    """(aaᵀ + ½Σ_j (2c_j − a)(2c_j − a)ᵀ + ρ/4) Δ = a, dense, without orthogonality."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 10, generator=g, dtype=torch.float64)
    rho = 0.7
    grams = _grams(rows, torch.ones(10, dtype=torch.float64))
    delta = D.counter_newton(grams, [0, 1, 2, 3], 4, rho) @ rows
    a = rows[0]
    M = torch.outer(a, a) + rho * torch.eye(10, dtype=torch.float64)
    for c in rows[1:]:
        M += 0.5 * torch.outer(2 * c - a, 2 * c - a)
    torch.testing.assert_close(delta, torch.linalg.solve(M, a), **TOL)


def test_quasi_newton_for_one_block_goes_along_a_plus_c():
    a = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    c = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    grams = _grams(torch.stack([a, c]), torch.ones(3, dtype=torch.float64))
    t = D.quasi_newton(grams, [0, 1], 2)
    assert t[0] == pytest.approx(float(t[1]), rel=1e-12)
    assert float(t[0] * (a @ (a + c))) > 0            # a descent direction for L


def test_newton_cg_solves_a_convex_quadratic_and_stops_at_negative_curvature():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = B @ B.T + 0.5 * torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(6, generator=g, dtype=torch.float64)
    out = D.newton_cg(lambda v: A @ v, rhs, rho=0.2, iters=6)
    torch.testing.assert_close(out.step, torch.linalg.solve(A + 0.1 * torch.eye(6, dtype=torch.float64), rhs),
                               rtol=1e-8, atol=1e-10)
    assert not out.negative_curvature
    stopped = D.newton_cg(lambda v: -v, rhs, rho=0.0, iters=6)
    assert stopped.negative_curvature and stopped.iters == 0 and torch.equal(stopped.step, rhs)


def test_g2_operator_is_the_hessian_of_l_plus_half_the_counter_loss():
    """A central difference of ∇(L + ½L'_{−1}) along v against the operator."""
    model, x, y = _setup(n=4)
    chain = P.record(model, x, y)
    v = torch.randn(chain.layout.numel, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v /= v.norm()
    Hv = D.g2_operator(model, x, y, chain.layout)(v)
    block, slices = P.last_same_shape(model), chain.layout.slices()

    def grad_at(eps):
        twin = copy.deepcopy(model).train()
        tblock = dict(twin.named_modules())[next(n for n, m in model.named_modules() if m is block)]
        params = [p for p in twin.parameters() if p.requires_grad]
        with torch.no_grad():
            for i, p in enumerate(params):
                p.add_(eps * v[slices[i]].view_as(p))
        with D.mixed(tblock, -1.0):
            counter = torch.nn.functional.cross_entropy(twin(x), y)
        loss = torch.nn.functional.cross_entropy(twin(x), y) + 0.5 * counter
        return chain.layout.flatten(dict(enumerate(torch.autograd.grad(loss, params))))

    eps = 1e-6
    diff = Hv - (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    assert float(diff.norm() / Hv.norm()) < 1e-5


def test_eq19_ridge_is_the_rho_over_2_kappa_of_dcacounter(net):
    """eq19(ridge=ρ/(2κ)) on [a, c_{B−1}] is the step of dcacounter(rho=ρ, kappa=κ): one convention."""
    model, x, y, chain = net
    c = P.skip_vector(chain, chain.depth - 1, 1)
    rho, kappa = 3.0, 0.4
    grams = D.Grams.of(torch.stack([chain.a, c]), chain.a, chain.layout)
    coef = D.eq19(grams, rho / (2 * kappa))
    assert coef[1] != pytest.approx(float(D.eq19(grams)[1]), rel=1e-3)   # the ridge matters here
    twin = copy.deepcopy(model)
    opt = create_optimizer_v2(twin, "dcacounter", lr=1.0, momentum=0.0, rho=rho, kappa=kappa)
    before = [p.detach().clone() for p in twin.parameters()]
    optimizer_step(twin, opt, x, y)
    step = [w - p.detach() for p, w in zip(twin.parameters(), before)]
    torch.testing.assert_close(_flat(chain, step), coef[0] * chain.a + coef[1] * c, rtol=1e-7, atol=1e-10)


# -- the whole measurement ----------------------------------------------------------------------

def test_measure_bounds_dominate_its_directions_and_eq19_matches_dcacounter():
    model, x, y = _setup(n=4)
    m = D.measure(model, x, y, rhos=(0.0, 1.0), skips_cap=3)
    cos = {k: v["whole"] for k, v in m.cosines.items()}
    singles = ("sgd", "dcacounter", "single_sum", "single_eq19", "single_newton", "quasi_sum", "quasi_newton")
    assert all(cos["best_single_whole"] >= cos[k] - 1e-9 for k in singles)
    assert all(cos["best_span_whole"] >= cos[k] - 1e-9 for k in D.DIRECTIONS)
    assert cos["skips_le_1"] == pytest.approx(cos["single_sum"], abs=1e-9)
    assert cos["runs_le_1"] == pytest.approx(cos["span_sum"], abs=1e-9)
    assert "single_newton@rho=1" in cos and "span_sum@rho=1" not in cos
    reports = compare_steps(model, {"dcacounter": lambda mm: create_optimizer_v2(
        mm, "dcacounter", lr=0.1, momentum=0.0, rho=0.0)}, x, y)
    assert reports["dcacounter"].cosine == pytest.approx(cos["dcacounter"], abs=1e-7)


def test_compare_steps_leaves_the_model_and_reports_refusals():
    model, x, y = _setup(n=4)
    before = copy.deepcopy(model.state_dict())

    def refused(mm):
        return create_optimizer_v2(mm, "dcacounter", lr=0.1, momentum=0.0, beta_max=1e-6)

    out = compare_steps(model, {"sgd": lambda mm: torch.optim.SGD(mm.parameters(), lr=0.1), "refused": refused}, x, y)
    assert out["sgd"].cosine == pytest.approx(out["sgd"].baseline_cosine, abs=1e-9)
    assert isinstance(out["refused"], str) and "beta" in out["refused"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- the all-block counter loss at alpha = 1/2 ----------------------------------------------------

def _group_factor(j, depth):
    """(1/2)^(blocks above group j): the stem (j = 0) 2^-B, block l (j = l + 1) 2^-(B-l), the head 1."""
    return 1.0 if j == depth + 1 else 0.5 ** (depth - max(j - 1, 0))


def test_linearised_all_block_gradient_is_the_gradnet_gradient_halved_per_block(net):
    """The identity the all-block rows rest on: L'^{all}_{1/2} linearised at the plain forward has, on
    block l (1-based), (1/2)^(B-l+1) times the gradnet twin's gradient (the twin's own merge, not the
    chain), (1/2)^B on the stem, the twin's on the head; rescaled per block it is g_ref itself."""
    model, x, y, chain = net
    vecs = D.all_block(model, x, y, chain.layout)
    ref = _flat(chain, reference_gradient(model, x, y, "gradnet")[0])
    for j, g in enumerate(chain.layout.groups):
        part = slice(g.start, g.stop)
        torch.testing.assert_close(vecs["allhalf_linear"][part], _group_factor(j, chain.depth) * ref[part], **TOL)
    torch.testing.assert_close(vecs["allhalf_linear_rescaled"], ref, **TOL)
    assert float(ref.norm()) > 0


def test_exact_all_block_gradient_is_the_half_scaled_residual_nets_and_not_the_linearised(net):
    """∇L'^{all}_{1/2} is the gradient of the net whose every block is 1/2·(act(F(x)) + s(x)): the
    twin's own act-before-add merge with alpha = 1 (zero padding at the transitions), output halved.
    Taken at that net's forward, it is not the linearised direction."""
    model, x, y, chain = net
    vecs = D.all_block(model, x, y, chain.layout)
    twin = copy.deepcopy(model)
    for _, b in shortcut_blocks(twin):
        b.shortcut_alpha, b.act_placement = 1.0, "before_add"
        b.register_forward_hook(lambda m, i, o: 0.5 * o)
    loss = torch.nn.functional.cross_entropy(twin(x), y)
    grads = torch.autograd.grad(loss, [p for p in twin.parameters() if p.requires_grad])
    torch.testing.assert_close(vecs["allhalf_exact"], _flat(chain, grads), rtol=1e-7, atol=1e-12)
    exact, lin = vecs["allhalf_exact_rescaled"], vecs["allhalf_linear_rescaled"]
    assert float(exact @ lin / (exact.norm() * lin.norm())) < 0.99


def test_measure_reports_the_all_block_rows_and_step_lengths():
    model, x, y = _setup()
    m = D.measure(model, x, y)
    assert m.cosines["allhalf_linear_rescaled"]["whole"] == pytest.approx(1.0, abs=1e-9)
    assert set(D.ALL_BLOCK) <= set(m.lengths) and m.lengths["sgd"] == pytest.approx(1.0)
    ratio = m.diagnostics["ref_norm"] / m.diagnostics["a_norm"]
    assert m.lengths["allhalf_linear_rescaled"] == pytest.approx(ratio, rel=1e-9)
    assert m.lengths["allhalf_linear"] < m.lengths["allhalf_linear_rescaled"]
