"""DC decompositions of a network's training loss, as torch optimizers for timm's registry.

``decompositions`` holds the optimizers and ``prepare``; ``counter`` the counter loss of
paper 000 (a skipped block's output). The numpy DCA on classic DC programs is ``dcanets.dca``.
"""
from dcanets.optim.decompositions import DCAOptimizer, decomposition, prepare

__all__ = ["DCAOptimizer", "decomposition", "prepare"]
