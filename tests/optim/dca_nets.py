"""The test networks and autograd references the decomposition tests share (tests/optim/test_dca*.py)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    """stem → stage of two same-shape blocks → head: h^{L−1}, h^L are stage[1]'s input/output."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.stage = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x, skip=(), mix=None, grad_shortcut=False):
        h = torch.tanh(self.stem(x))
        for i, blk in enumerate(self.stage):
            out = blk(h)
            if grad_shortcut and i == len(self.stage) - 1:
                out = out + (h - h.detach())      # plain forward, ResNet gradient ("TestNet")
            if i in skip:
                out = h
            elif mix is not None and i == len(self.stage) - 1:
                out = mix * out + (1 - mix) * h
            h = out
        return self.head(h)


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def closure_of(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def sqnorm(vs):
    return sum(float((v.double() ** 2).sum()) for v in vs if v is not None)


def dot(us, vs):
    return sum(float((u.double() * v.double()).sum()) for u, v in zip(us, vs))


def flat_grad(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


def shortcut_c(model, x, y):
    """c = ∂L/∂h^L · ∂h^{L−1}/∂w, by hand: the identity-shortcut part of the ResNet gradient."""
    h0 = torch.tanh(model.stem(x))
    h1 = model.stage[0](h0)
    h2 = model.stage[1](h1)
    loss = F.cross_entropy(model.head(h2), y)
    (g2,) = torch.autograd.grad(loss, [h2], retain_graph=True)
    return flat_grad((g2 * h1).sum(), model)


def eq17_c(model, x, y):
    """c = (∂h^{L−1}/∂w)ᵀ ∂L/∂h^L through torch.autograd.functional.vjp (paper 000, eq. 17)."""
    params = dict(model.named_parameters())
    h2 = model.stage[1](model.stage[0](torch.tanh(model.stem(x))))
    (v,) = torch.autograd.grad(F.cross_entropy(model.head(h2), y), [h2])

    def h1_of(*ws):
        p = dict(zip(params, ws))
        h0 = torch.tanh(F.linear(x, p["stem.weight"], p["stem.bias"]))
        return torch.tanh(F.linear(h0, p["stage.0.lin.weight"], p["stage.0.lin.bias"]))

    _, vjp = torch.autograd.functional.vjp(h1_of, tuple(params.values()), v)
    return list(vjp)


def counter_loss_hessian(model, x, y, alpha):
    """Dense ∂²L'_α over all parameters (flattened in registration order)."""
    names, params = zip(*model.named_parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().flatten() for p in params])

    def loss(flat):
        ws, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            ws[n] = flat[i:i + k].view(s)
            i += k
        out = torch.func.functional_call(model, ws, (x,), {"mix": alpha})
        return F.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss, flat0)


def flat_cat(vs):
    return torch.cat([v.flatten() for v in vs])


def flat_call(model, x, alpha):
    """w ↦ logits of the net with the last block mixed by α (eq. 10), on flat weights."""
    names, params = zip(*model.named_parameters())
    sizes = [p.numel() for p in params]

    def logits(flat):
        ws = {n: c.view(p.shape) for n, p, c in zip(names, params, torch.split(flat, sizes))}
        return torch.func.functional_call(model, ws, (x,), {"mix": alpha})

    return logits, torch.cat([p.detach().flatten() for p in params])


def gauss_newton(model, x, y, alpha, u):
    """uᵀJᵀ∂²_zL J u with J = ∂z/∂w (autograd's JVP) and ∂²_zL the dense Hessian of the loss in z."""
    logits, w0 = flat_call(model, x, alpha)
    z, ju = torch.func.jvp(logits, (w0,), (u,))
    hz = torch.autograd.functional.hessian(lambda t: F.cross_entropy(t, y), z.detach())
    return float(ju.flatten() @ hz.reshape(z.numel(), z.numel()) @ ju.flatten())
