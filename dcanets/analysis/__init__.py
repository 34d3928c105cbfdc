"""Measurements above the optimizers: how close a step is to the shortcut network's gradient
(``fidelity``; the deep-network paths and directions: ``paths``, ``deep_fidelity``), step-size and
ρ advice from a measured curvature (``curvature``; the Hessian tools themselves are
``dcanets.hessian``) and the Lyapunov step-size bounds of products of linear layers (paper 003, §2:
``stability``). Nothing below this layer imports it."""

__all__ = ["curvature", "deep_fidelity", "fidelity", "paths", "stability"]
