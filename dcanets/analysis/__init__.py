"""Measurements of a loss landscape: curvature (Hessian-vector products, Lanczos) and the
Lyapunov step-size bounds of products of linear layers (paper 003, §2)."""
