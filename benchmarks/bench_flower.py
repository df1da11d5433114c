"""Seconds per round in process, under Flower's Simulation Engine and under its Deployment
Engine on 127.0.0.1 (a SuperLink and one SuperNode per client as processes), the ratio
Deployment / in process, and the bytes per round on the wire (Flower's serialised message
contents) next to tools/runs.message_bytes (the tensors alone). Needs requirements-flower.txt.

    python benchmarks/bench_flower.py              # default config: 9 clients, 2 rounds (~10 min on 2 cores)
    python benchmarks/bench_flower.py --small      # tests/test_flower.py's 3-client config (~4 min)
    python benchmarks/bench_flower.py --small --tree /path/to/other/checkout   # the same, another version

In process, a round's seconds exclude the model build (done once); under the Deployment
Engine every message starts a ClientApp process that imports torch and loads the base
(Flower 1.42), so a round pays that once per client (one message per client and round).
"""

import argparse
import json
import os
import sys
import tempfile
import time

from common import ROOT, emit

ROUNDS = ["fed.stage1_rounds=1", "fed.stage2_rounds=1"]
SMALL = ["data.clients_per_task=1", "data.train_per_client=16", "data.test_per_client=4", "data.max_new_tokens=4",
         "fed.local_epochs=1", "fed.batch_size=4", "model.lora_r=4"]


def per_round(log: list[dict]) -> dict:
    tensors = [sum(sum(c[d].values()) for c in rec["comm"].values() for d in ("up", "down")) for rec in log]
    out = {"seconds_per_round": [rec["seconds"] for rec in log], "message_bytes_per_round": tensors}
    if "wire_bytes" in log[0]:
        out["wire_bytes_per_round"] = [rec["wire_bytes"]["up"] + rec["wire_bytes"]["down"] for rec in log]
    return out


def mean(xs):
    return sum(xs) / len(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the 3-client config of tests/test_flower.py")
    ap.add_argument("--tree", default=ROOT, help="the checkout whose train.py and tools/flower_app.py to measure")
    ap.add_argument("--skip-simulation", action="store_true")
    ap.add_argument("--skip-deployment", action="store_true")
    args = ap.parse_args()
    tree = os.path.abspath(args.tree)
    sys.path.insert(0, tree)
    from tools import flower_app, flower_local
    import train
    extra = [*ROUNDS, f"model.cache_dir={ROOT}/.cache"] + (SMALL if args.small else [])
    config = os.path.join(tree, "config.yaml")
    cfg = train.load_config(config, extra)
    train.build_model(cfg)   # the embedded base, built once before anything is timed
    K = len(train.load_data(cfg))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        f = train.build(cfg)
        log = []
        for r in range(1, f.coord.total_rounds + 1):
            t0 = time.perf_counter()
            log.append(f.run_round(r).to_json() | {"seconds": round(time.perf_counter() - t0, 3)})
        out["inprocess"] = per_round(log)
        if not args.skip_simulation:
            settings = flower_app.Settings(config=config, overrides=extra + [f"run_dir={tmp}/sim"], clients=K)
            flower_local.simulate(settings)
            out["simulation"] = per_round([json.loads(x) for x in open(f"{tmp}/sim/log.jsonl")])
        if not args.skip_deployment:
            with flower_local.Localhost(K, f"{tmp}/localhost") as lh:
                rc = " ".join([f'config="{config}"', f'set="{" ".join(extra)}"', f"clients={K}",
                               f'run-dir="{tmp}/dep"'])
                t0 = time.perf_counter()
                done = lh.run(rc, timeout=3600)
                out["deployment_whole_run_s"] = round(time.perf_counter() - t0, 1)
                assert done.returncode == 0, open(f"{tmp}/localhost/flwr-run.log").read()[-2000:]
            out["deployment_localhost"] = per_round([json.loads(x) for x in open(f"{tmp}/dep/log.jsonl")])
            out["deployment_over_inprocess"] = round(mean(out["deployment_localhost"]["seconds_per_round"])
                                                     / mean(out["inprocess"]["seconds_per_round"]), 1)
    emit("flower", tree=tree, config="small (3 clients)" if args.small else "default", clients=K, **out)


if __name__ == "__main__":
    main()
