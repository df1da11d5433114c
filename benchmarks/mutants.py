"""benchmarks/mutants.py -- does the suite catch a broken promise? One-line changes (mutants),
one per promise the README and SPEC make (what travels, what is scored, which loss, which rule),
each applied to a fresh copy of the code; the tests named beside it run there, and the mutant
is caught when they fail. The unchanged copy must pass the same tests first.

    python benchmarks/mutants.py                 # every mutant (about 12 minutes on 2 cores)
    python benchmarks/mutants.py --only psi_s_uploaded --keep   # one, keeping its copy to look at
    python benchmarks/mutants.py --out /tmp/table.md           # the table, as docs/mutants.md has it

Prints one JSON line (the rows) at the end; exit code 1 if any mutant survives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMISES = "tests/test_promises.py"

# (name, the promise it breaks, file, the line as it is, the line broken, the tests to run)
MUTANTS = [
    ("psi_s_uploaded", "a client uploads its task adapter psi_t (h_0), never psi_s (SPEC 5)", "fed.py",
     'return {"task_adapter": adapter_tensors(state, own_adapter(state)), "lora": lora_tensors(state)}',
     'return {"task_adapter": adapter_tensors(state, own_adapter(state).replace("psi_t", "psi_s")), '
     '"lora": lora_tensors(state)}', [PROMISES, "tests/test_fed.py"]),
    ("loss_is_ce_only", "the local loss is CE + lambda_d L_d (+ lambda_b L_b + lambda_z L_z) (SPEC 3, 4)", "fed.py",
     "return out.ce + sum(weights[k] * out.aux[k] for k in pilot.AUX_KEYS)", "return out.ce + 0 * out.aux['difference']",
     [PROMISES, "tests/test_fed.py"]),
    ("no_difference_weight", "stage 1 weighs the difference loss by lambda_d (SPEC 3)", "fed.py",
     'return {"difference": cfg.lambda_d if METHODS[cfg.method].difference else 0.0,',
     'return {"difference": 0.0,', [PROMISES, "tests/test_fed.py"]),
    ("fedprox_without_prox", "fedprox adds mu/2 times the squared distance to the global weights (SPEC 6)", "fed.py",
     "cfg.prox_mu if METHODS[cfg.method].prox else 0.0, self.gate_ramp() if stage == 2 else None)",
     "0.0, self.gate_ramp() if stage == 2 else None)", [PROMISES, "tests/test_fed.py"]),
    ("scores_ignore_the_cap", "rounds score fed.eval_max_samples of a split (SPEC 5b)", "fed.py",
     "samples = eval_subset(samples, cfg.eval_max_samples, self.seed, d.name, split)",
     "samples = eval_subset(samples, None, self.seed, d.name, split)", [PROMISES, "tests/test_stream.py"]),
    ("sampling_ignores_the_round", "client sampling is drawn anew each round (fed.client_fraction)", "fed.py",
     'perm = torch.randperm(K, generator=generator(self.seed, "sample", r)).tolist()',
     'perm = torch.randperm(K, generator=generator(self.seed, "sample", 0)).tolist()', [PROMISES, "tests/test_fed.py"]),
    ("mix_same_and_other_swapped", "the log's LoRA mix: self, same task, other tasks", "fed.py",
     '"same_task": sum(W[i, j].item() for j in range(len(tasks)) if j != i and tasks[j] == tasks[i]),',
     '"same_task": sum(W[i, j].item() for j in range(len(tasks)) if tasks[j] != tasks[i]),', [PROMISES, "tests/test_fed.py"]),
    ("lr_groups_swapped", "the connector learns at lr_connector, LoRA at its stage's rate (SPEC 5)", "fed.py",
     'groups = [{"params": [p for n, p in params if not pilot.is_lora(n)], "lr": cfg.lr_connector},',
     'groups = [{"params": [p for n, p in params if not pilot.is_lora(n)], "lr": lr_lora},', [PROMISES]),
    ("schedule_constant", "cosine schedule with 3% warmup (SPEC 5)", "fed.py",
     "return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))", "return 1.0", [PROMISES]),
    ("ata_farthest_neighbours", "ATA mixes the M NEAREST other clients (SPEC 5)", "pilot.py",
     "order = torch.sort(d[k, others], stable=True).indices",
     "order = torch.sort(d[k, others], stable=True, descending=True).indices",
     [PROMISES, "tests/test_pilot.py"]),
    ("ata_is_fedavg", "Pilot aggregates LoRA by ATA, one LoRA per client (SPEC 5)", "fed.py",
     'if self.method.lora == "fedavg":', "if True:", [PROMISES, "tests/test_fed.py"]),
    ("task_adapters_across_tasks", "task adapters are averaged within a task only (SPEC 5)", "pilot.py",
     "idx = [k for k, t in enumerate(tasks) if t == task]", "idx = list(range(len(tasks)))",
     [PROMISES, "tests/test_fed.py"]),
    ("points_swapped", "after_local and after_download are the scores of those two states (SPEC 5b)", "tools/runs.py",
     'points = {"after_download": after_download, "after_local": after_local}',
     'points = {"after_download": after_local, "after_local": after_download}', [PROMISES]),
    ("cross_task_on_own", "cross-task scores are on the OTHER tasks' test splits", "tools/engine.py",
     "others = [o for o in self.clients if o.task == task]",
     "others = [o for o in self.clients if o.task == client.task]", [PROMISES, "tests/test_train.py"]),
    ("resume_ignores_a_key", "--resume refuses a run that differs in any identity key", "tools/runs.py",
     "diff = [k for k in sorted(keys) if before.get(k) != now.get(k)]",
     'diff = [k for k in sorted(keys) if before.get(k) != now.get(k) and k != "fed.top_k"]',
     [PROMISES, "tests/test_runs.py"]),
    ("psi_s_dropped_in_stage2", "stage 2's output keeps the client's psi_s (SPEC 4 [choice])", "pilot.py",
     "return ConnectorOutput((s + x).to(moa.own.dtype), aux_losses(h, **losses))",
     "return ConnectorOutput(x.to(moa.own.dtype), aux_losses(h, **losses))", ["tests/test_pilot.py"]),
]


def copy_tree(dst: str) -> None:
    """The tracked files and the untracked ones git does not ignore: the code as it stands."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def run_tests(folder: str, tests: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CI="")
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=folder, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return out.returncode, (lines[-1] if lines else out.stderr[-300:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="mutant names")
    ap.add_argument("--keep", action="store_true", help="keep each mutated copy (its path is printed)")
    ap.add_argument("--out", help="write the Markdown table here")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only]
    rows = []
    for name, promise, path, old, new, tests in chosen:
        folder = tempfile.mkdtemp(prefix=f"mutant-{name}-")
        try:
            copy_tree(folder)
            target = os.path.join(folder, path)
            text = open(target).read()
            if text.count(old) != 1:
                raise SystemExit(f"{name}: {path} holds the line {text.count(old)} times, not once: {old!r}")
            t0 = time.perf_counter()
            base_rc, base_line = run_tests(folder, tests, args.timeout)   # the unchanged copy passes
            if base_rc != 0:
                raise SystemExit(f"{name}: the unchanged copy fails {tests}: {base_line}")
            with open(target, "w") as f:
                f.write(text.replace(old, new))
            rc, line = run_tests(folder, tests, args.timeout)
            rows.append({"mutant": name, "promise": promise, "file": path, "tests": tests, "caught": rc not in (0, 5),
                         "pytest": line, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name}: {'caught' if rows[-1]['caught'] else 'SURVIVED'} ({line})", file=sys.stderr)
        finally:
            if args.keep:
                print(f"{name}: {folder}", file=sys.stderr)
            else:
                shutil.rmtree(folder, ignore_errors=True)
    caught = sum(r["caught"] for r in rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table(rows))
    print(json.dumps({"tried": len(rows), "caught": caught, "rows": rows}))
    return 0 if caught == len(rows) else 1


def table(rows: list[dict]) -> str:
    lines = ["| mutant | the promise it breaks | file | tests run | caught | pytest's last line |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['mutant']}` | {r['promise']} | {r['file']} | {', '.join(r['tests'])} | "
                     f"{'yes' if r['caught'] else '**no**'} | {r['pytest']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
