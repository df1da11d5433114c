"""tools/runs.py -- a run's folder: who owns it, what defines the run, its checkpoints, log and results.

<run_dir>/ holds one run: .lock (the process that owns it), run.json (what defines the run: the
keys of IDENTITY_KEYS, its clients and digests of their data), config.resolved.yaml, log.jsonl
(one JSON line a round: round_record, from the replies that came back, and log_round),
ckpt/round_XXX/ (every client's state and the server's, as safetensors, and meta.json; the last
two rounds are kept), results.md and results.json (write_results). train.py hands its run folder
to this file: claim_run_dir when a run starts, check_resume before the model loads, round_record,
log_round and save_checkpoint after every round, load_checkpoint and resume_log on --resume;
tools/flower_app.py writes its server's log with the same functions. The core (pilot, model,
fed, data) never imports it.
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
from typing import Sequence

import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data as data_mod
import fed as fed_mod
import train
from tools.store import StateFile

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
        raise train.ConfigError(f"run_dir {run_dir} is in use by another running process (pid {holder})") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    others = sorted(f for f in os.listdir(run_dir) if f != ".lock")
    if others and not resume:
        if not overwrite:
            lock.close()
            raise train.ConfigError(f"run_dir {run_dir} already holds a run ({', '.join(others[:5])}): continue it with "
                              "--resume, replace it with --overwrite, or set another run_dir")
        for name in others:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return lock


def run_identity(cfg: train.Config, clients, verify_data: bool = False) -> dict:
    """The keys that define a run, its clients (name, task, split sizes, metric) and digests of
    their data (data_digest: the records' bytes, and each image's name, size and mtime;
    with verify_data also every image file's bytes)."""
    flat = {k: operator.attrgetter(k)(cfg) for k in IDENTITY_KEYS}
    flat["clients"] = [[c.name, c.task, len(c.train), len(c.val), len(c.test), c.metric] for c in clients]
    return flat | data_digest(clients, full=verify_data)


CONTENT_KEY = "images_content_sha256"   # present only where --verify-data computed it


def check_resume(run_dir: str, cfg: train.Config, clients, verify_data: bool = False) -> None:
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
            raise train.RunError(f"{path} is unreadable ({type(e).__name__}: {e}): cannot check what --resume would continue") from None
        keys = set(before) | set(now)
        if not (CONTENT_KEY in before and CONTENT_KEY in now):   # the full digest: compared where both have it
            keys.discard(CONTENT_KEY)
            if CONTENT_KEY in before:
                now.setdefault(CONTENT_KEY, before[CONTENT_KEY])   # run.json keeps the run's full digest
        diff = [k for k in sorted(keys) if before.get(k) != now.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {_short(before.get(k))} in the run, {_short(now.get(k))} now" for k in diff)
            raise train.ConfigError(f"--resume refused: {run_dir} holds a different run ({shown}). "
                              "Use another run_dir, or --overwrite to replace it")
        changed = _changed_keys(old_cfg, dataclasses.asdict(cfg))
        if changed:
            print(f"resume: changed since the run started, applied from the next round: {', '.join(changed)}",
                  file=sys.stderr)
    elif any(os.path.isdir(os.path.join(run_dir, d)) for d in ("ckpt",)):
        raise train.RunError(f"{run_dir} has checkpoints but no run.json: cannot check what --resume would continue")
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


def _rounds(root: str) -> list[str]:
    """Complete round directories, oldest first (by number, not by name)."""
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if re.fullmatch(r"round_\d+", d)]
    return sorted(names, key=lambda d: int(d.split("_")[1]))


def save_checkpoint(run_dir: str, r: int, fedn: train.Federation, cfg: train.Config) -> None:
    """Written into a temp dir (each file fsynced) and renamed into place: a crash leaves the
    previous complete round. Keeps the last two rounds."""
    root = os.path.join(run_dir, "ckpt")
    os.makedirs(root, exist_ok=True)
    tmp, final = os.path.join(root, f".tmp_round_{r:03d}"), os.path.join(root, f"round_{r:03d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = []
    for k, client in enumerate(fedn.clients):
        # the client's state file in the store (written and fsynced there), linked, not copied:
        # a later save writes a new file, so the link keeps this round's bytes
        link_or_copy(fedn.store.path(k), os.path.join(tmp, f"client_{client.name}.safetensors"))
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
    for old in _rounds(root)[:-2]:
        shutil.rmtree(os.path.join(root, old))


def link_or_copy(src: str, dst: str) -> None:
    """A hard link (no second copy of the bytes); a copy where the file system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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


def _read_round(path: str, fedn: train.Federation) -> tuple[dict, dict, list]:
    """Read one round's checkpoint completely and check it, or raise ValueError naming the bad file."""
    name = os.path.join(path, "meta.json")
    try:
        with open(name) as fh:
            meta = json.load(fh)
        if not isinstance(meta, dict) or not isinstance(meta.get("round"), int) or meta.get("stage") not in (1, 2):
            raise ValueError("meta.json lacks an integer 'round' or a 'stage' of 1 or 2")
        name = os.path.join(path, "server.safetensors")
        server = _load_copy(name)
        states, want = [], fedn.state_keys(meta["stage"])
        for client in fedn.clients:   # checked by their headers here, read one at a time later
            name = os.path.join(path, f"client_{client.name}.safetensors")
            states.append(StateFile(name))
            if set(states[-1]) != want:
                raise ValueError(f"its keys are not those of a stage-{meta['stage']} client state of this run")
            with safe_open(name, framework="pt") as f:   # every tensor's bytes are there
                for key in states[-1]:
                    f.get_slice(key)
    except Exception as e:  # truncated, corrupted or incomplete: json, safetensors and OS errors alike
        raise ValueError(f"checkpoint file {name} is unreadable ({type(e).__name__}: {e})") from None
    return meta, server, states


def load_checkpoint(run_dir: str, fedn: train.Federation) -> int:
    """Restore the newest readable round into `fedn`; returns that round (0 if there is none).
    A bad checkpoint is reported by file name and the previous round is used; if rounds exist
    but none is readable, stop (RunError) rather than start over and lose the log."""
    root = os.path.join(run_dir, "ckpt")
    rounds = _rounds(root)
    for d in reversed(rounds):
        try:
            meta, server, states = _read_round(os.path.join(root, d), fedn)
        except ValueError as e:
            print(f"warning: {e}; falling back to the previous round", file=sys.stderr)
            continue
        r = meta["round"]
        if meta["stage"] == 1 and r < fedn.total_rounds and fedn.stage_of(r + 1) == 2:
            # stage 2 starts from the adapters sent in the last stage-1 round; this run's last
            # stage-1 round sent none, as it was then the run's last round
            raise train.RunError(f"fed.stage2_rounds: round {r} ended stage 1 as the last round of the run, so there "
                           "was no stage-2 handover; a run cannot add stage-2 rounds after that (start a new run)")
        fedn.set_stage(meta["stage"])
        fedn.server.load_state(server)
        for k, state in enumerate(states):   # the round's files become the store's again
            tmp = fedn.store.path(k) + ".tmp"
            link_or_copy(state.path, tmp)
            os.replace(tmp, fedn.store.path(k))
        return r
    if rounds:
        raise train.RunError(f"no checkpoint in {root} is readable; nothing was changed (start over with --overwrite)")
    return 0


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


def resume_log(run_dir: str, start: int) -> list[dict]:
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
    return records


# -----------------------------------------------------------------------------
# The log and the results: <run_dir>/log.jsonl, results.md, results.json


def peak_memory_mb() -> dict[str, float]:
    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def mean_score(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")   # nan: every client lost


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


def message_bytes(msg: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    """Bytes per parameter group ("task_adapter.<task>" counts as "task_adapter")."""
    out: dict[str, int] = {}
    for group, tensors in msg.items():
        name = group.split(".")[0]
        size = getattr(tensors, "nbytes", None)   # a message file (tools/store.StateFile): from its header
        out[name] = out.get(name, 0) + (size if size is not None else
                                        sum(t.numel() * t.element_size() for t in tensors.values()))
    return out


def round_record(names: Sequence[str], opened: dict, taken: dict[int, dict]) -> dict:
    """The round's log record, from its first half and the replies to its downloads
    (`taken`: {k: {"scores", "seconds_scoring"}}). A client that did not reply to either
    is "lost"; one whose update was not finite is "excluded"."""
    replies, downloads, uploads = opened["replies"], opened["downloads"], opened["uploads"]
    lost = sorted(set(range(len(names))) - set(replies)
                  | {k for k, msg in downloads.items() if msg and k not in taken})
    after_local = {k: rep["scores"] for k, rep in replies.items()}
    after_download = {k: taken[k]["scores"] if downloads.get(k) else s
                      for k, s in after_local.items() if k in taken or not downloads.get(k)}
    comm = {names[k]: {"up": message_bytes(uploads.get(k, {})), "down": message_bytes(msg)}
            for k, msg in downloads.items() if k in taken or not msg}
    record = {"round": opened["round"], "stage": opened["stage"], "clients": [names[k] for k in opened["chosen"]],
              "excluded": [names[k] for k, rep in replies.items() if rep["excluded"]],
              "lost": [names[k] for k in lost],
              "losses": {names[k]: {t: v for t, v in rep["losses"].items() if t != "gate"}
                         for k, rep in replies.items() if rep["losses"] is not None},
              "comm": comm,
              "seconds_local_training": round(sum(rep["seconds_local"] for rep in replies.values()), 4),
              "seconds_scoring": round(sum(rep["seconds_scoring"] for rep in (*replies.values(), *taken.values())), 4)}
    gates = {names[k]: rep["losses"]["gate"] for k, rep in replies.items()
             if rep["losses"] is not None and "gate" in rep["losses"]}
    if gates:   # the CT-MoA gate g each client's round ended with (1: the paper's mixture)
        record["gate"] = gates
    if opened["distances"] is not None:   # the K x K LoRA distances ATA saw, uploaders in order
        record["lora_distances"] = {"clients": [names[k] for k in opened["distances"][0]],
                                    "d": [[round(x, 6) for x in row] for row in opened["distances"][1]]}
    if opened["lora_weights"] is not None:   # how each client's new LoRA was mixed: itself, task mates, other tasks
        record["lora_weights"] = {names[k]: {g: round(w, 4) for g, w in mix.items()}
                                  for k, mix in opened["lora_weights"].items()}
    for point, scores in (("after_download", after_download), ("after_local", after_local)):
        record[point] = {names[k]: s["test"] for k, s in sorted(scores.items())}
        if any("val" in s for s in scores.values()):
            record.setdefault("val", {})[point] = {names[k]: s["val"] for k, s in sorted(scores.items()) if "val" in s}
    return record


def log_round(run_dir: str, record: dict, t0: float, seconds: float | None = None) -> None:
    """Complete a round's record (means, memory, seconds since t0 unless given), warn about
    the clients left out of it, and append it to <run_dir>/log.jsonl."""
    r = record["round"]
    for name in record["excluded"]:
        print(f"warning: round {r}: client {name}'s update is not finite; left out of aggregation", file=sys.stderr)
    for name in record.get("lost", []):
        print(f"warning: round {r}: client {name} did not reply; left out of this round", file=sys.stderr)
    record["mean"] = {p: mean_score(record[p]) for p in fed_mod.EVAL_POINTS}
    record["memory"] = peak_memory_mb()
    record["seconds"] = round(time.perf_counter() - t0 if seconds is None else seconds, 3)
    with open(os.path.join(run_dir, "log.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")


def write_results(cfg: "train.Config", clients, total_rounds: int, records: list[dict], last: dict, cross: dict,
                  full: dict | None) -> tuple[dict, str]:
    """<run_dir>/results.md and results.json from a run's final scores (`last`: both evaluation
    points; `cross`: on the other tasks; `full`: every test sample, or None). -> (results, the
    text of results.md)."""
    comm_total: dict[str, int] = {}
    for rec in records:
        for per in rec["comm"].values():
            for direction in ("up", "down"):
                for g, b in per[direction].items():
                    comm_total[g] = comm_total.get(g, 0) + b
    header = (f"# {cfg.fed.method}, scenario {cfg.data.scenario}, seed {cfg.seed}, {total_rounds} rounds; "
              f"headline: {train.HEADLINE}\n\n")
    table = results_table(last, cross, clients, comm_total)
    if full is not None:
        table += (f"\nRounds scored at most {cfg.fed.eval_max_samples} test samples per client (fed.eval_max_samples); the "
                  f"final states on every test sample: mean {mean_score(full):.3f} "
                  + ", ".join(f"{k} {v:.3f}" for k, v in full.items()) + "\n")
    write_atomic(os.path.join(cfg.run_dir, "results.md"), header + table)
    results = {"method": cfg.fed.method, "scenario": cfg.data.scenario, "seed": cfg.seed, "headline": train.HEADLINE,
               "own": last[train.HEADLINE], "mean": mean_score(last[train.HEADLINE]),
               **{p: {"own": last[p], "mean": mean_score(last[p]),
                      "rounds": [rec["mean"][p] for rec in records],
                      "val_mean": mean_score(records[-1]["val"][p]) if records and "val" in records[-1] else None}
                  for p in fed_mod.EVAL_POINTS},
               "cross": cross, "comm_bytes": comm_total, "rounds": [rec["mean"][train.HEADLINE] for rec in records],
               "full_test": None if full is None else {"own": full, "mean": mean_score(full)},
               "skipped_records": {c.name: c.skipped for c in clients if c.skipped}}
    write_atomic(os.path.join(cfg.run_dir, "results.json"), json.dumps(results, indent=1))
    return results, header + table


def round_line(record: dict, total: int) -> str:
    """The one line a finished round prints: mean scores at both points, wall time, and the
    time per taking-part client."""
    n = max(1, len(record["clients"]))
    return (f"round {record['round']}/{total} (stage {record['stage']}): "
            + ", ".join(f"{p} {record['mean'][p]:.3f}" for p in fed_mod.EVAL_POINTS)
            + f"; {record['seconds']:.1f} s, per client {record['seconds_local_training'] / n:.1f} s training"
            f" + {record['seconds_scoring'] / n:.1f} s scoring")
