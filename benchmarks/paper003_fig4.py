"""Paper 003, Fig. 4: a 1-D piecewise-affine target fitted by f1 - f2 + d, scalar convex ResNets.

f' = 1 on (0,.3) u (.5,.7), -2 on (.3,.5), -1 on (.7,1), f(0) = 0 (Lipschitz constant 2);
101 equally spaced training points on [0, 1]. Each estimator is a pair of 10-layer scalar
convex residual nets (eq. 10a-10c: V = I) trained by Nesterov's method; the two estimators differ
only in the initial biases, U[0, 0.5] versus U[0, 1]. Reported per seed: training MSE, the
largest error on each affine piece, and the Lipschitz constant of the fit.
"""
from __future__ import annotations

import torch

from common import figure_path, parse_args, progress, write_result
from dcanets.papers.p003_convex import ConvexResNets, lipschitz_1d

PIECES = [(0.0, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 1.0)]
RANGES = [(0.0, 0.5), (0.0, 1.0)]
LR, W_INIT = 0.2, 2.0


def target(x: torch.Tensor) -> torch.Tensor:
    # paper 003, section 4: f' = 1, -2, 1, -1 on the four pieces
    return torch.where(x < .3, x, torch.where(x < .5, .3 - 2 * (x - .3),
                                               torch.where(x < .7, -.1 + (x - .5), .1 - (x - .7))))


def fit(bias_range: tuple, iters: int, seed: int):
    torch.manual_seed(seed)
    nets = ConvexResNets(1, num_nets=2, layers=10, v_identity=True, bias_range=bias_range,
                         w_init=W_INIT, c_init=1.0)

    def f(z: torch.Tensor) -> torch.Tensor:  # f1 - f2 (+ d = d1 - d2)
        out = nets(z.float())
        return out[:, 0] - out[:, 1]

    x = torch.linspace(0, 1, 101).unsqueeze(1)
    y = target(x).squeeze(1)
    opt = torch.optim.SGD(nets.parameters(), lr=LR, momentum=0.9, nesterov=True)
    for _ in range(iters):
        opt.zero_grad()
        loss = 0.5 * ((f(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (f(x) - y).abs()
        piece_err = [float(err[((x[:, 0] >= a) & (x[:, 0] <= b))].max()) for a, b in PIECES]
        mse = float((err ** 2).mean())
    return f, {"bias_range": list(bias_range), "seed": seed, "mse": mse, "max_error_per_piece": piece_err,
               "lipschitz": lipschitz_1d(f)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    iters, seeds = (200, [args.seed]) if args.quick else (3000, [args.seed + i for i in range(3)])
    rows, fits = [], {}
    for seed in seeds:
        for br in RANGES:
            progress(f"seed {seed}, biases U{list(br)}: {iters} Nesterov iterations")
            f, row = fit(br, iters, seed)
            rows.append(row)
            print(row)
            fits[(seed, br)] = f
    plot(fits, figure_path("paper003_fig4", args.quick))
    budget = {"layers": 10, "points": 101, "iterations": iters, "optimizer": f"SGD nesterov momentum 0.9 lr {LR}",
              "w_init": W_INIT, "seeds": seeds, "target_lipschitz": 2.0}
    write_result("paper003_fig4", args.quick, {"budget": budget, "rows": rows}, args.out)


def plot(fits: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.linspace(0, 1, 401).unsqueeze(1)
    seeds = sorted({seed for seed, _ in fits})
    fig, axes = plt.subplots(1, len(seeds), figsize=(4 * len(seeds), 3.2), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        ax.plot(x[:, 0], target(x)[:, 0], "k", lw=2, label="target f")
        with torch.no_grad():
            for br in RANGES:
                ax.plot(x[:, 0], fits[(seed, br)](x), label=f"fit, biases U{list(br)}")
        ax.set_xlabel("x"), ax.set_title(f"seed {seed}", fontsize=9), ax.legend(fontsize=6)
    fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


if __name__ == "__main__":
    main()
