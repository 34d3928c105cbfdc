"""The deep-network question: which counter-loss directions reach the shortcut network's gradient?

Paper 000 derives "DCA + vanilla = SGD + shortcut" for *one* block: the counter loss of eq. 10
skips the last block and eq. 19's step a + βc adds that block's shortcut gradient c (eq. 17).
A deep shortcut network's gradient (the ``gradnet`` twin: plain forward, shortcut backward) is a
sum over every path through the blocks, each block either traversed (its Jacobian J_l) or skipped
(its shortcut S_l: the identity, or the zero-padding map at a stage transition)::

    r_l = (J_l + S_l)ᵀ r_{l+1},   g_ref on the parameters w_l of block l = P_lᵀ r_{l+1}

(P_l = ∂h^{l+1}/∂w_l, r_B = ∂L/∂h^B). Expanded, g_ref = Σ over subsets of skipped blocks. This
module measures how much of that sum the generalisations of the counter loss can reach, as
*directions* (vectors in parameter space), without making them optimizers.

Vectors (all at the plain network's forward, as eq. 17's c is):

* ``a`` = ∇L, the plain gradient (no block skipped);
* ``c_{k,m}`` = (∂h^k/∂w)ᵀ S_kᵀ⋯S_{k+m−1}ᵀ ∂L/∂h^{k+m}: the part of the gradient flowing through a
  shortcut around the span of blocks k … k+m−1 and through every other block. It is eq. 17's c
  of the counter loss L(α h^{k+m} + (1 − α) S(h^k)) that skips that span; m = 1 are the single
  blocks (``c_k``), and c_{B−1,1} is ``dcacounter``'s c. At the two stage transitions S is the
  zero-padding shortcut the gradnet uses (eq. 10 as written needs h^{k+1} and h^k of one shape).

Their sums are path classes: a + Σ_k c_k is every path with at most one skipped block (the
first-order term of g_ref in the shortcut strength), a + Σ_{k,m} c_{k,m} every path whose skipped
blocks form at most one contiguous run. :func:`path_classes` splits g_ref exactly by the number of
skipped blocks or of skipped runs (a backward pass that tracks it), which says how much of g_ref
any such family can hold.

Directions are represented by coefficients over the family's rows (:class:`Family`), so every
cosine, whole net and per stage, comes from per-group Gram matrices (:class:`Grams`): the
least-squares projection of g_ref onto the span (:func:`best_in_span`) is the upper bound of
what any linear combination of the family's vectors can reach, and the rank-one-curvature Newton
steps of the multi-block decompositions (:func:`model_newton`, :func:`quasi_newton`) are inside
that span. :func:`newton_cg` is the exact (true-Hessian) Newton step of eq. 12's G2 by conjugate
gradients. docs/decompositions.md, "The deep-network question", has the measurements.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcanets.analysis.curvature import FrozenBuffers, hvp
from dcanets.analysis.fidelity import shortcut_blocks, stage_names

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Span = Tuple[int, int]   # (first skipped block k, number of skipped blocks m)


# -- the chain of blocks ------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """One contiguous range [start, stop) of the flat parameter vector: the stem, one block, or
    the head, with the stage its parameters belong to (``fidelity.stage_names``)."""

    name: str
    stage: str
    start: int
    stop: int


@dataclass
class Layout:
    """Flat parameter vectors ordered group by group (stem, block 0, …, block B−1, head), so a
    group's or a stage's part of a vector is a slice."""

    params: List[nn.Parameter]
    groups: List[Group]
    members: List[List[int]]          # indices into ``params`` of each group, in flat order

    @property
    def numel(self) -> int:
        return self.groups[-1].stop

    def flatten(self, parts: Mapping[int, Optional[torch.Tensor]]) -> torch.Tensor:
        """A flat vector (the parameters' dtype) from per-parameter tensors (missing or None: zeros)."""
        out = torch.zeros(self.numel, dtype=self.params[0].dtype)
        for i, sl in self.slices().items():
            t = parts.get(i)
            if t is not None:
                out[sl] = t.detach().reshape(-1)
        return out

    def slices(self) -> Dict[int, slice]:
        """Parameter index -> its slice of the flat vector."""
        out, pos = {}, 0
        for idx in self.members:
            for i in idx:
                n = self.params[i].numel()
                out[i] = slice(pos, pos + n)
                pos += n
        return out

    def stages(self) -> List[str]:
        return list(dict.fromkeys(g.stage for g in self.groups))


def _layout(model: nn.Module, blocks: Sequence[Tuple[str, nn.Module]]) -> Layout:
    """Stem = parameters registered before the first block, head = those after the last one."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stage_of = stage_names(model)
    index = {id(p): i for i, (_, p) in enumerate(named)}
    block_sets = [[index[id(p)] for p in b.parameters() if id(p) in index] for _, b in blocks]
    in_blocks = {i for s in block_sets for i in s}
    first = min(block_sets[0]) if block_sets[0] else 0
    stem = [i for i in range(len(named)) if i not in in_blocks and i < first]
    head = [i for i in range(len(named)) if i not in in_blocks and i >= first]
    members = [stem] + block_sets + [head]
    names = ["stem"] + [n for n, _ in blocks] + ["head"]
    groups, pos = [], 0
    for name, idx in zip(names, members):
        size = sum(named[i][1].numel() for i in idx)
        stage = stage_of[named[idx[0]][0]] if idx else name
        groups.append(Group(name, stage, pos, pos + size))
        pos += size
    return Layout([p for _, p in named], groups, members)


@dataclass
class Chain:
    """The plain forward of a model of the shortcut family, kept with its graph block by block, so a
    cotangent can be pushed through one block (J_lᵀ u, P_lᵀ u) or around it (S_lᵀ u) at a time.

    ``h[l]`` is the input of block l and ``h[B]`` the output of the last block; ``g[l]`` = ∂L/∂h[l]
    and ``a`` = ∇L (flat) come from one ordinary backward."""

    model: nn.Module
    blocks: List[nn.Module]
    layout: Layout
    h: List[torch.Tensor]
    loss: torch.Tensor
    g: List[torch.Tensor] = field(default_factory=list)
    a: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def depth(self) -> int:
        """B: the number of blocks."""
        return len(self.blocks)

    def through(self, j: int, u: torch.Tensor) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """(J_jᵀ u, {parameter index: P_jᵀ u}) for a cotangent u at block j's output."""
        idx = self.layout.members[j + 1]
        inputs: List[torch.Tensor] = [self.h[j]] + [self.layout.params[i] for i in idx]
        out = torch.autograd.grad(self.h[j + 1], inputs, u, retain_graph=True, allow_unused=True)
        return out[0], {i: t for i, t in zip(idx, out[1:]) if t is not None}

    def around(self, j: int, u: torch.Tensor) -> torch.Tensor:
        """S_jᵀ u: the adjoint of block j's shortcut (identity, or the parameter-free downsample)."""
        shortcut: Optional[nn.Module] = getattr(self.blocks[j], "downsample", None)
        if shortcut is None:
            return u
        with torch.enable_grad():
            z = torch.zeros_like(self.h[j]).requires_grad_(True)
            return torch.autograd.grad(shortcut(z), z, u)[0]

    def stem(self, u: torch.Tensor) -> Dict[int, torch.Tensor]:
        """{parameter index: (∂h^0/∂w_stem)ᵀ u}."""
        idx = self.layout.members[0]
        if not idx:
            return {}
        out = torch.autograd.grad(self.h[0], [self.layout.params[i] for i in idx], u, retain_graph=True,
                                  allow_unused=True)
        return {i: t for i, t in zip(idx, out) if t is not None}

    def pull(self, k: int, u: torch.Tensor) -> torch.Tensor:
        """(∂h^k/∂w)ᵀ u as a flat vector: u at the input of block k pushed through blocks k−1 … 0 and
        the stem (zero on block k and above, and on the head)."""
        parts: Dict[int, torch.Tensor] = {}
        for j in range(k - 1, -1, -1):
            u, grads = self.through(j, u)
            parts.update(grads)
        parts.update(self.stem(u))
        return self.layout.flatten(parts)


def _check_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The model's shortcut-family blocks; refused unless they are plain with parameter-free shortcuts."""
    blocks = shortcut_blocks(model)
    if not blocks:
        raise ValueError(f"model {type(model).__name__} has no blocks of the shortcut family; use a "
                         "cifar_plainnet* or plainnet* model")
    for name, module in blocks:
        b: Any = module          # a block of the family: float/bool attributes and a downsample
        if float(b.shortcut_alpha) != 0.0 or b.shortcut_grad_only:
            raise ValueError(f"block {name} is not plain (shortcut_alpha={b.shortcut_alpha}, grad_only="
                             f"{b.shortcut_grad_only}): the path algebra needs the plain network's Jacobians")
        if b.downsample is not None and any(True for _ in b.downsample.parameters()):
            raise ValueError(f"block {name} has a projection shortcut with parameters; only identity and "
                             "parameter-free (zero-padding) shortcuts are supported")
    return blocks


@contextmanager
def _scratch_buffers(model: nn.Module) -> Iterator[None]:
    """Within the block the model's buffers are clones: BatchNorm updates those, and the originals
    come back untouched on exit. (Copying the old values back in place, as ``FrozenBuffers`` does,
    would change tensors the kept graph saved for its backward.)"""
    saved = [(m, name, buf) for m in model.modules() for name, buf in m._buffers.items() if buf is not None]
    for m, name, buf in saved:
        m._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for m, name, buf in saved:
            m._buffers[name] = buf


def record(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
           loss_fn: LossFn = F.cross_entropy) -> Chain:
    """One plain forward in train mode (BatchNorm statistics of the batch, running statistics left
    as they were) with every block's input and output kept, and the plain backward quantities
    (``g``, ``a``). Refused when the blocks do not form one chain (block l+1 reads block l's output)."""
    blocks = _check_blocks(model)
    seen: List[Tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for _, b in blocks]
    model.train()
    try:
        with _scratch_buffers(model), torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
    finally:
        for hook in hooks:
            hook.remove()
    if len(seen) != len(blocks) or any(seen[j + 1][0] is not seen[j][1] for j in range(len(seen) - 1)):
        raise ValueError("the blocks do not form one chain (each block's input the previous block's output)")
    layout = _layout(model, blocks)
    chain = Chain(model, [b for _, b in blocks], layout, [x for x, _ in seen] + [seen[-1][1]], loss)
    grads = torch.autograd.grad(loss, chain.h + list(layout.params), retain_graph=True, allow_unused=True)
    chain.g = [t.detach() for t in grads[:len(chain.h)]]
    chain.a = layout.flatten(dict(enumerate(grads[len(chain.h):])))
    return chain


def head_part(chain: Chain) -> Dict[int, torch.Tensor]:
    """The head's gradient (only the no-skip path reaches it: no shortcut lies above it)."""
    idx = chain.layout.members[-1]
    grads = torch.autograd.grad(chain.loss, [chain.layout.params[i] for i in idx], retain_graph=True,
                                allow_unused=True)
    return {i: t for i, t in zip(idx, grads) if t is not None}


# -- vectors: skipped spans and path classes ----------------------------------------------------

def skip_vector(chain: Chain, k: int, m: int) -> torch.Tensor:
    """c_{k,m}: ∂L/∂h^{k+m} carried around blocks k … k+m−1 by their shortcuts, then through the
    trunk below (eq. 17's c for a counter loss skipping that span)."""
    if not (0 <= k and m >= 1 and k + m <= chain.depth):
        raise ValueError(f"span (k={k}, m={m}) outside 0 <= k, 1 <= m, k + m <= {chain.depth}")
    u = chain.g[k + m]
    for j in range(k + m - 1, k - 1, -1):
        u = chain.around(j, u)
    return chain.pull(k, u)


def spans(depth: int, max_len: Optional[int] = None) -> List[Span]:
    """Every span (k, m) with m ≤ max_len (all when None), single blocks first, then by length."""
    top = depth if max_len is None else min(max_len, depth)
    return [(k, m) for m in range(1, top + 1) for k in range(depth - m + 1)]


def path_classes(chain: Chain, start: Hashable, step: Callable[[Any, bool], Any],
                 key: Callable[[Any], int], n: int) -> torch.Tensor:
    """g_ref split by a property of its paths: rows i = 0 … n−1 of the result sum to the gradnet
    gradient, row i holding the paths whose state, tracked from the loss down by
    ``step(state, skipped)`` at every block, has ``key(state) = i`` where the path ends (at the
    parameter it reaches). States must be finitely many (cap the counts)."""
    out = torch.zeros(n, chain.layout.numel, dtype=chain.a.dtype)
    heads = chain.layout.flatten(head_part(chain))
    out[key(start)] += heads
    cot: Dict[Any, torch.Tensor] = {start: chain.g[-1]}
    for j in range(chain.depth - 1, -1, -1):
        nxt: Dict[Any, torch.Tensor] = {}
        for state, u in cot.items():
            down, grads = chain.through(j, u)
            out[key(state)] += chain.layout.flatten(grads)
            for skipped, v in ((False, down), (True, chain.around(j, u))):
                s = step(state, skipped)
                nxt[s] = nxt[s] + v if s in nxt else v
        cot = nxt
    for state, u in cot.items():
        out[key(state)] += chain.layout.flatten(chain.stem(u))
    return out


def by_skips(chain: Chain, cap: int) -> torch.Tensor:
    """Rows 0 … cap: the paths that skip exactly n blocks (row cap: cap or more)."""
    return path_classes(chain, 0, lambda s, skip: min(s + int(skip), cap), lambda s: s, cap + 1)


def by_runs(chain: Chain, cap: int) -> torch.Tensor:
    """Rows 0 … cap: the paths whose skipped blocks form exactly r contiguous runs (row cap: ≥ cap)."""
    def step(state: Tuple[int, bool], skip: bool) -> Tuple[int, bool]:
        runs, skipping = state
        return (min(runs + int(skip and not skipping), cap), skip)
    return path_classes(chain, (0, False), step, lambda s: s[0], cap + 1)


def gradnet_vector(chain: Chain) -> torch.Tensor:
    """The gradnet gradient from the chain: (J + S)ᵀ at every block (one path class)."""
    return path_classes(chain, 0, lambda s, skip: 0, lambda s: 0, 1)[0]


# -- a family of vectors and its Gram matrices --------------------------------------------------

@dataclass
class Family:
    """Row 0 is a; row 1 + j is c of ``spans[j]``: the vectors every direction below combines."""

    rows: torch.Tensor               # (1 + len(spans), numel), the parameters' dtype
    spans: List[Span]

    def index(self, span: Span) -> int:
        return 1 + self.spans.index(span)

    def singles(self) -> List[int]:
        """Rows of a and of the single-block c_k, in block order."""
        return [0] + [self.index((k, 1)) for k in range(self.depth)]

    @property
    def depth(self) -> int:
        return max(k + m for k, m in self.spans)


def family(chain: Chain, max_len: Optional[int] = None) -> Family:
    """a and c_{k,m} for every span of length ≤ max_len (``max_len=1``: the single blocks only)."""
    all_spans = spans(chain.depth, max_len)
    rows = torch.stack([chain.a] + [skip_vector(chain, k, m) for k, m in all_spans])
    return Family(rows, all_spans)


@dataclass
class Grams:
    """Per group (stem, each block, head), in float64: K_g = V_g V_gᵀ, b_g = V_g r_g and ‖r_g‖² for
    the rows V of a family and a reference r. Whole-net and per-stage quantities are sums over
    groups, so a direction given as coefficients t over the rows has every cosine without
    forming the vector."""

    K: torch.Tensor          # (G, n, n)
    b: torch.Tensor          # (G, n)
    rr: torch.Tensor         # (G,)
    stages: List[str]        # stage of each group

    @staticmethod
    def of(rows: torch.Tensor, ref: torch.Tensor, layout: Layout) -> "Grams":
        K, b, rr = [], [], []
        for g in layout.groups:
            V, r = rows[:, g.start:g.stop].double(), ref[g.start:g.stop].double()
            K.append(V @ V.T)
            b.append(V @ r)
            rr.append(r @ r)
        return Grams(torch.stack(K), torch.stack(b), torch.stack(rr), [g.stage for g in layout.groups])

    def sub(self, rows: Sequence[int]) -> "Grams":
        """The Gram matrices of a subset of the rows."""
        idx = torch.as_tensor(list(rows))
        return Grams(self.K[:, idx][:, :, idx], self.b[:, idx], self.rr, self.stages)

    def pick(self, stage: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, b, ‖r‖²) summed over the whole net (None) or one stage."""
        mask = torch.tensor([stage is None or s == stage for s in self.stages])
        return self.K[mask].sum(0), self.b[mask].sum(0), self.rr[mask].sum()

    def cosines(self, t: torch.Tensor) -> Dict[str, float]:
        """cos(Σ t_i v_i, r) for the whole net (key ``"whole"``) and each stage."""
        out = {}
        for stage in [None] + list(dict.fromkeys(self.stages)):
            K, b, rr = self.pick(stage)
            out["whole" if stage is None else stage] = _cos(float(t @ b), float(t @ K @ t), float(rr))
        return out


def _cos(dot: float, sq1: float, sq2: float) -> float:
    return dot / (sq1 * sq2) ** 0.5 if sq1 > 0 and sq2 > 0 else float("nan")


def _pinv_solve(A: torch.Tensor, b: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """Least-squares solution of A t = b (float64), singular values below rcond·σ_max dropped: the
    family's vectors are strongly correlated (neighbouring blocks' c), so K is ill-conditioned."""
    return torch.linalg.pinv(A, rtol=rcond) @ b


# -- directions ---------------------------------------------------------------------------------

def eq19(grams: Grams, ridge: float = 0.0) -> torch.Tensor:
    """Eq. 19 on rows [a, c]: a + ‖a‖²/(2‖c‖² + ridge)·c, as coefficients. ``ridge`` is ρ/(2κ), the
    term ``dcacounter`` adds next to 2‖c‖² (ρ a Hessian eigenvalue, κ the rank-one curvature
    factor; the paper prints ρ/4 because its a, c are ours times √(κ/2), docs/decompositions.md);
    at ridge = 0 it is ``dcacounter``'s step at ρ = 0."""
    K, _, _ = grams.pick(None)
    beta = float(K[0, 0]) / (2 * float(K[1, 1]) + ridge)
    return torch.tensor([1.0, beta], dtype=torch.float64)


def combine(coef: torch.Tensor, n: int, rows: Sequence[int]) -> torch.Tensor:
    """Coefficients over a sub-family's rows written as coefficients over all n rows."""
    out = torch.zeros(n, dtype=torch.float64)
    out[torch.as_tensor(list(rows))] = coef
    return out


def model_newton(grams: Grams, U: torch.Tensor, weights: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Newton step of a counter-loss decomposition under the paper's rank-one curvature model.

    ½∂²G ≈ Σ_j weights_j u_j u_jᵀ + ridge·I with u_j = U[:, j] (coefficients over the rows): eq. 16
    for G2 = L + ½L'_{−1} is U = [a, 2c − a], weights (1, ½), and with a ⊥ c this gives eq. 19. The
    step solves ½∂²G·Δ = a for Δ = U t, i.e. (diag(weights)·UᵀKU + ridge) t = e_1 when U's first
    column is a (no orthogonality assumed); ridge = ρ/(2κ) as in :func:`eq19`. Returns coefficients
    over the rows."""
    K, _, _ = grams.pick(None)
    KU = U.T @ K @ U
    rhs = torch.zeros(U.shape[1], dtype=torch.float64)
    rhs[0] = 1.0
    t = _pinv_solve(torch.diag(weights) @ KU + ridge * torch.eye(U.shape[1], dtype=torch.float64), rhs)
    return U @ t


def counter_newton(grams: Grams, rows: Sequence[int], n: int, ridge: float = 0.0) -> torch.Tensor:
    """G = L + ½Σ_j L'_{−1,j} + ρ/2·L2 over the counter losses of ``rows[1:]`` (rows[0] = a):
    U = [a, 2c_j − a …], weights (1, ½, …) (eqs. 12, 16 with one counter loss per row)."""
    m = len(rows)
    U = torch.zeros(n, m, dtype=torch.float64)
    U[rows[0], 0] = 1.0
    for j, r in enumerate(rows[1:], start=1):
        U[r, j], U[rows[0], j] = 2.0, -1.0
    weights = torch.tensor([1.0] + [0.5] * (m - 1), dtype=torch.float64)
    return model_newton(grams, U, weights, ridge)


def quasi_newton(grams: Grams, rows: Sequence[int], n: int, ridge: float = 0.0) -> torch.Tensor:
    """Quasi-DC G = (1/J)Σ_j L'_{1/2,j} + ρ/2·L2 (eq. 23 at every counter loss), H = G − L.

    Model ½∂²G ≈ (1/J)Σ_j v_j v_jᵀ + ridge with v_j = ½(a + c_j) (eq. 25 for each j, in eq. 16's
    units; ridge = ρ/(2κ) as in :func:`eq19`).
    As the paper goes along a + c for one block, the step is Newton's restricted to span{v_j}:
    Δ = V t minimising −aᵀΔ + ½Δᵀ∂²GΔ, i.e. Vᵀ∂²GV t = Vᵀa. Returns coefficients over the rows."""
    K, _, _ = grams.pick(None)
    J = len(rows) - 1
    V = torch.zeros(n, J, dtype=torch.float64)
    for j, r in enumerate(rows[1:]):
        V[rows[0], j], V[r, j] = 0.5, 0.5
    KV = V.T @ K @ V
    curv = 2 * (KV @ KV / J + ridge * KV)       # Vᵀ∂²G V
    t = _pinv_solve(curv, V.T @ K[:, rows[0]])
    return V @ t


def _coefficient_sets(grams: Grams, per: str) -> List[List[int]]:
    """The groups that share one set of coefficients: all of them, those of one stage, or each alone."""
    n = len(grams.stages)
    if per == "whole":
        return [list(range(n))]
    if per == "stage":
        return [[g for g in range(n) if grams.stages[g] == s] for s in dict.fromkeys(grams.stages)]
    if per == "group":
        return [[g] for g in range(n)]
    raise ValueError(f"per must be 'whole', 'stage' or 'group'; got {per!r}")


def best_in_span(grams: Grams, per: str = "whole") -> Dict[str, float]:
    """The upper bound: cos of the least-squares projection of r onto the span of the rows, with one
    set of coefficients for the whole net (``per="whole"``), one per stage (``"stage"``) or one per
    group (``"group"``: stem, each block, head). Returns the whole-net and per-stage cosines of that
    projection; no direction built from these rows with such coefficients has a larger cosine."""
    acc: Dict[str, List[float]] = {}   # stage -> [t·b, tᵀKt, ‖r‖²] of the projection's parts
    for members in _coefficient_sets(grams, per):
        t = _pinv_solve(grams.K[members].sum(0), grams.b[members].sum(0))
        for g in members:
            row = acc.setdefault(grams.stages[g], [0.0, 0.0, 0.0])
            row[0] += float(t @ grams.b[g])
            row[1] += float(t @ grams.K[g] @ t)
            row[2] += float(grams.rr[g])
    total = [sum(v[i] for v in acc.values()) for i in range(3)]
    return {"whole": _cos(*total), **{s: _cos(*v) for s, v in acc.items()}}


def projection_coef(grams: Grams) -> torch.Tensor:
    """Whole-net least-squares coefficients of r on the rows (to carry to another batch)."""
    K, b, _ = grams.pick(None)
    return _pinv_solve(K, b)


# -- the exact Newton step of eq. 12 (true Hessian, conjugate gradients) ------------------------

@contextmanager
def mixed(block: nn.Module, alpha: float) -> Iterator[None]:
    """Within the block, ``block`` outputs α·out + (1 − α)·in: the counter loss L'_α of eq. 10."""
    handle = block.register_forward_hook(lambda m, i, o: alpha * o + (1 - alpha) * i[0])
    try:
        yield
    finally:
        handle.remove()


def last_same_shape(model: nn.Module) -> nn.Module:
    """The block ``dcacounter`` skips (``where="last"``)."""
    same = [b for _, b in _check_blocks(model) if b.downsample is None]
    if not same:
        raise ValueError(f"model {type(model).__name__} has no same-shape block")
    return same[-1]


def g2_operator(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, layout: Layout,
                loss_fn: LossFn = F.cross_entropy) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ ∇²(L + ½L'_{−1})·v on flat vectors (the layout's order): eq. 12's G2 without its ρ term, at the
    last same-shape block, in train mode with the running statistics restored after each product
    (two forwards and a double backward each)."""
    block = last_same_shape(model)
    params, slices = layout.params, layout.slices()

    def closure() -> torch.Tensor:
        with mixed(block, -1.0):
            counter = loss_fn(model(inputs), targets)
        return loss_fn(model(inputs), targets) + 0.5 * counter

    def matvec(v: torch.Tensor) -> torch.Tensor:
        vec = [v[slices[i]].view_as(p) for i, p in enumerate(params)]
        model.train()
        with FrozenBuffers(model):
            out = hvp(closure, params, vec)
        return layout.flatten(dict(enumerate(out)))

    return matvec


@dataclass
class NewtonCG:
    """Result of :func:`newton_cg`: the step (flat), the CG steps taken and whether CG stopped at a
    direction of non-positive curvature (the quadratic model not convex along it)."""

    step: torch.Tensor
    iters: int
    negative_curvature: bool


def newton_cg(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, rho: float,
              iters: int = 10) -> NewtonCG:
    """Eq. 14 with the true Hessian: (∇²G₀ + ρ/2)·Δ = a (``matvec``: v ↦ ∇²G₀·v, e.g. :func:`g2_operator`)
    by ``iters`` conjugate-gradient steps from 0. CG stops early at a direction p with
    pᵀ(∇²G₀ + ρ/2)p ≤ 0 (G not convex there: ρ too small), returning the iterate so far (``rhs``
    itself when that happens at the first step)."""
    x, r = torch.zeros_like(rhs), rhs.clone()
    p, rr = r.clone(), float(r @ r)
    for it in range(iters):
        Ap = matvec(p) + rho / 2 * p
        curv = float(p @ Ap)
        if curv <= 0:
            return NewtonCG(x if it else rhs.clone(), it, True)
        step = rr / curv
        x, r = x + step * p, r - step * Ap
        rr_new = float(r @ r)
        p, rr = r + (rr_new / rr) * p, rr_new
    return NewtonCG(x, iters, False)


# -- one measurement: every direction, bound and path class on one batch ------------------------

DIRECTIONS: Dict[str, Tuple[str, str]] = {
    # key: (what it is, the decomposition behind it and whether it is DC)
    "sgd": ("a = ∇L (SGD, eq. 9)", "DC (eq. 9) for λ ≥ λ_max"),
    "dcacounter": ("eq. 19 at the last same-shape block: a + βc (ρ = 0)", "DC (eq. 12) for ρ large enough"),
    "single_sum": ("(a) a + Σ_k c_k: every single-block skip, summed",
                   "no G: eq. 25's a + c with every c_k added (the first-order term of g_ref)"),
    "single_eq19": ("(a) eq. 19 with c = Σ_k c_k (ρ = 0)", "no G: eq. 19's formula with the summed c"),
    "single_newton": ("(a) Newton step of G = L + ½Σ_k L'_{−1,k} (rank-one model, ρ = 0)",
                      "DC for ρ large enough, as eq. 12"),
    "span_sum": ("(b) a + Σ_{k,m} c_{k,m}: every skipped span, summed", "no G: the spans' shortcut terms added"),
    "span_top": ("(b) a + Σ_k c_{k,B−k}: each span from block k to the top", "no G: those shortcut terms added"),
    "span_newton": ("(b) Newton step of G = L + ½Σ_{k,m} L'_{−1,k,m} (rank-one model, ρ = 0)",
                    "DC for ρ large enough, as eq. 12"),
    "quasi_sum": ("(c) Σ_k (a + c_k): eq. 25 at every block", "quasi-DC: G = Σ_k L'_{1/2,k} convex, H = G − L not"),
    "quasi_newton": ("(c) Newton step of G = mean_k L'_{1/2,k} in span{a + c_k} (ρ = 0)", "quasi-DC"),
}


@dataclass
class DeepMeasurement:
    """Cosines with g_ref (``{"whole": …, stage: …}``) of every direction (:data:`DIRECTIONS`), of the
    span bounds (``best_single_<per>``, ``best_span_<per>``) and of the path classes
    (``skips_le_<n>``, ``runs_le_1``); ``shares``: ‖class‖/‖g_ref‖; the Gram matrices and the
    whole-net projection coefficients, to carry to another batch (:func:`transfer`); g_ref (flat) and
    the layout, for directions computed outside the family (:func:`newton_cg`)."""

    cosines: Dict[str, Dict[str, float]]
    shares: Dict[str, float]
    grams: Grams
    coef: Dict[str, torch.Tensor]
    diagnostics: Dict[str, float]
    spans: List[Span]
    ref: torch.Tensor
    layout: Layout


def indicator(n: int, rows: Sequence[int]) -> torch.Tensor:
    """Coefficient 1 on ``rows``, 0 elsewhere: the plain sum of those vectors."""
    return combine(torch.ones(len(rows), dtype=torch.float64), n, rows)


def _directions(grams: Grams, fam: Family, last: int, ridge: float) -> Dict[str, torch.Tensor]:
    """Coefficients over the family's rows of every entry of :data:`DIRECTIONS` (``last``: the block
    ``dcacounter`` skips; ``ridge`` = ρ/(2κ), see :func:`eq19`)."""
    n, singles = fam.rows.shape[0], fam.singles()
    a = indicator(n, [0])
    c_sum = indicator(n, singles[1:])
    K, _, _ = grams.pick(None)
    beta = float(K[0, 0]) / (2 * float(c_sum @ K @ c_sum) + ridge)    # eq. 19 with c = Σ_k c_k
    one_block = [0, fam.index((last, 1))]
    return {
        "sgd": a,
        "dcacounter": combine(eq19(grams.sub(one_block), ridge), n, one_block),
        "single_sum": a + c_sum,
        "single_eq19": a + beta * c_sum,
        "single_newton": counter_newton(grams, singles, n, ridge),
        "span_sum": indicator(n, range(n)),
        "span_top": indicator(n, [0] + [fam.index((k, fam.depth - k)) for k in range(fam.depth)]),
        "span_newton": counter_newton(grams, list(range(n)), n, ridge),
        "quasi_sum": fam.depth * a + c_sum,
        "quasi_newton": quasi_newton(grams, singles, n, ridge),
    }


RHO_DEPENDENT = ("dcacounter", "single_eq19", "single_newton", "span_newton", "quasi_newton")


def _all_directions(grams: Grams, fam: Family, last: int, rhos: Sequence[float]) -> Dict[str, torch.Tensor]:
    """:func:`_directions` at ridge ρ/(2κ) = r·‖a‖² for each r in ``rhos`` (relative to the gradient's
    scale, so one setting means the same at every depth); keys of r ≠ 0 get the suffix ``@rho=<r>``."""
    K, _, _ = grams.pick(None)
    out: Dict[str, torch.Tensor] = {}
    for r in rhos:
        for key, t in _directions(grams, fam, last, r * float(K[0, 0])).items():
            if r == 0:
                out[key] = t
            elif key in RHO_DEPENDENT:
                out[f"{key}@rho={r:g}"] = t
    return out


def _class_cosines(classes: torch.Tensor, ref: torch.Tensor, layout: Layout,
                   prefix: str) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float]]:
    """Cosines of the cumulative path classes (rows 0 … n: ``<prefix>_le_<i>``) and each class's
    share ‖class_i‖/‖g_ref‖ (``<prefix>_<i>``)."""
    grams = Grams.of(classes, ref, layout)
    K, _, rr = grams.pick(None)
    n = classes.shape[0]
    cos = {f"{prefix}_le_{i}": grams.cosines(indicator(n, range(i + 1))) for i in range(n - 1)}
    shares = {f"{prefix}_{i}": (float(K[i, i]) / float(rr)) ** 0.5 for i in range(n)}
    return cos, shares


def measure(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, max_len: Optional[int] = None,
            rhos: Sequence[float] = (0.0,), skips_cap: int = 4, loss_fn: LossFn = F.cross_entropy) -> DeepMeasurement:
    """Every direction of :data:`DIRECTIONS`, the span bounds and the path classes on one batch, at the
    model's current weights (train mode, running statistics untouched); ``rhos``: ridges ρ/(2κ) in
    units of ‖a‖² (see :func:`_all_directions`). Cost: one forward, about
    B³/6 single-block products for the spans (B = blocks; ``max_len=1`` keeps the single blocks:
    about B²/2), and (``skips_cap`` + 4) backward passes for the path classes."""
    chain = record(model, inputs, targets, loss_fn)
    ref = gradnet_vector(chain)
    fam = family(chain, max_len)
    grams = Grams.of(fam.rows, ref, chain.layout)
    last = chain.blocks.index(last_same_shape(model))
    cosines = {k: grams.cosines(t) for k, t in _all_directions(grams, fam, last, rhos).items()}
    singles = grams.sub(fam.singles())
    for per in ("whole", "stage", "group"):
        cosines[f"best_single_{per}"] = best_in_span(singles, per)
        cosines[f"best_span_{per}"] = best_in_span(grams, per)
    skips, skip_shares = _class_cosines(by_skips(chain, skips_cap), ref, chain.layout, "skips")
    runs, run_shares = _class_cosines(by_runs(chain, 2), ref, chain.layout, "runs")
    K, _, rr = grams.pick(None)
    diagnostics = {"loss": float(chain.loss.detach()), "ref_norm": float(rr) ** 0.5, "a_norm": float(K[0, 0]) ** 0.5,
                   "blocks": chain.depth, "vectors": fam.rows.shape[0],
                   **{f"ref_share_{s}": (float(grams.pick(s)[2]) / float(rr)) ** 0.5 for s in chain.layout.stages()}}
    return DeepMeasurement({**cosines, **skips, **runs}, {**skip_shares, **run_shares}, grams,
                           {"single": projection_coef(singles), "span": projection_coef(grams)},
                           diagnostics, fam.spans, ref, chain.layout)


def transfer(coef: torch.Tensor, grams: Grams) -> Dict[str, float]:
    """Cosines on another batch of the direction with coefficients fitted on one batch: whether a
    fixed combination of the family's vectors (one that does not look at g_ref) keeps its cosine."""
    return grams.cosines(coef)
