"""train.py -- run Pilot (or a baseline) end to end.

    python train.py --config config.yaml
    python train.py --config config.yaml --set fed.method=fedavg --set seed=1
    python train.py --config config.yaml --resume        # continue from the last completed round

Builds (or loads) the base model, the clients' data, the federation of fed.py; runs
stage1_rounds + stage2_rounds rounds; after every round evaluates each client on its own test
split, appends a JSONL record (each loss term, metrics, bytes up/down per parameter group,
peak memory) to <run_dir>/log.jsonl and checkpoints every client's state and the server's
state as safetensors with a small meta.json. At the end it evaluates every client on the
other tasks' test splits and writes <run_dir>/results.md and results.json.

The config is a tree of dataclasses whose field names are exactly the keys of config.yaml:
unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import operator
import os
import resource
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data as data_mod
import fed as fed_mod
import model as model_mod

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    seed: int = 0                    # every random draw derives from it (fed.derive_seed)
    run_dir: str = "runs/default"    # logs, checkpoints, results
    model: model_mod.ModelConfig = field(default_factory=model_mod.ModelConfig)
    data: data_mod.DataConfig = field(default_factory=data_mod.DataConfig)
    fed: fed_mod.FedConfig = field(default_factory=fed_mod.FedConfig)


class ConfigError(ValueError):
    pass


def _check_type(value, tp, key: str):
    """Return value converted to tp (int -> float allowed), or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):   # PyYAML (YAML 1.1) reads 3e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls, d: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict; unknown keys (with a close-match suggestion) and
    wrong types are errors that name the full key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; allowed: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _check_type(value, tp, full)
    return cls(**kwargs)


def validate(cfg: Config) -> None:
    """Impossible values fail before any model is loaded, naming the key."""
    f, m = cfg.fed, cfg.model
    checks = [
        (f.method in fed_mod.METHODS, "fed.method", f"one of {fed_mod.METHODS}"),
        (f.stage1_rounds >= 0, "fed.stage1_rounds", ">= 0"),
        (f.stage2_rounds >= 0, "fed.stage2_rounds", ">= 0"),
        (f.stage1_rounds + f.stage2_rounds >= 1, "fed.stage1_rounds", "stage1_rounds + stage2_rounds >= 1"),
        (not (f.method.startswith("pilot") and f.method != "pilot_no_moa" and f.stage2_rounds > 0
              and f.stage1_rounds < 1), "fed.stage1_rounds", ">= 1 when stage 2 runs (it needs stage-1 adapters)"),
        (f.local_epochs >= 1, "fed.local_epochs", ">= 1"),
        (cfg.data.clients_per_task >= 1, "data.clients_per_task", ">= 1 (a task needs clients)"),
        (cfg.data.train_per_client >= 1, "data.train_per_client", ">= 1 (a client needs data)"),
        (cfg.data.test_per_client >= 1, "data.test_per_client", ">= 1 (a client needs a test split)"),
        (0 < f.client_fraction <= 1, "fed.client_fraction", "in (0, 1]"),
        (f.batch_size >= 1, "fed.batch_size", ">= 1"),
        (f.grad_accum >= 1, "fed.grad_accum", ">= 1"),
        (f.top_k is None or f.top_k >= 1, "fed.top_k", ">= 1 or null"),
        (f.ata_top_m is None or f.ata_top_m >= 0, "fed.ata_top_m", ">= 0 or null"),
        (m.lora_r > 0, "model.lora_r", "> 0"),
        (m.dtype in model_mod.DTYPES, "model.dtype", f"one of {sorted(model_mod.DTYPES)}"),
        (cfg.data.scenario in (*data_mod.SCENARIOS, "manifest"), "data.scenario",
         f"one of {sorted(data_mod.SCENARIOS) + ['manifest']}"),
    ]
    for ok, key, allowed in checks:
        if not ok:
            value = operator.attrgetter(key)(cfg)
            raise ConfigError(f"{key} = {value!r}: must be {allowed}")


def load_config(path: str, overrides: list[str]) -> Config:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. fed.method=fedavg")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


# -----------------------------------------------------------------------------
# Checkpoints: <run_dir>/ckpt/round_XXX/{client_<name>.safetensors, server.safetensors, meta.json}


def save_checkpoint(run_dir: str, r: int, fedn: fed_mod.Federation, cfg: Config) -> None:
    """Written into a temp dir (each file fsynced) and renamed into place: a crash leaves the
    previous complete round. Keeps the last two rounds."""
    root = os.path.join(run_dir, "ckpt")
    os.makedirs(root, exist_ok=True)
    tmp, final = os.path.join(root, f".tmp_round_{r:03d}"), os.path.join(root, f"round_{r:03d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = []
    for client, state in zip(fedn.clients, fedn.states):
        files.append(os.path.join(tmp, f"client_{client.name}.safetensors"))
        save_file({k: v.contiguous() for k, v in state.items()}, files[-1])
    files.append(os.path.join(tmp, "server.safetensors"))
    save_file({k: v.contiguous() for k, v in fedn.server.state().items()}, files[-1])
    meta = {"round": r, "stage": fedn.stage, "seed": cfg.seed,
            "rng": "every generator is derived from (seed, purpose, round, client): nothing else to save",
            "config": dataclasses.asdict(cfg)}
    files.append(os.path.join(tmp, "meta.json"))
    with open(files[-1], "w") as fh:
        json.dump(meta, fh, indent=1)
    for name in files:
        with open(name, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)   # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in sorted(d for d in os.listdir(root) if d.startswith("round_"))[:-2]:
        shutil.rmtree(os.path.join(root, old))


def write_atomic(path: str, text: str) -> None:
    """Write a text file via temp file, fsync and rename: readers see the old or the new file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_copy(name: str) -> dict[str, torch.Tensor]:
    """safetensors may map the file into memory; copy, so the file can be replaced later."""
    return {k: v.clone() for k, v in load_file(name).items()}


def _read_round(path: str, fedn: fed_mod.Federation) -> tuple[dict, dict, list]:
    """Read one round's checkpoint completely, or raise naming the bad file."""
    name = os.path.join(path, "meta.json")
    try:
        with open(name) as fh:
            meta = json.load(fh)
        name = os.path.join(path, "server.safetensors")
        server = _load_copy(name)
        states = []
        for client in fedn.clients:
            name = os.path.join(path, f"client_{client.name}.safetensors")
            states.append(_load_copy(name))
    except Exception as e:  # truncated or corrupted: json, safetensors and OS errors alike
        raise ValueError(f"checkpoint file {name} is unreadable ({type(e).__name__}: {e})") from None
    return meta, server, states


def load_checkpoint(run_dir: str, fedn: fed_mod.Federation) -> int:
    """Restore the newest readable round into `fedn`; returns that round (0 if none). A
    truncated or corrupted checkpoint is reported by file name and the previous round is used."""
    root = os.path.join(run_dir, "ckpt")
    rounds = sorted(d for d in os.listdir(root) if d.startswith("round_")) if os.path.isdir(root) else []
    for d in reversed(rounds):
        try:
            meta, server, states = _read_round(os.path.join(root, d), fedn)
        except ValueError as e:
            print(f"warning: {e}; falling back to the previous round", file=sys.stderr)
            continue
        if meta["stage"] == 2 and fedn.stage == 1:
            fedn.enter_stage2_structure()
        for client, state, current in zip(fedn.clients, states, fedn.states):
            if set(state) != set(current):
                raise KeyError(f"{root}/{d}: client {client.name} state keys do not fit this config's model")
        fedn.server.load_state(server)
        fedn.states = states
        return meta["round"]
    return 0


# -----------------------------------------------------------------------------
# Results


def peak_memory_mb() -> dict[str, float]:
    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def results_table(final: dict, cross: dict, clients, comm_total: dict) -> str:
    tasks = sorted({c.task for c in clients})
    lines = ["| client | task | own test | " + " | ".join(f"on {t}" for t in tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for c in clients:
        cells = [f"{cross[c.name][t]:.3f}" if t in cross.get(c.name, {}) else "-" for t in tasks]
        lines.append(f"| {c.name} | {c.task} | {final[c.name]:.3f} | " + " | ".join(cells) + " |")
    mean = sum(final.values()) / len(final)
    lines.append(f"| **mean** | | **{mean:.3f}** |" + " |" * len(tasks))
    comm = ", ".join(f"{g} {b / 2 ** 20:.2f} MiB" for g, b in sorted(comm_total.items())) or "none"
    return "\n".join(lines) + f"\n\nCommunication, all clients and rounds, up + down: {comm}\n"


# -----------------------------------------------------------------------------
# Main


def dry_run(cfg: Config) -> str:
    """A readable size report of the configured run (model.size_report), no weights loaded."""
    n_tasks = len(data_mod.SCENARIOS.get(cfg.data.scenario, ())) or 3
    rep = model_mod.size_report(cfg.model, cfg.fed.method, n_tasks, cfg.fed.batch_size, cfg.data.max_length)
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"  # noqa: E731
    lines = [f"model: {rep['source']}; base parameters {rep['base_parameters']:,}",
             f"assumed: {n_tasks} tasks, micro-batch {cfg.fed.batch_size}, sequence {cfg.data.max_length} tokens, "
             f"dtype {cfg.model.dtype}, gradient checkpointing {cfg.model.gradient_checkpointing}"]
    for name, st in rep["stages"].items():
        lines.append(f"\n{name}")
        lines += [f"  {k:>20}: {v:,}" for k, v in st["parameters"].items()]
        lines.append(f"  per client per round: sends {gib(st['bytes_up_per_round'])}, "
                     f"receives {gib(st['bytes_down_per_round'])}")
        lines += [f"  memory {k:>20}: {gib(v)}" for k, v in st["memory_bytes"].items()]
    return "\n".join(lines)


def build(cfg: Config):
    """Load data (fails fast on bad records), then the base model, then the federation."""
    clients = data_mod.load_clients(cfg.data, cfg.seed)
    n_tasks = len({c.task for c in clients})
    if cfg.fed.top_k is not None and cfg.fed.top_k > n_tasks:
        raise ConfigError(f"fed.top_k = {cfg.fed.top_k}: must be <= the number of tasks ({n_tasks})")
    base = model_mod.load_base(cfg.model)
    kind = "stage1" if cfg.fed.method.startswith("pilot") else "plain"
    with torch.random.fork_rng(devices=[]):   # initial connector + LoRA: one draw, shared by all clients
        torch.manual_seed(fed_mod.derive_seed(cfg.seed, "init"))
        connector = model_mod.build_connector(kind, base, cfg.fed.released_init)
        model = model_mod.build_model(base, connector, cfg.model)
    enc = data_mod.Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens,
                           cfg.data.system_prompt, cfg.data.max_length)
    return fed_mod.Federation(cfg.fed, model, base, clients, enc, cfg.seed, cfg.data.max_new_tokens)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--resume", action="store_true", help="continue from the last completed round")
    ap.add_argument("--dry-run", action="store_true",
                    help="print parameters, traffic and a GPU memory estimate; load no weights")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        sys.exit(f"{args.config}: {e}")
    if args.dry_run:
        report = dry_run(cfg)
        print(report)
        return {"dry_run": report}
    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True   # TF32 for what runs in fp32 on Ampere+ GPUs
    torch.backends.cudnn.allow_tf32 = True
    try:
        fedn = build(cfg)
    except (ConfigError, data_mod.DataError) as e:
        sys.exit(f"{args.config}: {e}")
    for c in fedn.clients:
        if c.skipped:
            print(f"client {c.name}: skipped {len(c.skipped)} bad records:\n  " + "\n  ".join(c.skipped), file=sys.stderr)
    log_path = os.path.join(run_dir, "log.jsonl")
    start = load_checkpoint(run_dir, fedn) if args.resume else 0
    records = []
    if start and os.path.exists(log_path):   # keep the log of completed rounds only
        with open(log_path) as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:   # a line torn by a kill mid-write: its round reruns
                    pass
        records = [rec for rec in records if rec["round"] <= start]
    write_atomic(log_path, "".join(json.dumps(rec) + "\n" for rec in records))   # a kill here loses nothing
    with open(os.path.join(run_dir, "config.resolved.yaml"), "w") as fh:
        yaml.safe_dump(dataclasses.asdict(cfg), fh, sort_keys=False)

    rounds = tqdm(range(start + 1, fedn.total_rounds + 1), desc="rounds", initial=start,
                  total=fedn.total_rounds, disable=None)
    for r in rounds:
        t0 = time.perf_counter()
        with tqdm(desc=f"round {r} local steps", leave=False, disable=None) as steps:
            try:
                record = fedn.run_round(r, progress=steps)
            except FloatingPointError as e:   # the last good checkpoint stays as it is
                sys.exit(f"stopped: {e}; the last complete round's checkpoint is in {run_dir}/ckpt")
        for name in record["excluded"]:
            print(f"warning: round {r}: client {name}'s update is not finite; left out of aggregation",
                  file=sys.stderr)
        t_train = time.perf_counter() - t0
        record["metrics"] = fedn.evaluate_own()
        record["mean_metric"] = sum(record["metrics"].values()) / len(record["metrics"])
        record["memory"] = peak_memory_mb()
        record["seconds"] = {"round": round(t_train, 3), "eval": round(time.perf_counter() - t0 - t_train, 3)}
        rounds.set_postfix(stage=record["stage"], mean=f"{record['mean_metric']:.3f}")
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        records.append(record)
        save_checkpoint(run_dir, r, fedn, cfg)

    final = records[-1]["metrics"] if records else fedn.evaluate_own()
    cross = fedn.evaluate_cross()
    comm_total: dict[str, int] = {}
    for rec in records:
        for per in rec["comm"].values():
            for direction in ("up", "down"):
                for g, b in per[direction].items():
                    comm_total[g] = comm_total.get(g, 0) + b
    table = results_table(final, cross, fedn.clients, comm_total)
    header = (f"# {cfg.fed.method}, scenario {cfg.data.scenario}, seed {cfg.seed}, "
              f"{fedn.total_rounds} rounds\n\n")
    write_atomic(os.path.join(run_dir, "results.md"), header + table)
    results = {"method": cfg.fed.method, "scenario": cfg.data.scenario, "seed": cfg.seed,
               "own": final, "mean": sum(final.values()) / len(final), "cross": cross,
               "comm_bytes": comm_total, "rounds": [rec["mean_metric"] for rec in records],
               "skipped_records": {c.name: c.skipped for c in fedn.clients if c.skipped}}
    write_atomic(os.path.join(run_dir, "results.json"), json.dumps(results, indent=1))
    print(header + table)
    return results


if __name__ == "__main__":
    main()
