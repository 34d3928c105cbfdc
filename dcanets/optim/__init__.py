"""DC decompositions of a network's training loss, as torch optimizers for timm's registry.

One module per family: ``dcal2`` (eq. 9), ``dcaprox`` (the proximal point), ``dcacounter``
(eqs. 12, 19; with ``CounterDCA``, the counter-loss machinery) and ``dcaquasi`` (eqs. 23–26); their
shared pieces in ``_base`` and ``closure``; ``counter`` the counter loss of paper 000 (a skipped
block's output) and its hooks; ``rho`` ρ in the paper's units; ``protocol`` the calls a training
loop makes. Registered into timm by the built-in ``decompositions`` plugin. The numpy DCA on
classic DC programs is ``dcanets.dca``; the Hessian tools the steps measure with, ``dcanets.hessian``.
"""
from typing import Dict

from dcanets.optim._base import DCAOptimizer
from dcanets.optim.closure import ClosureDCA, ClosureOptions
from dcanets.optim.dcacounter import CounterDCA, CounterOptions, DcaCounter, DcaCounterOptions
from dcanets.optim.dcal2 import DcaL2, L2Options
from dcanets.optim.dcaprox import DcaProx, ProxOptions
from dcanets.optim.dcaquasi import DcaQuasiHalf, DcaQuasiNegHalf, NegHalfOptions, QuasiDCA, QuasiOptions
from dcanets.optim.protocol import hooks_model, measured_curvature, prepare, remember_batch, take_step

DECOMPOSITIONS: Dict[str, type] = {
    "dcal2": DcaL2,
    "dcaprox": DcaProx,
    "dcacounter": DcaCounter,
    "dcaquasihalf": DcaQuasiHalf,
    "dcaquasineghalf": DcaQuasiNegHalf,
}


def decomposition(name: str) -> type:
    """The optimizer class of a decomposition, or a ValueError listing the known names."""
    try:
        return DECOMPOSITIONS[name]
    except KeyError:
        raise ValueError(f"unknown decomposition {name!r}; known: "
                         f"{', '.join(sorted(DECOMPOSITIONS))}") from None


__all__ = ["DECOMPOSITIONS", "decomposition", "DCAOptimizer", "ClosureDCA", "CounterDCA", "QuasiDCA",
           "DcaL2", "DcaProx", "DcaCounter", "DcaQuasiHalf", "DcaQuasiNegHalf",
           "ClosureOptions", "L2Options", "ProxOptions", "CounterOptions", "DcaCounterOptions", "QuasiOptions",
           "NegHalfOptions", "prepare", "remember_batch", "measured_curvature", "hooks_model", "take_step"]
