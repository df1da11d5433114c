"""train.py -- run Pilot (or a baseline) end to end, on one machine.

    python train.py --config config.yaml
    python train.py --config config.yaml --set fed.method=fedavg --set seed=1 --set run_dir=runs/fedavg1
    python train.py --config config.yaml --resume        # continue from the last completed round
    python train.py --config config.yaml --overwrite     # replace the run that run_dir holds
    python train.py --config config.yaml --dry-run | --ask CLIENT --prompt ... | --score CLIENT --data F

The story of main(): load and check the config; lock the run_dir; load the data and check it
against the base's tokenizer (before any weight loads); on --resume, refuse a run that differs
in what defines it; build the base model and the Federation (fed.Coordinator, the protocol,
handed tools/engine.InProcess, every client on one shared model); run stage1_rounds +
stage2_rounds rounds (run_rounds: each one fed.Coordinator.communication_round), scoring every
client after its local training and after the server's download, logging and checkpointing
every round; finally score every client on the other tasks' test splits and write results.md
and results.json.

Hand-offs to tools/ (pilot, model, fed and data never import it, and no tool imports this
file: each is handed what it needs): engine.py and store.py, the clients in this process and
their state files; runs.py, the run folder, its identity, checkpoints, log and results; and
only where a config or a flag asks for them, embedded.py (model.llava "embedded", the synthetic
scenarios), sizing.py (--dry-run) and use.py (--ask, --score). The config is a tree of
dataclasses whose field names are exactly the keys of config.yaml (unknown keys, wrong types:
errors naming the key); `python train.py` (cli) turns every failure into one line, exit code 2
for config and data, 1 for a run that cannot go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import operator
import os
import re
import shutil
import sys
import tempfile
import time
import types
import typing
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
import yaml
from tqdm import tqdm

import data as data_mod
import fed as fed_mod
import model as model_mod
import pilot
from data import ConfigError, RunError
from tools import runs
from tools.engine import InProcess
from tools.store import ClientStore

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    seed: int = 0                    # every random draw derives from it (fed.derive_seed)
    run_dir: str = "runs/default"    # logs, checkpoints, results
    model: model_mod.ModelConfig = field(default_factory=model_mod.ModelConfig)
    data: data_mod.DataConfig = field(default_factory=data_mod.DataConfig)
    fed: fed_mod.FedConfig = field(default_factory=fed_mod.FedConfig)


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
            if value is None:   # `fed:` with nothing under it, or --set fed=
                raise ConfigError(f"{full}: is a section of keys and cannot be empty; set single keys, "
                                  f"e.g. --set {full}.{dataclasses.fields(tp)[0].name}=...")
            kwargs[key] = from_dict(tp, value, f"{full}.")
        else:
            kwargs[key] = _check_type(value, tp, full)
    return cls(**kwargs)


def validate(cfg: Config) -> None:
    """Every value that could only fail later fails here, before any model loads, naming the key:
    one row per key, (ok, key, what it must be). One function: the rows are a table to read top
    to bottom, and splitting it would only scatter the keys."""
    f, m, d = cfg.fed, cfg.model, cfg.data
    finite = math.isfinite
    checks = [
        (f.method in fed_mod.METHODS, "fed.method", f"one of {tuple(fed_mod.METHODS)}"),
        (f.stage1_rounds >= 0, "fed.stage1_rounds", ">= 0"),
        (f.stage2_rounds >= 0, "fed.stage2_rounds", ">= 0"),
        (f.stage1_rounds + f.stage2_rounds >= 1, "fed.stage1_rounds", "stage1_rounds + stage2_rounds >= 1"),
        (not (getattr(fed_mod.METHODS.get(f.method), "stage2", False) and f.stage2_rounds > 0 and f.stage1_rounds < 1),
         "fed.stage1_rounds", ">= 1 when stage 2 runs (it needs stage-1 adapters)"),
        (f.local_epochs >= 1, "fed.local_epochs", ">= 1"),
        (0 < f.client_fraction <= 1, "fed.client_fraction", "in (0, 1]"),
        (f.batch_size >= 1, "fed.batch_size", ">= 1"),
        (f.grad_accum >= 1, "fed.grad_accum", ">= 1"),
        (f.eval_batch_size >= 1, "fed.eval_batch_size", ">= 1"),
        (f.eval_max_samples is None or f.eval_max_samples >= 1, "fed.eval_max_samples", ">= 1 or null (every sample)"),
        *[(finite(getattr(f, k)) and getattr(f, k) >= 0, f"fed.{k}", "a finite number >= 0")
          for k in ("lr_connector", "lr_lora_stage1", "lr_lora_stage2", "weight_decay", "prox_mu",
                    "lambda_d", "lambda_d_stage2", "lambda_b", "lambda_z")],
        (finite(f.grad_clip) and f.grad_clip > 0, "fed.grad_clip", "a finite number > 0 (a negative norm flips the gradients)"),
        (0 <= f.warmup_ratio <= 1, "fed.warmup_ratio", "in [0, 1]"),
        (f.top_k is None or f.top_k >= 1, "fed.top_k", ">= 1 or null"),
        (f.ata_top_m is None or f.ata_top_m >= 0, "fed.ata_top_m", ">= 0 or null"),
        (f.ata_form in pilot.ATA_FORMS, "fed.ata_form", f"one of {tuple(pilot.ATA_FORMS)}"),
        (f.ata_tau is None or (finite(f.ata_tau) and f.ata_tau > 0), "fed.ata_tau", "a finite number > 0 or null"),
        (f.stage2_ramp_steps is None or f.stage2_ramp_steps >= 0, "fed.stage2_ramp_steps",
         ">= 0 or null (one stage-2 round's steps)"),
        (m.lora_r > 0, "model.lora_r", "> 0"),
        (finite(m.lora_alpha) and m.lora_alpha > 0, "model.lora_alpha", "a finite number > 0"),
        (0 <= m.lora_dropout < 1, "model.lora_dropout", "in [0, 1)"),
        (bool(m.lora_targets) and not {"lm_head", "embed_tokens"} & set(m.lora_targets), "model.lora_targets",
         "a non-empty list of decoder linear names, never lm_head or embed_tokens (SPEC section 2)"),
        (m.dtype in model_mod.DTYPES, "model.dtype", f"one of {sorted(model_mod.DTYPES)}"),
        (m.device == "cpu" or m.device.startswith("cuda"), "model.device", "cpu or cuda[:N]"),
        (m.embedded_pretrain_steps >= 1, "model.embedded_pretrain_steps", ">= 1"),
        (d.scenario == "manifest" or d.scenario in embedded().SCENARIOS, "data.scenario",
         lambda: f"one of {sorted(embedded().SCENARIOS) + ['manifest']}"),   # read only if it fails
        (d.manifest is None or d.scenario == "manifest", "data.manifest", "null unless data.scenario is 'manifest'"),
        (d.scenario != "manifest" or bool(d.manifest), "data.manifest", "a path when data.scenario is 'manifest'"),
        (d.clients_per_task >= 1, "data.clients_per_task", ">= 1 (a task needs clients)"),
        (d.train_per_client >= 1, "data.train_per_client", ">= 1 (a client needs data)"),
        (d.test_per_client >= 1, "data.test_per_client", ">= 1 (a client needs a test split)"),
        (d.val_per_client >= 0, "data.val_per_client", ">= 0"),
        (d.image_size >= 1, "data.image_size", ">= 1"),
        (d.max_image_side >= 1, "data.max_image_side", ">= 1"),
        (d.image_aspect_ratio in data_mod.ASPECT_RATIOS, "data.image_aspect_ratio", f"one of {data_mod.ASPECT_RATIOS}"),
        (d.num_workers >= 0, "data.num_workers", ">= 0"),
        (d.max_length >= 1, "data.max_length", ">= 1"),
        (d.max_new_tokens >= 1, "data.max_new_tokens", ">= 1"),
    ]
    for ok, key, allowed in checks:
        if not ok:
            value = operator.attrgetter(key)(cfg)
            raise ConfigError(f"{key} = {value!r}: must be {allowed() if callable(allowed) else allowed}")


def load_config(path: str, overrides: list[str]) -> Config:
    """config.yaml plus --set overrides -> a checked Config; every failure names the file or key."""
    try:
        raw = data_mod.read_yaml(path, "config") or {}
    except data_mod.DataError as e:
        raise ConfigError(str(e)) from None
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
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: {value!r} is not a YAML value") from None
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


# -----------------------------------------------------------------------------
# The federation in one process: fed.py's protocol handed the in-process engine


@dataclass
class Federation:
    """The whole federation in one process: fed.py's Coordinator (the server's side of every
    round) and the engine it is handed, tools/engine.InProcess (K clients on one shared model,
    their states in files, <run_dir>/states, one in memory at a time). The state to checkpoint
    is the engine's state files and stage, and the server's `state()`; everything random is
    derived from (seed, purpose, round, client).

    [choice] When a client is scored (SPEC 5b): every round, every method, at two points:
    `after_local` (the state after its own local training of the round, as personalised-FL
    papers score it) and `after_download` (the state the server's reply leaves it with), on
    its test split and, when it has one, its validation split."""
    coord: fed_mod.Coordinator
    engine: InProcess

    def run_round(self, r: int, progress=None) -> runs.RoundRecord:
        """Round r (fed.Coordinator.communication_round over the engine), as its log record."""
        coord = self.coord
        return runs.round_record(coord.names, coord.client_tasks, *coord.communication_round(r, self.engine, progress))


# -----------------------------------------------------------------------------
# Before any weight loads: where the base comes from, its shape, the data checked against it


def embedded():
    """tools/embedded.py, the default run's stand-ins (the embedded base, the synthetic worlds),
    imported only where a config names one of them: a real run runs on the core alone."""
    from tools import embedded as stand_ins
    return stand_ins


def base_loader(m: model_mod.ModelConfig) -> model_mod.Loader:
    """Where the base comes from: model.loader's checkpoint, or the embedded stand-in."""
    return embedded().LOADER if m.llava == "embedded" else model_mod.loader(m)


def dry_run(cfg: Config) -> str:
    """A readable size report of the configured run, no weights loaded (tools/sizing.py): sizes,
    traffic and the memory plan, then the run's work in steps and answers when its data can be
    read (a manifest that does not exist yet is said, not an error: the plan comes first)."""
    from tools import sizing   # machinery beside the core: loaded only for --dry-run
    n_tasks = 3 if cfg.data.scenario == "manifest" else len(embedded().SCENARIOS[cfg.data.scenario])
    shape = (cfg.model, base_loader(cfg.model), cfg.fed.method, n_tasks, cfg.fed.batch_size, cfg.data.max_length)
    report = sizing.size_report_text(*shape)
    if cfg.data.scenario == "manifest" and not os.path.exists(cfg.data.manifest):
        return report + (f"\n\nwork, client states: data.manifest {cfg.data.manifest} does not exist yet; run "
                         "--dry-run again once it does")
    if cfg.data.scenario == "manifest":
        clients = data_mod.load_clients(cfg.data)
    else:
        clients = embedded().synthetic_clients(cfg.data.scenario, cfg.data, cfg.seed)
    return "\n".join([report, sizing.host_report_text(sizing.size_report(*shape), clients),
                      sizing.work_report_text(cfg.fed, cfg.data.max_new_tokens, clients)])


def missing_lora_targets(cfg: model_mod.ModelConfig, source: model_mod.Loader) -> list[str]:
    """The names in model.lora_targets that match no nn.Linear of the configured LM (built on
    the meta device from its config: no weights, no download)."""
    from transformers import AutoModelForCausalLM
    config, _ = model_mod.meta_config(cfg, source)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config.text_config)
    found = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if type(m) is torch.nn.Linear}
    return [t for t in cfg.lora_targets if t not in found]


def load_data(cfg: Config):
    """The clients' data, checked against the configured base's tokenizer, before any weight
    loads: bad records, over-long samples, unknown answer words, top_k and LoRA targets."""
    if cfg.data.scenario == "manifest":
        clients = data_mod.load_clients(cfg.data, progress=True)
    else:
        clients = embedded().synthetic_clients(cfg.data.scenario, cfg.data, cfg.seed)
    n_tasks = len({c.task for c in clients})
    if cfg.fed.top_k is not None and cfg.fed.top_k > n_tasks:
        raise ConfigError(f"fed.top_k = {cfg.fed.top_k}: must be <= the number of tasks ({n_tasks})")
    source = base_loader(cfg.model)
    missing = missing_lora_targets(cfg.model, source)
    if missing:
        raise ConfigError(f"model.lora_targets: {missing} match no linear layer of the language model")
    tok, image_token_id, n_image_tokens = source.text_side(cfg.model)
    text_enc = data_mod.Encoder(tok, None, image_token_id, n_image_tokens, cfg.data.system_prompt, cfg.data.max_length)
    for warning in check_encodable(clients, text_enc, cfg.data.skip_bad_records, progress=True):
        print(f"warning: {warning}", file=sys.stderr)
    return clients


def unknown_words(tokenizer, texts: Sequence[str]) -> Counter:
    """Words (whitespace/punctuation split) that the tokenizer maps to its unknown token, with
    how often each occurs. Empty for tokenizers without an unknown token (byte-level BPE).
    Each distinct word is tokenised once, all of them in one batch."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return Counter()
    words = Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.replace(data_mod.IMAGE, " ")))
    distinct = list(words)
    ids = tokenizer(distinct, add_special_tokens=False).input_ids if distinct else []
    return Counter({w: words[w] for w, i in zip(distinct, ids) if unk in i})


def check_encodable(clients: Sequence[data_mod.ClientData], enc: data_mod.Encoder, skip_bad_records: bool = False,
                    progress: bool = False) -> list[str]:
    """Before any model loads: every sample of every split fits data.max_length (else a
    DataError naming its file and record, or, with skip_bad_records, it is left out and
    reported in the client's `skipped`), and every answer word is one the tokenizer knows
    (else a DataError listing the words; only a closed-vocabulary tokenizer has any: Llama's and
    the embedded base's fall back to bytes). Returns warnings for unknown words in prompts.
    Token lengths come from Encoder.lengths, tokenised in batches."""
    for c in clients:
        for split in ("train", "val", "test"):
            samples = getattr(c, split)
            kept = []
            for s, n in zip(samples, enc.lengths(samples, progress=progress)):
                if n <= enc.max_length:
                    kept.append(s)
                    continue
                why = f"{s.source or s.id}: {n} tokens > data.max_length {enc.max_length}"
                if not skip_bad_records:
                    raise data_mod.DataError(why)
                c.skipped.append(why)
            setattr(c, split, kept)
        if not c.train or not c.test:
            raise data_mod.DataError(f"client {c.name!r}: no {'train' if not c.train else 'test'} sample fits data.max_length")
    samples = [s for c in clients for s in c.train + c.val + c.test]
    answers = unknown_words(enc.tokenizer, [g for s in samples for _, g in s.turns])
    if answers:
        listed = ", ".join(f"{w!r} x{n}" for w, n in answers.most_common(20))
        raise data_mod.DataError(f"answers use words the model's tokenizer cannot represent ({listed}): they would train and "
                        "score as <unk>. Use a tokenizer that knows them (a byte-fallback one, as Llama's and the "
                        "embedded base's, knows every word)")
    prompts = unknown_words(enc.tokenizer, [h for s in samples for h, _ in s.turns])
    if not prompts:
        return []
    return ["prompts use words the tokenizer maps to <unk>: " + ", ".join(f"{w!r} x{n}" for w, n in prompts.most_common(20))]


# -----------------------------------------------------------------------------
# Main: the story of a run, each step a named function

def build_model(cfg: Config) -> fed_mod.Shared:
    """The base model with the method's connector and LoRA, and the encoder of its inputs: what
    every client of this process works on. The initial connector and LoRA come from one
    generator derived from the seed, so every client, in this process or on a Flower node,
    starts from the same state."""
    base = base_loader(cfg.model).base(cfg.model)
    kind = fed_mod.METHODS[cfg.fed.method].connector
    init = fed_mod.generator(cfg.seed, "init")
    connector = model_mod.build_connector(kind, base, cfg.fed.released_init, init)
    model = model_mod.build_model(base, connector, cfg.model, init)
    d = cfg.data
    enc = data_mod.Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens,
                           d.system_prompt, d.max_length, d.max_image_side, d.num_workers, d.skip_bad_records,
                           d.image_aspect_ratio)
    return fed_mod.Shared(model, base, enc, d.max_new_tokens)


def build(cfg: Config, clients=None, state_dir: str | None = None) -> Federation:
    """Data (checked first), then the base model, then the federation: its client states in
    `state_dir` (<run_dir>/states in a run; None: a temporary folder, removed with the store)."""
    clients = load_data(cfg) if clients is None else clients
    shared = build_model(cfg)
    temporary = state_dir is None
    state_dir = tempfile.mkdtemp(prefix="pilot-states-") if temporary else state_dir
    store = ClientStore(state_dir, [c.name for c in clients])
    if temporary:
        weakref.finalize(store, shutil.rmtree, state_dir, True)
    engine = InProcess(clients, cfg.fed, cfg.seed, shared, store)
    coord = fed_mod.Coordinator(cfg.fed, [c.name for c in clients], [c.task for c in clients],
                                [len(c.train) for c in clients], cfg.seed, engine.initial_adapter)
    coord.server.store = store   # the server's sums over clients read and write the store's files
    return Federation(coord, engine)


def run_rounds(cfg: Config, fedn: Federation, start: int,
               records: list[runs.RoundRecord]) -> list[runs.RoundRecord]:
    """Rounds start+1 .. total: train, score, log one JSON line, checkpoint."""
    total = fedn.coord.total_rounds
    rounds = tqdm(range(start + 1, total + 1), desc="rounds", initial=start, total=total, disable=None)
    for r in rounds:
        t0 = time.perf_counter()
        with tqdm(desc=f"round {r} local steps", leave=False, disable=None) as steps:
            try:
                record = fedn.run_round(r, progress=steps)
            except FloatingPointError as e:   # the last good checkpoint stays as it is
                raise RunError(f"stopped: {e}; the last complete round's checkpoint is in {cfg.run_dir}/ckpt") from None
        runs.log_round(cfg.run_dir, record, t0)
        rounds.write(runs.round_line(record, total))
        rounds.set_postfix(stage=record.stage, mean=f"{record.mean[fed_mod.HEADLINE]:.3f}")
        records.append(record)
        save_checkpoint(cfg, fedn, r)
    return records


def save_checkpoint(cfg: Config, fedn: Federation, r: int) -> None:
    """Round r's checkpoint (tools/runs.py): the clients' state files, the server's task
    adapters, the stage and the config."""
    store = fedn.engine.store
    runs.save_checkpoint(cfg.run_dir, r, fedn.engine.stage, {name: store.path(k) for k, name in enumerate(store.names)},
                         fedn.coord.server.state(), dataclasses.asdict(cfg))


def resume(cfg: Config, fedn: Federation) -> int:
    """--resume: the newest readable checkpoint round restored into `fedn` (its client states
    become the store's files again); -> that round, 0 if there is none."""
    found = runs.load_checkpoint(cfg.run_dir, fedn.engine.store.names, fedn.engine.state_keys)
    if found is None:
        return 0
    meta, server, files = found
    r, coord = meta["round"], fedn.coord
    if meta["stage"] == 1 and r < coord.total_rounds and coord.stage_of(r + 1) == 2:
        # stage 2 starts from the adapters sent in the last stage-1 round; this run's last
        # stage-1 round sent none, as it was then the run's last round
        raise RunError(f"fed.stage2_rounds: round {r} ended stage 1 as the last round of the run, so there "
                       "was no stage-2 handover; a run cannot add stage-2 rounds after that (start a new run)")
    fedn.engine.set_stage(meta["stage"])
    coord.server.load_state(server)
    for k, state in enumerate(files):
        fedn.engine.store.adopt(k, state.path)
    return r


def finish(cfg: Config, fedn: Federation, records: list[runs.RoundRecord]) -> dict:
    """The final scores (the last round's, each client on the other tasks' test splits, and on
    every test sample where rounds scored a subset), written as results.md and results.json."""
    engine = fedn.engine
    if records:
        last = {p: getattr(records[-1], p) for p in fed_mod.EVAL_POINTS}
    else:   # zero rounds left to run: score the states as they are
        scores = {c.name: engine.score(k)["test"] for k, c in enumerate(engine.clients)}
        last = {p: scores for p in fed_mod.EVAL_POINTS}
    cross = engine.evaluate_cross()
    full = None
    if cfg.fed.eval_max_samples is not None:   # rounds scored a subset: the final states on every test sample
        full = {c.name: engine.score(k, full=True)["test"] for k, c in enumerate(engine.clients)}
    results, text = runs.write_results(cfg, engine.clients, fedn.coord.total_rounds, records, last, cross, full)
    print(text)
    return results


def use_trained(cfg: Config, args: argparse.Namespace) -> dict:
    """--ask / --score: one client of the run in run_dir, as its last complete checkpoint left
    it, built by the same path as a resume (tools/use.py reads the checkpoint and the inputs;
    every refusal comes before any weight loads)."""
    from tools import use
    name = args.ask or args.score
    ckpt = use.trained_checkpoint(cfg.run_dir, name)
    if args.ask and args.image is not None:
        use.check_image(args.image)
    samples = use.read_records(args.data, args.images) if args.score else None
    run_cfg = from_dict(Config, ckpt.config)   # the run's own config; where it runs, this one's
    run_cfg.model.device, run_cfg.model.dtype = cfg.model.device, cfg.model.dtype
    shared = build_model(run_cfg)
    shared.max_new_tokens = cfg.data.max_new_tokens
    client = use.trained_client(ckpt, name, run_cfg.fed, run_cfg.seed, shared)
    if args.ask:
        answer = use.ask(client, args.image, args.prompt)
        print(answer)
        return {"answer": answer}
    metric = args.metric or client.data.metric
    score = model_mod.evaluate(client.model, client.enc, samples, metric, cfg.fed.eval_batch_size,
                               cfg.data.max_new_tokens, progress=True)
    result = {"client": name, "round": ckpt.round, "file": args.data, "records": len(samples), "metric": metric,
              "score": score}
    print(f"{metric} {score:.4f} on {len(samples)} records of {args.data} (client {name}, round {ckpt.round})")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last completed round")
    ap.add_argument("--overwrite", action="store_true", help="replace whatever run run_dir holds")
    ap.add_argument("--dry-run", action="store_true",
                    help="print parameters, traffic and a GPU memory estimate; load no weights")
    ap.add_argument("--verify-data", action="store_true",
                    help="also hash every image file's bytes into the run identity (default: name, size, mtime)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    use = ap.add_argument_group("use a trained client (from run_dir's last complete checkpoint)")
    use.add_argument("--ask", metavar="CLIENT", help="print CLIENT's answer to --prompt (about --image, if given)")
    use.add_argument("--image", metavar="FILE")
    use.add_argument("--prompt", metavar="TEXT")
    use.add_argument("--score", metavar="CLIENT", help="score CLIENT on the LLaVA JSON file --data")
    use.add_argument("--data", metavar="FILE.json")
    use.add_argument("--images", metavar="DIR", help="image folder of --data (default: its folder)")
    use.add_argument("--metric", choices=sorted(data_mod.METRICS), help="default: the client's metric")
    args = ap.parse_args(argv)
    if args.ask and not args.prompt:
        ap.error("--ask needs --prompt TEXT (and --image FILE to ask about a picture)")
    if args.score and not args.data:
        ap.error("--score needs --data FILE.json")
    return args


def main(argv=None) -> dict:
    """The run, as a story: config -> run_dir -> data -> (resume check) -> model -> rounds -> results.
    Failures raise ConfigError / DataError (exit 2) or RunError (exit 1); see cli()."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        report = dry_run(cfg)
        print(report)
        return {"dry_run": report}
    if args.ask or args.score:   # using what a run trained
        return use_trained(cfg, args)
    torch.backends.cuda.matmul.allow_tf32 = True   # TF32 for what runs in fp32 on Ampere+ GPUs
    torch.backends.cudnn.allow_tf32 = True
    lock = runs.claim_run_dir(cfg.run_dir, args.resume, args.overwrite)
    try:
        clients = load_data(cfg)
        runs.check_resume(cfg.run_dir, cfg, clients, args.verify_data)   # also records a fresh run's identity
        for c in clients:
            if c.skipped:
                print(f"client {c.name}: skipped {len(c.skipped)} bad records:\n  " + "\n  ".join(c.skipped),
                      file=sys.stderr)
        fedn = build(cfg, clients, os.path.join(cfg.run_dir, "states"))
        start = resume(cfg, fedn) if args.resume else 0
        records = run_rounds(cfg, fedn, start, runs.resume_log(cfg.run_dir, start))
        return finish(cfg, fedn, records)
    finally:
        lock.close()


def cli(argv=None) -> None:
    """`python train.py ...`: every failure is one line naming the file, key or record; exit
    code 2 for config and data, 1 for a run that cannot go on; --debug shows the traceback."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (ConfigError, data_mod.DataError, RunError, model_mod.CheckpointError) as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, RunError) else 2)
    except KeyboardInterrupt:
        print("interrupted: the last complete round's checkpoint is kept; continue with --resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:   # anything unforeseen still ends in one line (the traceback with --debug)
        if "--debug" in argv:
            raise
        print(f"error: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
