"""Convex residual networks (paper 003, eq. 7a-7c), many of them evaluated as one batched op.

    h_0 = x,   h_i = h_{i-1} + W_i [V_i^T h_{i-1} - b_i]_+,   f(x) = c^T h_L + d

is convex in x when W_i, V_i, b_i >= 0 and c > 0 (each coordinate of h_i is a non-negative
combination and pointwise maximum of convex functions; Boyd & Vandenberghe, section 3.2).

Constraint by reparametrization, not projection: every constrained tensor is stored as an
unconstrained raw parameter and read as ``scale * softplus(raw)``. Any optimizer then keeps the
constraint, timm's and the DCA decompositions alike (also those that call ``step(closure)`` or
take second-order steps), with no hook in any training loop; a projection would need a call after
every ``step`` in every loop that ever trains the model. The fixed ``scale`` (fan-in based) keeps
``raw`` of order one, so adaptive optimizers move every tensor by the same relative amount and
plain SGD does not see the vanishing softplus slope of tiny weights. ``softplus > 0`` makes
c > 0 strict, as eq. 7c asks; W, V, b are > 0 too, a subset of the allowed set >= 0.
"""
from __future__ import annotations

from typing import List, Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """raw with softplus(raw) = y, for y > 0 (initialising a constrained tensor at a value)."""
    return y + torch.log(-torch.expm1(-y))


class ConvexResidualLayer(nn.Module):
    """One residual layer of ``num_nets`` nets: h -> h + W [V^T h - b]_+ (eq. 7b), state (B, P, n)."""

    def __init__(self, n: int, p: int, m: int, v_identity: bool, bias_range: tuple, w_scale: float) -> None:
        super().__init__()
        lo, hi = bias_range
        self.w_scale, self.v_scale = w_scale, 1.0 / (0.8 * n)
        # raw ~ N(0, 1): values scale * softplus(raw) are positive, random, of mean ~0.8 * scale
        self.raw_w = nn.Parameter(torch.randn(p, n, m))
        self.raw_v = None if v_identity else nn.Parameter(torch.randn(p, n, m))
        self.raw_b = nn.Parameter(inverse_softplus(lo + (hi - lo) * torch.rand(p, m).clamp_min(1e-3)))

    # constrained views of the raw parameters (eq. 7: W, V, b >= 0)
    @property
    def W(self) -> torch.Tensor:
        return self.w_scale * F.softplus(self.raw_w)

    @property
    def V(self) -> Optional[torch.Tensor]:
        return None if self.raw_v is None else self.v_scale * F.softplus(self.raw_v)

    @property
    def b(self) -> torch.Tensor:
        return F.softplus(self.raw_b)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        V = self.V
        z = h if V is None else torch.einsum("bpn,pnm->bpm", h, V)  # all nets in one einsum
        return h + torch.einsum("bpm,pnm->bpn", F.relu(z - self.b), self.W)  # eq. 7b

    def forward_one(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Net k alone, h (B, n): the loop baseline."""
        V = self.V
        z = h if V is None else h @ V[k]
        return h + F.relu(z - self.b[k]) @ self.W[k].T


class ConvexResNets(nn.Module):
    """``num_nets`` independent convex residual networks R^n -> R, evaluated together.

    Every layer holds the parameters of all nets with a leading ``num_nets`` axis and runs as two
    ``einsum`` calls for all of them (``forward``); the layers form an ``nn.Sequential`` of
    same-shape residual blocks, so the DCA counter-loss decompositions can attach to them.
    ``forward_loop`` computes the same function one net at a time and exists only as the speed
    benchmark's baseline and as a check of the batched code.

    Args:
        in_features: n, the input (and state h_i) dimension.
        num_nets: how many networks share the input.
        layers: L, residual layers per network.
        hidden: m_i, columns of W_i and V_i; ignored when ``v_identity``.
        v_identity: V_i = I (eq. 10b, the simplified model of section 4); then m = n.
        bias_range: initial b_i ~ U[lo, hi] (section 4 compares [0, 0.5] with [0, 1]).
        w_init: mean initial entry of W_i times m * L (residual branches start near the identity).
        c_init: mean initial entry of c (default 1/n).
    """

    def __init__(self, in_features: int, num_nets: int = 1, layers: int = 3, hidden: int = 32,
                 v_identity: bool = False, bias_range: tuple = (0.0, 0.5), w_init: float = 0.1,
                 c_init: Optional[float] = None) -> None:
        super().__init__()
        n, p = in_features, num_nets
        m = n if v_identity else hidden
        self.in_features, self.num_nets, self.hidden, self.v_identity = n, p, m, v_identity
        lo, hi = bias_range
        if not 0 <= lo <= hi or hi <= 0:
            raise ValueError(f"bias_range must satisfy 0 <= lo <= hi, hi > 0; got {bias_range}")
        w_scale = w_init / (0.8 * m * layers)
        self.blocks = nn.Sequential(*[ConvexResidualLayer(n, p, m, v_identity, (lo, hi), w_scale)
                                      for _ in range(layers)])
        self.c_scale = (c_init if c_init is not None else 1.0 / n) / 0.8
        self.raw_c = nn.Parameter(torch.randn(p, n))
        self.d = nn.Parameter(torch.zeros(p))

    @property
    def layers(self) -> int:
        return len(self.blocks)

    @property
    def _layers(self) -> List[ConvexResidualLayer]:
        """``self.blocks`` as the layers they are (iterating an ``nn.Sequential`` types them as modules)."""
        return cast(List[ConvexResidualLayer], list(self.blocks))

    # stacked constrained views (L, P, ...) for inspection and tests
    @property
    def W(self) -> torch.Tensor:
        return torch.stack([blk.W for blk in self._layers])

    @property
    def V(self) -> Optional[torch.Tensor]:
        if self.v_identity:
            return None
        vs = []
        for blk in self._layers:
            v = blk.V
            assert v is not None  # every layer has V unless v_identity
            vs.append(v)
        return torch.stack(vs)

    @property
    def b(self) -> torch.Tensor:
        return torch.stack([blk.b for blk in self._layers])

    @property
    def c(self) -> torch.Tensor:
        return self.c_scale * F.softplus(self.raw_c)  # eq. 7c: c > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, n), shared by all nets, or (B, num_nets, n). Returns (B, num_nets)."""
        h = x.unsqueeze(1).expand(-1, self.num_nets, -1) if x.dim() == 2 else x
        h = self.blocks(h)
        return torch.einsum("bpn,pn->bp", h, self.c) + self.d  # eq. 7c

    def forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as ``forward``, one net at a time (the speed baseline)."""
        c, outs = self.c, []
        for k in range(self.num_nets):
            h = x if x.dim() == 2 else x[:, k]
            for blk in self._layers:
                h = blk.forward_one(h, k)
            outs.append(h @ c[k] + self.d[k])
        return torch.stack(outs, dim=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_nets={self.num_nets}, layers={self.layers}, "
                f"hidden={self.hidden}, v_identity={self.v_identity}")


def convexity_gap(fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f((x+y)/2) - (f(x)+f(y))/2 per pair and output: <= 0 (to rounding) iff midpoint-convex."""
    with torch.no_grad():
        return fn((x + y) / 2) - (fn(x) + fn(y)) / 2


def lipschitz_1d(fn, lo: float = 0.0, hi: float = 1.0, points: int = 4001) -> float:
    """max |f'| of a scalar function on [lo, hi], by finite differences on a fine grid."""
    with torch.no_grad():
        x = torch.linspace(lo, hi, points, dtype=torch.float64).unsqueeze(1)
        y = fn(x).reshape(-1)
        return float((y.diff().abs() / (x[1, 0] - x[0, 0])).max())

