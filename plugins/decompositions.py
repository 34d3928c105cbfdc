"""Built-in plugin: the network-loss DC decompositions of paper 000 as timm optimizers.

After ``import dcanets``, ``timm.optim.create_optimizer_v2(model, "dcacounter", lr=0.1, rho=0.0)``
builds one (and ``lookahead_dcacounter`` wraps it); on a model dcanets built it hooks the model at
once, so any loop steps it (timm's train.py included). For another model call
``dcanets.optim.prepare(optimizer, model)`` once: it hooks the model and returns True for the
configurations that must be stepped with a closure (``dcaprox``; ``c="skip"``, ``solver="inner"``,
``direction="newton"`` without ``kappa``), which ``optimizer.needs_closure`` also says.
"""
from __future__ import annotations

from typing import List

from timm.optim import OptimInfo

from dcanets.hookspecs import hookimpl
from dcanets.optim import DECOMPOSITIONS

_DESCRIPTIONS = {
    "dcal2": "DCA with G1 = lam*L2 (paper 000, eq. 9): SGD with lr = 1/lam",
    "dcaprox": "proximal DCA, G = L + rho*L2, K inner gradient steps (needs a closure)",
    "dcacounter": "DCA with the counter loss L'_-1 (paper 000, eqs. 12, 19): d = a + beta*c, "
                  "c the shortcut part of the gradient (eq. 17); plain loop (a closure only with "
                  "c='skip' or solver='inner')",
    "dcaquasihalf": "quasi-DCA with L'_1/2 (paper 000, eqs. 23-25): d = a + c, the one-block "
                    "shortcut gradient; plain loop (a closure only with c='skip', solver='inner', "
                    "or direction='newton' without kappa)",
    "dcaquasineghalf": "quasi-DCA with L'_-1/2 (paper 000, eq. 26; NegNet): a projected onto "
                       "g = -a/2 + 3c/2; plain loop (a closure only with c='skip', solver='inner', "
                       "or direction='newton' without kappa)",
}


@hookimpl
def dcanets_register_decompositions() -> List[OptimInfo]:
    return [
        OptimInfo(name=name, opt_class=cls, description=_DESCRIPTIONS[name],
                  has_eps=False, has_momentum=True)
        for name, cls in DECOMPOSITIONS.items()
    ]
