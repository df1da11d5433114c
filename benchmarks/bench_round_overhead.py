"""Round overhead on the default config: the fraction of a round's wall time spent outside
local training (state swaps, uploads, aggregation, downloads, checkpointing). Evaluation is
reported beside it, not counted in the round.

    python benchmarks/bench_round_overhead.py
"""

import tempfile
import time

from common import ROOT, emit, parser

import train


def main():
    ap = parser(__doc__)
    args = ap.parse_args()
    extra = ["fed.stage1_rounds=1", "fed.stage2_rounds=1", "model.embedded_pretrain_steps=5",
             "data.train_per_client=8", "data.test_per_client=2", "data.max_new_tokens=2",
             "fed.local_epochs=1"] if args.smoke else []
    cfg = train.load_config(f"{ROOT}/config.yaml", extra + [f"model.device={args.device}",
                                                            f"model.cache_dir={ROOT}/.cache"])
    f = train.build(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for r in range(1, f.coord.total_rounds + 1):
            t = time.perf_counter()
            rec = f.run_round(r)
            t_round = time.perf_counter() - t
            t = time.perf_counter()
            cfg.run_dir = run_dir
            train.save_checkpoint(cfg, f, r)
            t_ckpt = time.perf_counter() - t
            total = t_round + t_ckpt - rec.seconds_scoring   # scoring is evaluation, reported apart
            rows.append({"round": r, "stage": rec.stage, "round_s": round(total, 3),
                         "local_training_s": rec.seconds_local_training, "checkpoint_s": round(t_ckpt, 4),
                         "overhead_fraction": round(1 - rec.seconds_local_training / total, 4),
                         "evaluation_s": rec.seconds_scoring})
    overall = 1 - sum(x["local_training_s"] for x in rows) / sum(x["round_s"] for x in rows)
    emit("round_overhead", device=args.device, rows=rows, overhead_fraction=round(overall, 4))


if __name__ == "__main__":
    main()
