"""Seconds per round of the default config (9 clients; 2 rounds: one per stage), in process,
under Flower's Simulation Engine and under its Deployment Engine on 127.0.0.1 (a SuperLink and
9 SuperNodes as processes), and the bytes per round on the wire (Flower's serialised message
contents) next to fed.message_bytes (the tensors alone). Needs requirements-flower.txt.

    python benchmarks/bench_flower.py            # ~10 minutes on 2 CPU cores
"""

import json
import os
import tempfile
import time

from common import ROOT, emit, parser

import flower_app
import train

ROUNDS = ["fed.stage1_rounds=1", "fed.stage2_rounds=1"]


def per_round(log: list[dict]) -> dict:
    tensors = [sum(sum(c[d].values()) for c in rec["comm"].values() for d in ("up", "down")) for rec in log]
    out = {"seconds_per_round": [rec["seconds"] for rec in log], "message_bytes_per_round": tensors}
    if "wire_bytes" in log[0]:
        out["wire_bytes_per_round"] = [rec["wire_bytes"]["up"] + rec["wire_bytes"]["down"] for rec in log]
    return out


def main():
    ap = parser(__doc__)
    ap.add_argument("--skip-deployment", action="store_true")
    args = ap.parse_args()
    extra = [*ROUNDS, f"model.cache_dir={ROOT}/.cache", f"model.device={args.device}"]
    config = f"{ROOT}/config.yaml"
    cfg = train.load_config(config, extra)
    train.build_model(cfg)   # the embedded base, built once before anything is timed
    K = len(train.load_data(cfg))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        f = train.build(cfg)
        log = []
        for r in range(1, f.total_rounds + 1):
            t0 = time.perf_counter()
            log.append(f.run_round(r) | {"seconds": round(time.perf_counter() - t0, 3)})
        out["inprocess"] = per_round(log)
        settings = flower_app.Settings(config=config, overrides=extra + [f"run_dir={tmp}/sim"], clients=K)
        flower_app.simulate(settings)
        out["simulation"] = per_round([json.loads(x) for x in open(f"{tmp}/sim/log.jsonl")])
        if not args.skip_deployment:
            with flower_app.Localhost(K, f"{tmp}/localhost") as lh:
                rc = " ".join([f'config="{config}"', f'set="{" ".join(extra)}"', f"clients={K}",
                               f'run-dir="{tmp}/dep"'])
                done = lh.run(rc, timeout=1800)
                assert done.returncode == 0, open(f"{tmp}/localhost/flwr-run.log").read()[-2000:]
            out["deployment_localhost"] = per_round([json.loads(x) for x in open(f"{tmp}/dep/log.jsonl")])
    emit("flower", device=args.device, clients=K, **out)


if __name__ == "__main__":
    main()
