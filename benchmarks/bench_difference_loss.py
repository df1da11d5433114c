"""difference_loss: the Gram form against the released code's naive D x D form at growing
D = N * C, until the naive one would not fit in memory; then the Gram form at LLaVA size
(B=16, N=576, C=4096).

    python benchmarks/bench_difference_loss.py [--device cuda] [--naive-budget-gb 4]
"""

import torch

from common import best_time, dtype_for, emit, parser

import pilot


def naive(a, b):
    xa, xb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    xa = xa / (xa.norm(dim=1, keepdim=True).detach() + 1e-6)
    xb = xb / (xb.norm(dim=1, keepdim=True).detach() + 1e-6)
    return (xa.t() @ xb).pow(2).mean()


def main():
    ap = parser(__doc__)
    ap.add_argument("--naive-budget-gb", type=float, default=4.0, help="largest D x D matrix to try")
    args = ap.parse_args()
    dev = args.device
    B = 4 if args.smoke else 16
    rows = []
    for D in ([256, 1024] if args.smoke else [1024, 4096, 16384, 32768, 65536, 2_359_296]):
        a = torch.randn(B, D, device=dev)
        b = torch.randn(B, D, device=dev)
        row = {"D": D, "gram_s": round(best_time(lambda: pilot.difference_loss(a, b), dev, repeats=3), 5)}
        need = D * D * 4 / 2 ** 30
        if need <= args.naive_budget_gb:
            row["naive_s"] = round(best_time(lambda: naive(a, b), dev, repeats=1, warmup=0), 5)
            row["rel_diff"] = abs(naive(a, b).item() - pilot.difference_loss(a, b).item()) / naive(a, b).item()
        else:
            row["naive"] = f"not run: the D x D matrix needs {need:,.0f} GiB"
        rows.append(row)
    N, C = (16, 64) if args.smoke else (576, 4096)
    a = torch.randn(B, N, C, device=dev, dtype=dtype_for(dev))
    b = torch.randn(B, N, C, device=dev, dtype=dtype_for(dev))
    llava = {"B": B, "N": N, "C": C, "gram_s": round(best_time(lambda: pilot.difference_loss(a, b), dev, repeats=3), 4)}
    emit("difference_loss", device=dev, rows=rows, llava_size=llava)


if __name__ == "__main__":
    main()
