"""ATA aggregation (pilot.pairwise_distances + pilot.ata + pilot.weighted_averages): time and peak extra memory for
K clients with P LoRA parameters each. Each (K, P) runs in a fresh process so its peak RSS is
its own (on CUDA: peak GPU memory, timed after an untimed warm-up call). Expect time ~ K^2 P
and extra memory ~ K P (the K personalised outputs themselves) plus one key's stacked copy,
never a second stacked copy of everything.

    python benchmarks/bench_ata.py [--device cuda]
"""

import json
import subprocess
import sys
import time

import torch

from common import emit, parser, peak_rss_mb, rss_mb

import pilot


def one(K: int, P: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = [(P // 8,)] * 8                     # 8 tensors per client, like 8 LoRA factors
    states = [{f"t{i}": torch.randn(s, generator=g).to(device) for i, s in enumerate(shapes)} for _ in range(K)]
    n = [10 + k for k in range(K)]
    cuda = device.startswith("cuda")
    if cuda:   # the first CUDA calls load kernels and cuBLAS: once, on a small copy, untimed
        small = [{k: v[:8] for k, v in st.items()} for st in states]
        pilot.weighted_averages(small, pilot.ata(pilot.pairwise_distances(small), n, top_m=min(2, K - 1)))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2 ** 20 if cuda else rss_mb()
    t = time.perf_counter()
    W = pilot.ata(pilot.pairwise_distances(states), n, top_m=min(2, K - 1))
    out = pilot.weighted_averages(states, W)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    state_mb = K * P * 4 / 2 ** 20
    extra = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb()) - before   # GPU memory on cuda
    del out
    return {"K": K, "P": P, "seconds": round(seconds, 4), "ns_per_K2P": round(seconds / (K * K * P) * 1e9, 4),
            "states_mb": round(state_mb, 1), "extra_peak_mb": round(extra, 1),
            "extra_over_KP": round(extra / state_mb, 2)}


def main():
    ap = parser(__doc__)
    ap.add_argument("--one", nargs=2, type=int, help="internal: run one (K, P) and print it")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.device)))
        return
    grid = [(3, 8_000)] if args.smoke else [(K, P) for P in (1_000_000, 4_000_000, 16_000_000)
                                           for K in (3, 9, 27, 81) if K * P <= 432_000_000]
    rows = []
    for K, P in grid:
        out = subprocess.run([sys.executable, __file__, "--one", str(K), str(P), "--device", args.device],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    emit("ata", device=args.device, rows=rows)


if __name__ == "__main__":
    main()
