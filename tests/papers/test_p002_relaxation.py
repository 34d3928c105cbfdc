"""Paper 002, eq. 8: the relaxed ReLU loss is convex, bounds the original and shares its minimizer."""
import pytest
import torch

from dcanets.papers import p002_relaxation as rx


def _data(noise=0.0):
    return rx.planted_data(60, 5, torch.Generator().manual_seed(0), noise)


def test_analytic_gradients_match_autograd():
    x, y, _ = _data()
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    for kind, fn in (("vanilla", rx.original_loss), ("relaxed", rx.relaxed_loss)):
        (auto,) = torch.autograd.grad(fn(w, x, y).sum(), w)
        assert torch.allclose(auto, rx.gradient(kind, w.detach(), x, y), atol=1e-10)


def test_relaxed_loss_is_a_convex_upper_bound():
    x, y, _ = _data(noise=0.3)
    w1, w2 = torch.randn(2, 50, 5, dtype=torch.float64)
    assert (rx.relaxed_loss(w1, x, y) >= rx.original_loss(w1, x, y) - 1e-9).all()
    mid = rx.relaxed_loss((w1 + w2) / 2, x, y)
    assert (mid <= (rx.relaxed_loss(w1, x, y) + rx.relaxed_loss(w2, x, y)) / 2 + 1e-9).all()
    # the original is not convex: along t W0 it has a concave kink at t = 0
    _, _, w0 = _data(noise=0.3)
    ends = rx.original_loss(torch.stack([-0.5 * w0, 0.5 * w0]), x, y)
    assert rx.original_loss(0 * w0[None], x, y).item() > ends.mean().item()


def test_relaxed_minimizer_solves_the_original():
    x, y, w0 = _data()
    assert rx.relaxed_loss(w0[None], x, y).item() == pytest.approx(0.0, abs=1e-10)
    run = rx.run_gd("relaxed", x, y, w0, runs=5, steps=400, generator=torch.Generator().manual_seed(1))
    assert (run.w - w0).norm(dim=-1).max() < 1e-6          # the relaxed GD finds W0 ...
    assert run.original[-1] < 1e-10                         # ... which is the original's minimizer
    assert rx.gradient("vanilla", run.w, x, y).abs().max() < 1e-6


def test_unknown_loss_and_init_are_rejected():
    x, y, w0 = _data()
    with pytest.raises(ValueError, match="unknown loss"):
        rx.gradient("hinge", w0[None], x, y)
    with pytest.raises(ValueError, match="unknown init"):
        rx.run_gd("relaxed", x, y, w0, 1, 1, torch.Generator(), init="zeros")
