"""The path algebra of a plain network's chain of blocks: the shortcut network's gradient as a sum
over paths, and the vectors of the counter losses that skip a span of blocks.

Paper 000 derives "DCA + vanilla = SGD + shortcut" for *one* block: the counter loss of eq. 10
skips the last block and eq. 19's step a + βc adds that block's shortcut gradient c (eq. 17).
A deep shortcut network's gradient (the ``gradnet`` twin: plain forward, shortcut backward) is a
sum over every path through the blocks, each block either traversed (its Jacobian J_l) or skipped
(its shortcut S_l: the identity, or the zero-padding map at a stage transition)::

    r_l = (J_l + S_l)ᵀ r_{l+1},   g_ref on the parameters w_l of block l = P_lᵀ r_{l+1}

(P_l = ∂h^{l+1}/∂w_l, r_B = ∂L/∂h^B). Expanded, g_ref = Σ over subsets of skipped blocks.
:func:`record` keeps the plain forward block by block (:class:`Chain`), so a cotangent can be
pushed through or around one block at a time. Vectors (all at the plain network's forward, as
eq. 17's c is):

* ``a`` = ∇L, the plain gradient (no block skipped);
* ``c_{k,m}`` = (∂h^k/∂w)ᵀ S_kᵀ⋯S_{k+m−1}ᵀ ∂L/∂h^{k+m} (:func:`skip_vector`): the part of the
  gradient flowing through a shortcut around the span of blocks k … k+m−1 and through every other
  block. It is eq. 17's c of the counter loss L(α h^{k+m} + (1 − α) S(h^k)) that skips that span;
  m = 1 are the single blocks (``c_k``), and c_{B−1,1} is ``dcacounter``'s c. At the two stage
  transitions S is the zero-padding shortcut the gradnet uses (eq. 10 as written needs h^{k+1}
  and h^k of one shape).

Their sums are path classes: a + Σ_k c_k is every path with at most one skipped block (the
first-order term of g_ref in the shortcut strength), a + Σ_{k,m} c_{k,m} every path whose skipped
blocks form at most one contiguous run. :func:`path_classes` splits g_ref exactly by the number of
skipped blocks or of skipped runs (a backward pass that tracks it), which says how much of g_ref
any such family can hold. ``dcanets.analysis.deep_fidelity`` combines these vectors into directions.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcanets.engine.fidelity import stage_names
from dcanets.layers.shortcut import ShortcutBlock, is_plain, shortcut_blocks
from dcanets.optim.rho import LossFn

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


def _layout(model: nn.Module, blocks: Sequence[Tuple[str, ShortcutBlock]]) -> Layout:
    """Stem = parameters registered before the first block, head = those after the last one."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stage_of = stage_names(model)
    index = {id(p): i for i, (_, p) in enumerate(named)}
    block_sets = [[index[id(p)] for p in cast(nn.Module, b).parameters() if id(p) in index] for _, b in blocks]
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
    blocks: List[ShortcutBlock]
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
        shortcut = self.blocks[j].downsample
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


def plain_blocks(model: nn.Module) -> List[Tuple[str, ShortcutBlock]]:
    """The model's shortcut-family blocks; refused unless they are plain with parameter-free shortcuts."""
    blocks = shortcut_blocks(model)
    if not blocks:
        raise ValueError(f"model {type(model).__name__} has no blocks of the shortcut family; use a "
                         "cifar_plainnet* or plainnet* model")
    for name, b in blocks:
        if not is_plain(b):
            raise ValueError(f"block {name} is not plain (shortcut_alpha={b.shortcut_alpha}, grad_only="
                             f"{b.shortcut_grad_only}): the path algebra needs the plain network's Jacobians")
        if b.downsample is not None and any(True for _ in b.downsample.parameters()):
            raise ValueError(f"block {name} has a projection shortcut with parameters; only identity and "
                             "parameter-free (zero-padding) shortcuts are supported")
    return blocks


def last_same_shape(model: nn.Module) -> ShortcutBlock:
    """The block ``dcacounter`` skips (``where="last"``)."""
    same = [b for _, b in plain_blocks(model) if b.downsample is None]
    if not same:
        raise ValueError(f"model {type(model).__name__} has no same-shape block")
    return same[-1]


@contextmanager
def _scratch_buffers(model: nn.Module) -> Iterator[None]:
    """Within the block the model's buffers are clones: BatchNorm updates those, and the originals
    come back untouched on exit. (Copying the old values back in place, as ``FrozenBuffers`` does,
    would change tensors the kept graph saved for its backward.)"""
    saved = [(m, name, buf) for m in model.modules() for name, buf in m.named_buffers(recurse=False)]
    for m, name, buf in saved:
        setattr(m, name, buf.clone())      # nn.Module.__setattr__ replaces a registered buffer
    try:
        yield
    finally:
        for m, name, buf in saved:
            setattr(m, name, buf)


def record(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
           loss_fn: LossFn = F.cross_entropy) -> Chain:
    """One plain forward in train mode (BatchNorm statistics of the batch, running statistics left
    as they were) with every block's input and output kept, and the plain backward quantities
    (``g``, ``a``). Refused when the blocks do not form one chain (block l+1 reads block l's output)."""
    blocks = plain_blocks(model)
    seen: List[Tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [cast(nn.Module, b).register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for _, b in blocks]
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


__all__ = ["Span", "Group", "Layout", "Chain", "record", "plain_blocks", "last_same_shape", "head_part",
           "skip_vector", "spans", "path_classes", "by_skips", "by_runs", "gradnet_vector"]
