"""benchmarks/sweep.py -- where Pilot helps and where it hurts: a map over data worlds, not one point.

    python benchmarks/sweep.py --worlds D --samples 32     # the map's goal cell: 34 runs, ~75 min on 2 cores
    python benchmarks/sweep.py                  # the whole map (every world and N); resumes after a kill
    python benchmarks/sweep.py --plan           # list the seed-0 runs, run nothing

Every run is `python train.py --config config.yaml` with the overrides below (in-process, two
workers of one thread each), in runs/sweep/<world>_n<N>_<method>_lr<LR>[_tau<T>]_s<seed>/. A
run whose results.json exists is read back, a run cut off mid-way continues with --resume:
killing the sweep loses at most the rounds in flight.

The worlds and their budgets were fixed, and written down here, before any Pilot score on them
was seen (scenario A's generator predates the sweep; the phrasing switch and scenario D were
added for it):
  A-shared  scenario A (colour / shape / count VQA, 3 clients each, own background, object
            sizes and label prior), every client of a task answering in the task's first
            phrasing ("3", "red"): the paper's setting, where a task's clients share a public
            dataset's format. The case collaboration should help most.
  A-mixed   scenario A as the default run has it: one client in three answers in the task's
            second phrasing ("three", "they are red"). Heterogeneity inside a task, the case
            where averaging should hurt.
  D         real handwritten digits (scikit-learn's 8 x 8 digits, upscaled): one visual skill
            asked in three formats (digit, odd/even, greater than four), IID splits within a
            task. The skill is not in the embedded base, and a client's few samples teach it
            slowly: the world the paper's abstract argues for, once the budget lets it learn.
  samples per client: 8, 32, 128 training samples, plus 8 validation samples carved from the
            client's own data and 32 test samples, per client.
Budgets (BUDGETS), the same for every method in a world, batch 8:
  A worlds  4 rounds (pilot: 2 of stage 1, 2 of stage 2), local epochs = max(1, 64 // N):
            8 local steps a round at N = 8 and 32, 16 at N = 128.
  D         8 rounds (pilot: 4 + 4), local epochs = max(1, 256 // N): 32 local steps a round
            (256 in all). Chosen with `local` ALONE, on validation, before any Pilot run on it:
            the earlier 4 x 8 steps left every method at chance (0.37); at 8 x 32 steps, N = 32,
            lr 3e-3, seed 0, local's validation score after local training rose from 0.40
            (round 1) to 0.51-0.58 (rounds 4-8), clearly above chance.
Fair tuning: the learning rate of local, fedavg, fedprox and pilot (connector and LoRA alike)
is chosen from the same grid LRS, per world and sample size, on the clients' validation splits
(mean score after local training, last round, seed 0), never on test; then pilot's ATA
temperature from TAUS at its chosen rate, the same way. Seeds 1 and 2 run with the chosen
values. The ablations differ from pilot in one thing each and run at pilot's chosen rate and
temperature: pilot_no_moa (stage 1 for all rounds: what CT-MoA adds, and with it psi_s frozen
and lambda_d off in stage 2), pilot_task_oracle (LoRA averaged within each task: the upper
reference for any distance rule), pilot_kernel and pilot_top_m (the earlier ATA forms).
sweep.json records every choice.

Outputs: runs/sweep/sweep.json, runs/sweep/table.md (mean +- sd over seeds at both evaluation
points, Pilot minus the best baseline) and, where matplotlib is installed (pip install -r
requirements-plots.txt), the figure given by --figure (default docs/sweep.png).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORLDS = {"A-shared": ["data.scenario=A", "data.minority_phrasing=false"],
          "A-mixed": ["data.scenario=A", "data.minority_phrasing=true"],
          "D": ["data.scenario=D"]}
SAMPLES = (8, 32, 128)
METHODS = {"local": ["fed.method=local"], "fedavg": ["fed.method=fedavg"], "fedprox": ["fed.method=fedprox"],
           "pilot": ["fed.method=pilot"], "pilot_no_moa": ["fed.method=pilot_no_moa"],
           "pilot_task_oracle": ["fed.method=pilot_task_oracle"],
           "pilot_kernel": ["fed.method=pilot", "fed.ata_form=kernel"],
           "pilot_top_m": ["fed.method=pilot", "fed.ata_form=top_m", "fed.ata_top_m=1"]}
BASELINES = ("local", "fedavg", "fedprox")
TUNED = (*BASELINES, "pilot")                  # the rest are ablations, at pilot's chosen values
WITH_TAU = ("pilot", "pilot_no_moa")           # the ablations that use the spread ATA's tau
LRS = (1e-3, 3e-3, 1e-2)
TAUS = (0.1, 0.25, 1.0)                        # 0.25: ata_spread's default, run with the LRs
SEEDS = (0, 1, 2)
COMMON = ["fed.batch_size=8", "data.val_per_client=8", "data.test_per_client=32", "data.clients_per_task=3"]
BUDGETS = {"A-shared": (2, 2, 64), "A-mixed": (2, 2, 64), "D": (4, 4, 256)}   # stage-1, stage-2 rounds, steps
DEFAULT_TAU = 0.25
POINTS = ("after_local", "after_download")


def job_dir(out: str, world: str, n: int, method: str, lr: float, tau: float | None, seed: int) -> str:
    t = "" if tau is None else f"_tau{tau:g}"
    return os.path.join(out, f"{world}_n{n}_{method}_lr{lr:g}{t}_s{seed}")


def overrides(world: str, n: int, method: str, lr: float, tau: float | None, seed: int, run_dir: str) -> list[str]:
    lrs = [f"fed.{k}={lr}" for k in ("lr_connector", "lr_lora_stage1", "lr_lora_stage2")]
    s1, s2, steps = BUDGETS[world]
    return (COMMON + WORLDS[world] + METHODS[method] + lrs + ([f"fed.ata_tau={tau}"] if tau is not None else [])
            + [f"fed.stage1_rounds={s1}", f"fed.stage2_rounds={s2}",
               f"data.train_per_client={n}", f"fed.local_epochs={max(1, steps // n)}", f"seed={seed}",
               f"run_dir={run_dir}"])


def summary(results: dict) -> dict:
    """The figures the map needs from one run's results.json."""
    return {p: {"test": results[p]["mean"], "val": results[p]["val_mean"]} for p in POINTS}


def run_one(job: tuple) -> tuple:
    """One train.py run in this worker (one thread); read back if already complete."""
    import torch
    import train
    torch.set_num_threads(1)
    out, world, n, method, lr, tau, seed = job
    run_dir = job_dir(out, world, n, method, lr, tau, seed)
    res = os.path.join(run_dir, "results.json")
    if not os.path.exists(res):
        argv = ["--config", os.path.join(ROOT, "config.yaml")]
        for o in overrides(world, n, method, lr, tau, seed, run_dir):
            argv += ["--set", o]
        if os.path.isdir(run_dir):
            argv.append("--resume")          # cut off by a kill: continue from its last round
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(argv)
    with open(res) as f:
        return job, summary(json.load(f))


def run_all(jobs: list, workers: int) -> dict:
    done = {}
    if workers <= 1:
        results = map(run_one, jobs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap_unordered(run_one, jobs)
    for i, (job, s) in enumerate(results, 1):
        done[job] = s
        tau = "" if job[5] is None else f" tau={job[5]:g}"
        print(f"[{i}/{len(jobs)}] {job[1]} n={job[2]} {job[3]} lr={job[4]:g}{tau} seed={job[6]}: "
              f"after_local {s['after_local']['test']:.3f} (val {s['after_local']['val']:.3f})", flush=True)
    if workers > 1:
        pool.close()
        pool.join()
    return done


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def label(choice: tuple) -> str:
    lr, tau = choice
    return f"{lr:g}" if tau is None else f"{lr:g}, tau {tau:g}"


def tables(grid: dict, chosen: dict, worlds, samples, methods) -> tuple[str, dict]:
    """Markdown tables (one per evaluation point) and the per-cell Pilot - best-baseline gaps."""
    gaps, text = {}, []
    for p in POINTS:
        text += [f"\n### Scored {p.replace('_', ' ')}" + (" (headline)" if p == "after_local" else ""), "",
                 "| world | N | " + " | ".join(methods) + " | pilot − best baseline |",
                 "|---|---|" + "---|" * (len(methods) + 1)]
        for w in worlds:
            for n in samples:
                scores = {m: [grid[(w, n, m, s)][p]["test"] for s in SEEDS if (w, n, m, s) in grid] for m in methods}
                base = [m for m in BASELINES if scores.get(m)]
                best = max(base, key=lambda m: statistics.mean(scores[m])) if base else None
                gap = None
                if best and scores.get("pilot"):
                    gap = statistics.mean(scores["pilot"]) - statistics.mean(scores[best])
                    spread = (statistics.stdev(scores["pilot"]) ** 2 / len(scores["pilot"])
                              + statistics.stdev(scores[best]) ** 2 / len(scores[best])) ** 0.5 \
                        if min(len(scores["pilot"]), len(scores[best])) > 1 else 0.0
                    gaps[(p, w, n)] = (gap, spread, best)
                row = [cell(scores[m]) if scores[m] else "-" for m in methods]
                row.append(f"{gap:+.3f} (vs {best})" if gap is not None else "-")
                text.append(f"| {w} | {n} | " + " | ".join(row) + " |")
    text += ["", "Learning rate (and pilot's ATA temperature) chosen on validation (seed 0); ablations use pilot's:", "",
             "| world | N | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for w in worlds:
        for n in samples:
            text.append(f"| {w} | {n} | " + " | ".join(label(chosen[(w, n, m)]) if (w, n, m) in chosen else "-"
                                                      for m in methods) + " |")
    return "\n".join(text) + "\n", gaps


def figure(gaps: dict, worlds, samples, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no figure: matplotlib is an optional extra, pip install -r requirements-plots.txt"
    labels = [f"{w}\nN={n}" for w in worlds for n in samples]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.6))
    width = 0.38
    for j, p in enumerate(POINTS):
        vals = [gaps.get((p, w, n), (float("nan"), 0, ""))[0] for w in worlds for n in samples]
        errs = [gaps.get((p, w, n), (0, 0, ""))[1] for w in worlds for n in samples]
        ax.bar([i + (j - 0.5) * width for i in range(len(labels))], vals, width, yerr=errs, capsize=2,
               label=f"scored {p.replace('_', ' ')}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("Pilot − best baseline\n(mean score over seeds)")
    ax.set_title("Where Pilot helps (> 0) and hurts (< 0); bars: ± standard error over seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"figure: {path}"


def pick(scores: dict) -> float:
    """The value with the best validation score after local training; ties -> the smaller."""
    return max(scores, key=lambda v: (scores[v], -v))


def tau_of(method: str) -> float | None:
    """The ATA temperature a seed-0 learning-rate run uses: the spread form's default, or none."""
    return DEFAULT_TAU if method in WITH_TAU else None


def tune(done: dict, args, cells: list, tuned: list) -> dict:
    """(world, N, method) -> (lr, tau), from the seed-0 runs in `done` (which it extends):
    each tuned method's rate on validation, then pilot's tau at its rate (runs it needs), then
    the ablations at pilot's values."""
    s0, chosen = args.seeds[0], {}
    for w, n in cells:
        for m in tuned:
            lr = pick({lr: done[(args.out, w, n, m, lr, tau_of(m), s0)]["after_local"]["val"] for lr in LRS})
            chosen[(w, n, m)] = (lr, tau_of(m))
    if "pilot" in tuned:                            # then pilot's ATA temperature, at its chosen rate
        taus = [(args.out, w, n, "pilot", chosen[(w, n, "pilot")][0], t, s0) for w, n in cells for t in TAUS
                if t != DEFAULT_TAU]
        done.update(run_all(taus, args.workers))
        for w, n in cells:
            lr = chosen[(w, n, "pilot")][0]
            chosen[(w, n, "pilot")] = (lr, pick({t: done[(args.out, w, n, "pilot", lr, t, s0)]["after_local"]["val"]
                                                 for t in TAUS}))
    for w, n in cells:
        for m in args.methods:
            if m not in TUNED:
                lr, tau = chosen[(w, n, "pilot")]
                chosen[(w, n, m)] = (lr, tau if m in WITH_TAU else None)
    return chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "sweep"))
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    ap.add_argument("--samples", nargs="+", type=int, default=list(SAMPLES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--figure", default=os.path.join(ROOT, "docs", "sweep.png"))
    ap.add_argument("--plan", action="store_true", help="print the seed-0 tuning runs and stop")
    args = ap.parse_args()
    s0, more = args.seeds[0], args.seeds[1:]
    tuned = [m for m in args.methods if m in TUNED]
    if any(m not in TUNED for m in args.methods) and "pilot" not in tuned:
        tuned.append("pilot")                       # the ablations run at pilot's chosen values
    cells = [(w, n) for w in args.worlds for n in args.samples]
    first = [(args.out, w, n, m, lr, tau_of(m), s0) for w, n in cells for m in tuned for lr in LRS]
    print(f"{len(cells)} cells: {len(first)} learning-rate runs at seed {s0}, then pilot's temperature, "
          f"then {len(more)} more seeds and the ablations")
    if args.plan:
        for job in first:
            print(" ".join(overrides(*job[1:], job_dir(*job))))
        return
    import train
    from tools import embedded
    embedded.embedded_checkpoint(train.load_config(os.path.join(ROOT, "config.yaml"), []).model)   # build once, here
    done = run_all(first, args.workers)
    chosen = tune(done, args, cells, tuned)
    rest = [(args.out, w, n, m, *chosen[(w, n, m)], s) for w, n in cells for m in args.methods
            for s in (args.seeds if m not in TUNED else more)]
    done.update(run_all(rest, args.workers))
    grid = {(w, n, m, s): done[(args.out, w, n, m, *chosen[(w, n, m)], s)]
            for w, n in cells for m in args.methods for s in args.seeds}
    table, gaps = tables(grid, chosen, args.worlds, args.samples, args.methods)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"worlds": WORLDS, "budgets": BUDGETS, "common": COMMON, "lrs": LRS, "taus": TAUS,
                   "seeds": args.seeds,
                   "chosen": {"/".join(map(str, k)): {"lr": v[0], "tau": v[1]} for k, v in chosen.items()},
                   "runs": {"/".join(map(str, k[1:])): v for k, v in done.items()}}, f, indent=1)
    print(table)
    print(figure(gaps, args.worlds, args.samples, args.figure))


if __name__ == "__main__":
    main()
