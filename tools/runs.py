"""tools/runs.py -- a run's folder: who owns it, what defines the run, its checkpoints, log and results.

<run_dir>/ holds one run: .lock (the process that owns it), run.json (what defines the run: the
keys of IDENTITY_KEYS, its clients and digests of their data), config.resolved.yaml, log.jsonl
(one JSON line a round: a RoundRecord, made by round_record from the round's replies and
completed by log_round), ckpt/round_XXX/ (every
client's state and the server's, as safetensors, and meta.json; the last two rounds are kept),
results.md and results.json (write_results). train.py hands its run folder to this file, with
what to write: claim_run_dir when a run starts, check_resume before the model loads, log_round
and save_checkpoint (the state files, the server's state, the config) after every round,
load_checkpoint and resume_log on --resume; tools/flower_app.py writes its server's log with
the same functions. The core (pilot, model, fed, data) never imports it, and it never imports
train.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import operator
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data as data_mod
import fed as fed_mod
from data import ConfigError, RunError
from tools.store import StateFile, link_or_copy

# -----------------------------------------------------------------------------
# The run directory: one run owns it (a lock, and refusal to mix runs), and what defines a run

# What defines a run: a resume must match these exactly. Every other key (the rounds of stage
# 2, learning rates, loss weights, epochs, ATA's settings, evaluation) may change on resume;
# the change is printed and applies from the next round on.
IDENTITY_KEYS = ("seed", "fed.method", "fed.stage1_rounds", "fed.top_k", "fed.stage2_ramp_steps",
                 "fed.released_init", "model.llava", "model.vision", "model.llm", "model.projector",
                 "model.lora_r", "model.lora_alpha", "model.lora_targets", "model.dtype",
                 "model.embedded_pretrain_steps", "data.scenario", "data.manifest")


def claim_run_dir(run_dir: str, resume: bool, overwrite: bool):
    """Lock run_dir for this process (a second process is refused at once) and make sure a
    fresh run does not write over another run's files. Returns the open lock file: keep it
    open for the whole run (the OS releases the lock if the process dies)."""
    os.makedirs(run_dir, exist_ok=True)
    lock = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise ConfigError(f"run_dir {run_dir} is in use by another running process (pid {holder})") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    others = sorted(f for f in os.listdir(run_dir) if f != ".lock")
    if others and not resume:
        if not overwrite:
            lock.close()
            raise ConfigError(f"run_dir {run_dir} already holds a run ({', '.join(others[:5])}): continue it with "
                              "--resume, replace it with --overwrite, or set another run_dir")
        for name in others:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return lock


def run_identity(cfg, clients, verify_data: bool = False) -> dict:
    """The keys that define a run, its clients (name, task, split sizes, metric) and digests of
    their data (data_digest: the records' bytes, and each image's name, size and mtime;
    with verify_data also every image file's bytes)."""
    flat = {k: operator.attrgetter(k)(cfg) for k in IDENTITY_KEYS}
    flat["clients"] = [[c.name, c.task, len(c.train), len(c.val), len(c.test), c.metric] for c in clients]
    return flat | data_digest(clients, full=verify_data)


CONTENT_KEY = "images_content_sha256"   # present only where --verify-data computed it


def check_resume(run_dir: str, cfg, clients, verify_data: bool = False) -> None:
    """Refuse a resume whose config or data differ from the run's in what defines it, naming
    each key; print the other keys that changed. Only then write config.resolved.yaml. The
    full image digest (--verify-data) is compared only where both the run and now have it."""
    now = run_identity(cfg, clients, verify_data)
    path = os.path.join(run_dir, "run.json")
    if os.path.exists(path):
        try:
            with open(path) as fh:
                saved = json.load(fh)
            before, old_cfg = saved["identity"], saved["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{path} is unreadable ({type(e).__name__}: {e}): cannot check what --resume would continue") from None
        keys = set(before) | set(now)
        if not (CONTENT_KEY in before and CONTENT_KEY in now):   # the full digest: compared where both have it
            keys.discard(CONTENT_KEY)
            if CONTENT_KEY in before:
                now.setdefault(CONTENT_KEY, before[CONTENT_KEY])   # run.json keeps the run's full digest
        diff = [k for k in sorted(keys) if before.get(k) != now.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {_short(before.get(k))} in the run, {_short(now.get(k))} now" for k in diff)
            raise ConfigError(f"--resume refused: {run_dir} holds a different run ({shown}). "
                              "Use another run_dir, or --overwrite to replace it")
        changed = _changed_keys(old_cfg, dataclasses.asdict(cfg))
        if changed:
            print(f"resume: changed since the run started, applied from the next round: {', '.join(changed)}",
                  file=sys.stderr)
    elif any(os.path.isdir(os.path.join(run_dir, d)) for d in ("ckpt",)):
        raise RunError(f"{run_dir} has checkpoints but no run.json: cannot check what --resume would continue")
    write_atomic(path, json.dumps({"identity": now, "config": dataclasses.asdict(cfg)}, indent=1))
    write_atomic(os.path.join(run_dir, "config.resolved.yaml"), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the config keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


# -----------------------------------------------------------------------------
# Checkpoints: <run_dir>/ckpt/round_XXX/{client_<name>.safetensors, server.safetensors, meta.json}


def round_dirs(root: str) -> list[str]:
    """Complete round directories, oldest first (by number, not by name)."""
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if re.fullmatch(r"round_\d+", d)]
    return sorted(names, key=lambda d: int(d.split("_")[1]))


def save_checkpoint(run_dir: str, r: int, stage: int, client_files: dict[str, str],
                    server_state: dict[str, torch.Tensor], config: dict) -> None:
    """Round r's checkpoint: every client's state file ({name: path}, each written and fsynced
    where it is: linked, not copied, as a later save writes a new file and the link keeps this
    round's bytes), the server's state, and meta.json (round, stage, seed, config). Written
    into a temp dir and renamed into place: a crash leaves the previous complete round. Keeps
    the last two rounds."""
    root = os.path.join(run_dir, "ckpt")
    os.makedirs(root, exist_ok=True)
    tmp, final = os.path.join(root, f".tmp_round_{r:03d}"), os.path.join(root, f"round_{r:03d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = []
    for name, path in client_files.items():
        link_or_copy(path, os.path.join(tmp, f"client_{name}.safetensors"))
    files.append(os.path.join(tmp, "server.safetensors"))
    save_file({k: v.contiguous() for k, v in server_state.items()}, files[-1])
    meta = {"round": r, "stage": stage, "seed": config["seed"],
            "rng": "every generator is derived from (seed, purpose, round, client): nothing else to save",
            "config": config}
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
    for old in round_dirs(root)[:-2]:
        shutil.rmtree(os.path.join(root, old))


def write_atomic(path: str, text: str) -> None:
    """Write a text file via temp file, fsync and rename: readers see the old or the new file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_copy(name: str) -> dict[str, torch.Tensor]:
    """safetensors may map the file into memory; copy, so the file can be replaced later."""
    return {k: v.clone() for k, v in load_file(name).items()}


def read_round(path: str, names: list[str], keys: Callable[[int], set[str]]) -> tuple[dict, dict, list]:
    """Read one round's checkpoint and check it, or raise ValueError naming the bad file:
    -> (meta, the server's state, each client's StateFile, in `names` order, checked by its
    header: `keys(stage)`, the key set a client state of that stage must have)."""
    name = os.path.join(path, "meta.json")
    try:
        with open(name) as fh:
            meta = json.load(fh)
        if not isinstance(meta, dict) or not isinstance(meta.get("round"), int) or meta.get("stage") not in (1, 2):
            raise ValueError("meta.json lacks an integer 'round' or a 'stage' of 1 or 2")
        name = os.path.join(path, "server.safetensors")
        server = load_copy(name)
        states, want = [], keys(meta["stage"])
        for client in names:   # checked by their headers here, read one at a time later
            name = os.path.join(path, f"client_{client}.safetensors")
            states.append(StateFile(name))
            if set(states[-1]) != want:
                raise ValueError(f"its keys are not those of a stage-{meta['stage']} client state of this run")
            with safe_open(name, framework="pt") as f:   # every tensor's bytes are there
                for key in states[-1]:
                    f.get_slice(key)
    except Exception as e:  # truncated, corrupted or incomplete: json, safetensors and OS errors alike
        raise ValueError(f"checkpoint file {name} is unreadable ({type(e).__name__}: {e})") from None
    return meta, server, states


def load_checkpoint(run_dir: str, names: list[str], keys: Callable[[int], set[str]]) -> tuple[dict, dict, list] | None:
    """The newest readable round of the run's checkpoints, read_round's (meta, server, client
    files); None if there is none. A bad checkpoint is reported by file name and the previous
    round is used; if rounds exist but none is readable, stop (RunError) rather than start over
    and lose the log."""
    root = os.path.join(run_dir, "ckpt")
    rounds = round_dirs(root)
    for d in reversed(rounds):
        try:
            return read_round(os.path.join(root, d), names, keys)
        except ValueError as e:
            print(f"warning: {e}; falling back to the previous round", file=sys.stderr)
    if rounds:
        raise RunError(f"no checkpoint in {root} is readable; nothing was changed (start over with --overwrite)")
    return None


def data_digest(clients: Sequence[data_mod.ClientData], full: bool = False) -> dict[str, str]:
    """What a run's data is, cheaply, for the run identity train.py checks on --resume:
      records_sha256: the bytes of every JSON file read, and every kept sample's id and turns;
      images_sha256:  each image file's name, size and mtime; a synthetic picture's pixels.
    [choice] An image file replaced by one of the same size and mtime goes unseen; `full`
    (train.py --verify-data) adds images_content_sha256 over every image file's bytes.
    Two digests, so a refused resume says whether the records or the images changed."""
    records, images, content = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for c in clients:
        for f in c.files:
            with open(f, "rb") as fh:
                records.update(hashlib.sha256(fh.read()).digest())
        for s in c.train + c.val + c.test:
            records.update(repr((c.name, s.id, s.turns)).encode())
            if s.image is None:
                continue
            if isinstance(s.image, Image.Image):
                images.update(s.image.tobytes())
                content.update(s.image.tobytes())
                continue
            st = os.stat(s.image)
            images.update(repr((s.image, st.st_size, st.st_mtime_ns)).encode())
            if full:
                with open(s.image, "rb") as fh:
                    content.update(hashlib.sha256(fh.read()).digest())
    out = {"records_sha256": records.hexdigest(), "images_sha256": images.hexdigest()}
    return out | ({"images_content_sha256": content.hexdigest()} if full else {})


def resume_log(run_dir: str, start: int) -> list[RoundRecord]:
    """The log records of the rounds up to `start`; the log is rewritten to hold exactly those
    (a line torn by a kill mid-write is dropped: its round reruns)."""
    path = os.path.join(run_dir, "log.jsonl")
    records = []
    if start and os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        records = [rec for rec in records if isinstance(rec, dict) and rec.get("round", start + 1) <= start]
    write_atomic(path, "".join(json.dumps(rec) + "\n" for rec in records))   # a kill here loses nothing
    return [RoundRecord.from_json(rec) for rec in records]


# -----------------------------------------------------------------------------
# The log and the results: <run_dir>/log.jsonl, results.md, results.json


def mean_score(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")   # nan: every client lost


def message_bytes(msg: fed_mod.Message) -> dict[str, int]:
    """Bytes per parameter group ("task_adapter.<task>" counts as "task_adapter")."""
    out: dict[str, int] = {}
    for group, tensors in msg.items():
        name = group.split(".")[0]
        size = getattr(tensors, "nbytes", None)   # a message file (tools/store.StateFile): from its header
        out[name] = out.get(name, 0) + (size if size is not None else
                                        sum(t.numel() * t.element_size() for t in tensors.values()))
    return out


@dataclass
class RoundRecord:
    """One round as the log holds it (<run_dir>/log.jsonl, a JSON line each: to_json), clients
    by name. Made by round_record from the round's typed replies (fed.Opened, fed.Taken), by
    either engine."""
    round: int
    stage: int
    clients: list[str]                              # chosen to train
    excluded: list[str]                             # trained, result not finite: left out of aggregation
    lost: list[str]                                 # did not reply: left out of this round
    losses: dict[str, dict[str, float]]             # {client: mean loss terms}
    comm: dict[str, dict[str, dict[str, int]]]      # {client: {"up"|"down": {group: bytes}}}
    seconds_local_training: float
    seconds_scoring: float
    # (the fields below have defaults only so that a line keeps the log's key order; None: absent)
    gate: dict[str, float] | None = None            # the CT-MoA gate g each client's round ended with
    lora_distances: dict | None = None              # {"clients", "d"}: the LoRA distances ATA saw
    lora_weights: dict[str, dict[str, float]] | None = None   # how each new LoRA was mixed (fed.mix_shares)
    after_download: dict[str, float] = field(default_factory=dict)   # each client's test score at both points (SPEC 5b)
    val: dict[str, dict[str, float]] | None = None  # {point: {client: validation score}}, where there is a split
    after_local: dict[str, float] = field(default_factory=dict)
    engine: str | None = None                       # Flower's: "flower", its wire bytes and resent clients
    wire_bytes: dict[str, int] | None = None
    resent: list[str] | None = None
    mean: dict[str, float] = field(default_factory=dict)   # {point: mean over the clients}
    memory: dict[str, float] | None = None          # the log's: peak memory so far (log_round)
    seconds: float | None = None                    # the log's: the round's wall time

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict) -> "RoundRecord":
        return cls(**d)


def round_record(names: Sequence[str], tasks: Sequence[str], opened: fed_mod.Opened,
                 taken: dict[int, fed_mod.Taken]) -> RoundRecord:
    """The round's record, from its first half and the replies to its downloads (names[k],
    tasks[k]: client k's). A client that did not reply to either is "lost"; one whose update
    was not finite is "excluded"; a client whose download was empty keeps its after_local score."""
    replies, downloads, uploads = opened.replies, opened.agg.downloads, opened.uploads
    lost = sorted(set(range(len(names))) - set(replies) | {k for k, msg in downloads.items() if msg and k not in taken})
    after_local = {k: rep.scores for k, rep in replies.items()}
    after_download = {k: taken[k].scores if downloads.get(k) else s
                      for k, s in after_local.items() if k in taken or not downloads.get(k)}
    points = {"after_download": after_download, "after_local": after_local}
    test = {p: {names[k]: s["test"] for k, s in sorted(scores.items())} for p, scores in points.items()}
    val = {p: {names[k]: s["val"] for k, s in sorted(scores.items()) if "val" in s}
           for p, scores in points.items() if any("val" in s for s in scores.values())}
    gates = {names[k]: rep.losses["gate"] for k, rep in replies.items() if rep.losses is not None and "gate" in rep.losses}
    mix = opened.agg.mix
    return RoundRecord(
        round=opened.round, stage=opened.stage, clients=[names[k] for k in opened.chosen],
        excluded=[names[k] for k, rep in replies.items() if rep.excluded], lost=[names[k] for k in lost],
        losses={names[k]: {t: v for t, v in rep.losses.items() if t != "gate"}
                for k, rep in replies.items() if rep.losses is not None},
        comm={names[k]: {"up": message_bytes(uploads.get(k, {})), "down": message_bytes(msg)}
              for k, msg in downloads.items() if k in taken or not msg},
        seconds_local_training=round(sum(rep.seconds_local for rep in replies.values()), 4),
        seconds_scoring=round(sum(rep.seconds_scoring for rep in (*replies.values(), *taken.values())), 4),
        after_download=test["after_download"], after_local=test["after_local"],
        mean={p: mean_score(test[p]) for p in fed_mod.EVAL_POINTS}, val=val or None, gate=gates or None,
        lora_distances=None if mix is None else {"clients": [names[k] for k in mix.ids],
                                                 "d": [[round(x, 6) for x in row] for row in mix.d.tolist()]},
        lora_weights=None if mix is None else {
            names[k]: {g: round(w, 4) for g, w in shares.items()}
            for k, shares in zip(mix.ids, fed_mod.mix_shares(mix.W, [tasks[k] for k in mix.ids]))})


def peak_memory_mb() -> dict[str, float]:
    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def results_table(last: dict, cross: dict, clients, comm_total: dict) -> str:
    tasks = sorted({c.task for c in clients})
    lines = ["| client | task | after local training | after download | " + " | ".join(f"on {t}" for t in tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for c in clients:
        cells = [f"{cross[c.name][t]:.3f}" if t in cross.get(c.name, {}) else "-" for t in tasks]
        lines.append(f"| {c.name} | {c.task} | {last['after_local'][c.name]:.3f} | "
                     f"{last['after_download'][c.name]:.3f} | " + " | ".join(cells) + " |")
    lines.append(f"| **mean** | | **{mean_score(last['after_local']):.3f}** | **{mean_score(last['after_download']):.3f}** |"
                 + " |" * len(tasks))
    comm = ", ".join(f"{g} {b / 2 ** 20:.2f} MiB" for g, b in sorted(comm_total.items())) or "none"
    return "\n".join(lines) + f"\n\nCommunication, all clients and rounds, up + down: {comm}\n"


def log_round(run_dir: str, record: RoundRecord, t0: float, seconds: float | None = None) -> None:
    """Complete a round's record (memory, seconds since t0 unless given), warn about the
    clients left out of it, and append it to <run_dir>/log.jsonl."""
    for name in record.excluded:
        print(f"warning: round {record.round}: client {name}'s update is not finite; left out of aggregation",
              file=sys.stderr)
    for name in record.lost:
        print(f"warning: round {record.round}: client {name} did not reply; left out of this round", file=sys.stderr)
    record.memory = peak_memory_mb()
    record.seconds = round(time.perf_counter() - t0 if seconds is None else seconds, 3)
    with open(os.path.join(run_dir, "log.jsonl"), "a") as fh:
        fh.write(json.dumps(record.to_json()) + "\n")


def write_results(cfg, clients, total_rounds: int, records: list[RoundRecord], last: dict, cross: dict,
                  full: dict | None) -> tuple[dict, str]:
    """<run_dir>/results.md and results.json from a run's final scores (`last`: both evaluation
    points; `cross`: on the other tasks; `full`: every test sample, or None). -> (results, the
    text of results.md)."""
    comm_total: dict[str, int] = {}
    for rec in records:
        for per in rec.comm.values():
            for direction in ("up", "down"):
                for g, b in per[direction].items():
                    comm_total[g] = comm_total.get(g, 0) + b
    header = (f"# {cfg.fed.method}, scenario {cfg.data.scenario}, seed {cfg.seed}, {total_rounds} rounds; "
              f"headline: {fed_mod.HEADLINE}\n\n")
    table = results_table(last, cross, clients, comm_total)
    if full is not None:
        table += (f"\nRounds scored at most {cfg.fed.eval_max_samples} test samples per client (fed.eval_max_samples); the "
                  f"final states on every test sample: mean {mean_score(full):.3f} "
                  + ", ".join(f"{k} {v:.3f}" for k, v in full.items()) + "\n")
    write_atomic(os.path.join(cfg.run_dir, "results.md"), header + table)
    results = {"method": cfg.fed.method, "scenario": cfg.data.scenario, "seed": cfg.seed, "headline": fed_mod.HEADLINE,
               "own": last[fed_mod.HEADLINE], "mean": mean_score(last[fed_mod.HEADLINE]),
               **{p: {"own": last[p], "mean": mean_score(last[p]),
                      "rounds": [rec.mean[p] for rec in records],
                      "val_mean": mean_score(records[-1].val[p]) if records and records[-1].val else None}
                  for p in fed_mod.EVAL_POINTS},
               "cross": cross, "comm_bytes": comm_total, "rounds": [rec.mean[fed_mod.HEADLINE] for rec in records],
               "full_test": None if full is None else {"own": full, "mean": mean_score(full)},
               "skipped_records": {c.name: c.skipped for c in clients if c.skipped}}
    write_atomic(os.path.join(cfg.run_dir, "results.json"), json.dumps(results, indent=1))
    return results, header + table


def round_line(record: RoundRecord, total: int) -> str:
    """The one line a finished round prints: mean scores at both points, wall time, and the
    time per taking-part client."""
    n = max(1, len(record.clients))
    return (f"round {record.round}/{total} (stage {record.stage}): "
            + ", ".join(f"{p} {record.mean[p]:.3f}" for p in fed_mod.EVAL_POINTS)
            + f"; {record.seconds:.1f} s, per client {record.seconds_local_training / n:.1f} s training"
            f" + {record.seconds_scoring / n:.1f} s scoring")
