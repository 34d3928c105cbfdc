"""Paper 003, Fig. 3: gradient descent on single vs double deep linear networks (L = 20, n = 20).

Random diagonalizable R = M diag(lambda) M^-1 (M ~ N(0, I), lambda ~ U[-1.5, 1.5]); both
networks start at the identity and run full-batch GD on 1/2 ||F - R||_F^2 (Sigma = I) with the
same step. Over all matrices: how often the double network ends with the lower error, and how
often GD on either network diverges, at each step size.
"""
from __future__ import annotations

import torch

from common import figure_path, parse_args, progress, write_result
from dcanets.papers.p003_linear_double import LinearDouble, LinearProduct, fit_gd, random_diagonalizable

N, L = 20, 20


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(1)
    count, iters, steps = (4, 150, [3e-4]) if args.quick else (24, 1500, [1e-4, 3e-4, 1e-3])
    g = torch.Generator().manual_seed(args.seed)
    R = torch.stack([random_diagonalizable(N, generator=g) for _ in range(count)])
    rows, curves = [], {}
    for step in steps:
        progress(f"step {step}: {count} matrices x {iters} iterations")
        single = fit_gd(LinearProduct(N, L, (count,)), R, step, iters)
        double = fit_gd(LinearDouble(N, L, (count,)), R, step, iters)
        es, ed = single["errors"][-1], double["errors"][-1]
        es_pad = torch.where(single["diverged"], torch.inf, es)
        ed_pad = torch.where(double["diverged"], torch.inf, ed)
        faster = (ed_pad < es_pad).sum().item()
        row = {"step": step, "matrices": count, "iterations": iters,
               "double_lower_final_error": faster,
               "single_unstable": int(single["diverged"].sum()), "double_unstable": int(double["diverged"].sum()),
               "single_final_error_median": float(es.nanmedian()), "double_final_error_median": float(ed.nanmedian())}
        rows.append(row)
        print(row)
        curves[step] = (single["errors"][:, 0], double["errors"][:, 0])
    plot(curves, figure_path("paper003_fig3", args.quick))
    budget = {"n": N, "L": L, "matrices": count, "iterations": iters, "eigenvalues": "U[-1.5, 1.5]",
              "init": "identity", "loss": "1/2 ||F - R||_F^2", "error": "||F - R||_F^2 / ||R||_F^2"}
    write_result("paper003_fig3", args.quick, {"budget": budget, "rows": rows}, args.out)


def plot(curves: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (step, (s, d)) in enumerate(curves.items()):
        ax.semilogy(s.numpy(), color=f"C{i}", ls="--", label=f"single, step {step:g}")
        ax.semilogy(d.numpy(), color=f"C{i}", label=f"double, step {step:g}")
    ax.set_xlabel("iteration"), ax.set_ylabel("relative training error"), ax.set_title("first matrix")
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)


if __name__ == "__main__":
    main()
