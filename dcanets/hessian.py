"""The Hessian toolbox: Hessian–vector products, power iteration, Lanczos, finite differences.

Why a module of its own, below ``dcanets.optim``: the decompositions measure curvature while they
step (``rho="auto"``'s λ_min, the Newton line's gᵀ∇²L'g; ``dcanets.optim.rho``) and the analysis
reports it (``dcanets.analysis.curvature.advise``, the deep-network Newton steps), so both import
it and it imports neither. Every operator works on flat vectors over a list of parameters;
:class:`FrozenBuffers` keeps the extra forward passes from moving BatchNorm statistics.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


def hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
        vec: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """∇²L·v by double backward (Pearlmutter's trick): one gradient with a graph, one more VJP.

    ``loss_fn`` is a zero-argument callable returning the scalar loss; parameters the loss does
    not touch get a zero product.
    """
    params = list(params)
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(grads, vec) if g is not None]
        if not pairs:
            return [torch.zeros_like(p) for p in params]
        dot = sum((g * v).sum() for g, v in pairs)
        assert isinstance(dot, torch.Tensor)  # pairs is not empty, so the sum is a tensor, not 0
        out = torch.autograd.grad(dot, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, out)]


def _start(dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm()).to(dtype)


def power_iteration(matvec: Matvec, dim: int, iters: int = 50, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> float:
    """The eigenvalue of largest magnitude (Rayleigh quotient after ``iters`` products).

    For a Hessian that is λ_max unless a negative eigenvalue is larger in magnitude; use
    :func:`lanczos` when both ends matter.
    """
    if dim < 1 or iters < 1:
        raise ValueError(f"dim and iters must be >= 1; got dim={dim}, iters={iters}")
    v, eig = _start(dim, seed, dtype), 0.0
    for _ in range(iters):
        w = matvec(v)
        eig = float(torch.dot(v.double(), w.double()))
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
    return eig


def lanczos(matvec: Matvec, dim: int, steps: int = 30, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (ascending) and weights of ``steps`` Lanczos iterations from a random start.

    The weights are the squared first components of the Ritz vectors: the nodes and weights of
    stochastic Lanczos quadrature of the spectral density (they sum to 1). The extreme Ritz
    values converge first, so λ_min and λ_max come out in a few dozen products. Full
    re-orthogonalisation keeps them free of ghost copies; the basis costs ``steps·dim`` numbers.
    """
    if dim < 1 or steps < 1:
        raise ValueError(f"dim and steps must be >= 1; got dim={dim}, steps={steps}")
    steps = min(steps, dim)
    q = _start(dim, seed, dtype)
    basis, alphas, betas = [q], [], []
    for k in range(steps):
        w = matvec(basis[-1]).to(dtype)
        alpha = float(torch.dot(w.double(), basis[-1].double()))
        alphas.append(alpha)
        Q = torch.stack(basis)
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            w = w - Q.T @ (Q @ w)
        beta = float(w.double().norm())
        if k == steps - 1 or beta < 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        basis.append(w / beta)
    n = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(T)
    return values, vectors[0] ** 2


class FrozenBuffers:
    """Snapshot a model's buffers (BatchNorm statistics) and restore them on exit, so extra
    forward passes (Hessian probes, a DCA step's additional loss evaluations) leave no trace."""

    def __init__(self, model: Optional[torch.nn.Module]) -> None:
        self.model = model
        self.saved: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> "FrozenBuffers":
        if self.model is not None:
            self.saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


def loss_hessian_operator(model: torch.nn.Module, loss_fn: Callable, inputs: torch.Tensor,
                          targets: torch.Tensor) -> Tuple[Matvec, int]:
    """v ↦ ∇²_w loss_fn(model(inputs), targets)·v on flat vectors, and the dimension.

    The model stays in its current mode (train mode: the loss SGD sees, with batch statistics);
    its buffers are restored after every product.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    dim = sum(sizes)

    def closure() -> torch.Tensor:
        return loss_fn(model(inputs), targets)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        vec = [c.view(s).to(p.dtype) for c, s, p in zip(torch.split(v, sizes), shapes, params)]
        with FrozenBuffers(model):
            out = hvp(closure, params, vec)
        return torch.cat([h.reshape(-1) for h in out]).to(v.dtype)

    return matvec, dim


Grads = Sequence[Optional[torch.Tensor]]


def flatten(params: Sequence[torch.Tensor], vs: Grads) -> torch.Tensor:
    """One flat vector of per-parameter tensors (None: zeros of the parameter's size)."""
    return torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if v is None
                      else v.detach().reshape(-1) for p, v in zip(params, vs)])


@contextmanager
def displaced(params: Sequence[torch.Tensor], flat: torch.Tensor, step: float) -> Iterator[None]:
    """The parameters at w + step·``flat`` inside the block, restored exactly on exit (also on an
    error), so a finite-difference probe leaves the weights bit-identical."""
    params = list(params)
    w0 = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, w, d in zip(params, w0, torch.split(flat, [p.numel() for p in params])):
                p.copy_(w + step * d.view_as(p).to(p))
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)


def gradient_difference_operator(grad_at: Callable[[], Grads], params: Sequence[torch.Tensor],
                                 eps: float) -> Tuple[Matvec, int]:
    """v ↦ (∇f(w + εv) − ∇f(w − εv))/(2ε) on flat vectors, and the dimension: ∇²f·v from gradients.

    Why: a training closure runs its own ``backward()`` and returns a detached loss, so it cannot
    give the graph that :func:`hvp`'s double backward needs; two gradient evaluations can.
    ``grad_at()`` evaluates ∇f at the current ``params`` (None entries count as zero); the
    parameters are moved to w ± εv and restored exactly. Exact for a quadratic f up to rounding;
    otherwise the error is O(ε²·‖∇³f‖), so ``eps`` should be small next to ‖w‖ but large enough
    that the gradient difference stands above the floating-point noise of one evaluation.
    """
    params = list(params)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        out = []
        for sign in (1.0, -1.0):
            with displaced(params, v, sign * eps):
                out.append(flatten(params, grad_at()))
        return ((out[0] - out[1]) / (2 * eps)).to(v)

    return matvec, sum(p.numel() for p in params)


def fd_step(params: Sequence[torch.Tensor], fd_eps: float) -> float:
    """ε of a central difference: ``fd_eps``·max(1, ‖w‖), relative to the weights' scale."""
    norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in params))
    return fd_eps * max(1.0, norm)


def directional_curvature(grad_at: Callable[[], Grads], params: Sequence[torch.Tensor], direction: Grads,
                          eps: float) -> float:
    """ûᵀ∇²f û with û = u/‖u‖ (u = ``direction``; None entries are zero), from one central
    difference of gradients (two ``grad_at`` calls); 0 when u = 0. On a ReLU network this is a
    secant: a difference of weights crosses activation kinks that :func:`hvp` does not see."""
    params = list(params)
    u = flatten(params, direction)
    norm = float(u.double().norm())
    if norm == 0:
        return 0.0
    unit = u / norm
    matvec, _ = gradient_difference_operator(grad_at, params, eps)
    return float(torch.dot(matvec(unit).double(), unit.double()))


def graph_hessian_operator(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> Tuple[Matvec, int]:
    """v ↦ ∇²loss·v on flat vectors for a loss already computed with its graph, and the dimension.

    Unlike :func:`loss_hessian_operator`, the forward pass and the first backward (with a graph)
    run once; every product is one more backward through the kept graph (``retain_graph``), so
    a Lanczos run costs one forward in all and sees the same dropout masks at every product.
    Parameters the loss does not use get zeros.
    """
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sizes = [p.numel() for p in params]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        pieces = [c.view_as(p).to(p) for c, p in zip(torch.split(v, sizes), params)]
        if not live:
            return torch.zeros_like(v)
        dot = sum((g * pieces[i]).sum() for i, g in live)
        assert isinstance(dot, torch.Tensor)  # live is not empty
        out = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
        return flatten(params, out).to(v)

    return matvec, sum(sizes)


def extreme_eigenvalues(model: torch.nn.Module, loss_fn: Callable, inputs: torch.Tensor,
                        targets: torch.Tensor, steps: int = 30, seed: int = 0) -> Tuple[float, float]:
    """(λ_min, λ_max) of the loss Hessian on one batch, from ``steps`` Lanczos iterations."""
    matvec, dim = loss_hessian_operator(model, loss_fn, inputs, targets)
    values, _ = lanczos(matvec, dim, steps=steps, seed=seed)
    return float(values[0]), float(values[-1])


__all__ = ["Grads", "Matvec", "FrozenBuffers", "hvp", "power_iteration", "lanczos", "loss_hessian_operator",
           "graph_hessian_operator", "gradient_difference_operator", "flatten", "displaced", "fd_step",
           "directional_curvature", "extreme_eigenvalues"]
