"""benchmarks/results_table.py -- the README's accuracy table, from real runs of train.py.

    python benchmarks/results_table.py                      # 2 scenarios x 4 methods x 3 seeds + ablations
    python benchmarks/results_table.py --seeds 0 --methods pilot fedavg --scenarios A

Each cell runs `python train.py --config config.yaml --set fed.method=M --set data.scenario=S
--set seed=K --set run_dir=runs/table/S_M_K` (skipped when that run's results.json exists),
then prints a markdown table of the mean over clients of each client's own-test score
(mean +- std over seeds), and the mean score on the other tasks' test splits.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = ["local", "fedavg", "fedprox", "pilot"]
ABLATIONS = ["pilot_no_diff", "pilot_no_moa", "pilot_fedavg_lora", "pilot_ata_m2=pilot:fed.ata_top_m=2",
             "pilot_top1=pilot:fed.top_k=1"]


def run(label, scenario, seed, extra):
    """label: a method name, or NAME=METHOD:key=value,key=value for a variant."""
    method, _, rest = label.split("=", 1)[-1].partition(":")
    extra = list(extra) + [kv for kv in rest.split(",") if kv]
    run_dir = os.path.join("runs", "table", f"{scenario}_{label.split('=')[0]}_{seed}")
    res = os.path.join(ROOT, run_dir, "results.json")
    if not os.path.exists(res):
        cmd = [sys.executable, "train.py", "--config", "config.yaml", "--set", f"fed.method={method}",
               "--set", f"data.scenario={scenario}", "--set", f"seed={seed}", "--set", f"run_dir={run_dir}"]
        for e in extra:
            cmd += ["--set", e]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(res) as f:
        return json.load(f)


def cell(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", nargs="+", default=["A", "B"])
    ap.add_argument("--methods", nargs="+", default=MAIN)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ablations", nargs="+", default=ABLATIONS, help="run with the first seed only")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = ap.parse_args()
    rows = [(m, args.seeds) for m in args.methods] + [(m, args.seeds[:1]) for m in args.ablations]
    print("| method | seeds | " + " | ".join(f"scenario {s}: own task | scenario {s}: other tasks"
                                            for s in args.scenarios) + " |")
    print("|---|---|" + "---|---|" * len(args.scenarios))
    for method, seeds in rows:
        cells = []
        for s in args.scenarios:
            results = [run(method, s, k, args.set) for k in seeds]
            own = [r["mean"] for r in results]
            cross = [statistics.mean(v for per in r["cross"].values() for v in per.values()) for r in results]
            cells += [cell(own), cell(cross)]
        print(f"| {method.split('=')[0]} | {len(seeds)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
