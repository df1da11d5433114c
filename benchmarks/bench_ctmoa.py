"""CT-MoA forward + backward: this project's batched CTMoA against a loop over batch items and
experts that mirrors the released code's structure, at a LLaVA-proportioned shape scaled to
CPU (B=8, N=144, C_v=256, C=1024, T=3), for top_k = T (dense) and top_k = 1 (gathered).

    python benchmarks/bench_ctmoa.py [--device cuda]
"""

import torch

from common import best_time, dtype_for, emit, parser

import pilot


def loop_forward(conn: pilot.Stage2Connector, h: torch.Tensor) -> torch.Tensor:
    """The released code's structure: for each image, for each expert, run the expert on all
    of that image's tokens and weigh it by the (renormalised top-k) router weight, zero for
    the experts a token did not select."""
    outs, moa = [], conn.moa
    for b in range(h.shape[0]):
        x = h[b]                                                      # (N, C_v)
        # router logits in fp32 as pilot.route computes them: from a bf16 router a near-tie can pick
        # another top-1 expert, and the comparison would measure that, not the batching
        p = torch.nn.functional.linear(x.float(), moa.router.weight.float()).softmax(-1)   # (N, T)
        top_p, top_i = p.topk(moa.top_k, dim=-1)                      # (N, k)
        w = torch.zeros_like(p).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))  # (N, T)
        y = conn.psi_s(x)                                             # (N, C)
        for i in range(moa.num_tasks):
            y = y + w[:, i:i + 1].to(y.dtype) * moa.expert(i, x)      # (N, C)
        outs.append(y)
    return torch.stack(outs)                                          # (B, N, C)


def main():
    ap = parser(__doc__)
    args = ap.parse_args()
    B, N, Cv, C, T = (2, 16, 32, 64, 3) if args.smoke else (8, 144, 256, 1024, 3)
    dev, dt = args.device, dtype_for(args.device)
    torch.manual_seed(0)
    h = torch.randn(B, N, Cv, device=dev, dtype=dt)
    figures = {"shape": dict(B=B, N=N, C_v=Cv, C=C, T=T), "device": dev}
    for top_k in (T, 1):
        moa = pilot.Stage2Connector(Cv, C, T, top_k).to(dev, dt)   # the paper's mixture (g = 1)
        with torch.no_grad():
            for p in moa.parameters():
                p.normal_(std=0.05)
        batched = moa(h).tokens
        looped = loop_forward(moa, h)
        err = (batched.float() - looped.float()).abs().max().item()

        def step(fwd):
            moa.zero_grad(set_to_none=True)
            fwd().float().pow(2).mean().backward()
        t_batched = best_time(lambda: step(lambda: moa(h).tokens), dev)
        t_loop = best_time(lambda: step(lambda: loop_forward(moa, h)), dev)
        figures[f"top_k={top_k}"] = {"batched_s": round(t_batched, 5), "loop_s": round(t_loop, 5),
                                     "speedup": round(t_loop / t_batched, 2), "max_abs_diff": err}
    emit("ctmoa", **figures)


if __name__ == "__main__":
    main()
