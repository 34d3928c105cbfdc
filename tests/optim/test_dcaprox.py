"""dcaprox: the proximal decomposition G = L + ρ·L2 (paper 000, §2), K inner steps."""
import copy

import timm
import timm.optim
import torch
import torch.nn.functional as F
from dca_nets import Net, batch, closure_of, flat_grad

import dcanets  # noqa: F401  (registers the decompositions into timm)
from dcanets.optim import prepare


def test_prox_one_inner_step_is_sgd_and_k_steps_solve_the_prox_subproblem():
    torch.manual_seed(0)
    model, (x, y) = Net(), batch()
    lr, rho = 0.2, 0.5
    for k in (1, 4):
        m = copy.deepcopy(model)
        opt = timm.optim.create_optimizer_v2(m, "dcaprox", lr=lr, rho=rho, inner_steps=k, momentum=0.0)
        prepare(opt, m)
        opt.step(closure_of(m, opt, x, y))
        ref = copy.deepcopy(model)
        w0 = [p.detach().clone() for p in ref.parameters()]
        for _ in range(k):   # ∇S(w) = ∇L(w) + ρ(w − w_k)
            g = flat_grad(F.cross_entropy(ref(x), y), ref)
            with torch.no_grad():
                for p, gi, w in zip(ref.parameters(), g, w0):
                    p.sub_(lr * (gi + rho * (p - w)))
        for p, q in zip(m.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-6)
