"""train.py -- run Pilot (or a baseline) end to end, on one machine.

    python train.py --config config.yaml
    python train.py --config config.yaml --set fed.method=fedavg --set seed=1 --set run_dir=runs/fedavg1
    python train.py --config config.yaml --resume        # continue from the last completed round
    python train.py --config config.yaml --overwrite     # replace the run that run_dir holds
    python train.py --config config.yaml --dry-run | --ask CLIENT --prompt ... | --score CLIENT --data F

The story of main(): load and check the config; lock the run_dir; load the data and check it
against the base's tokenizer (before any weight loads); on --resume, refuse a run that differs
in what defines it; build the base model and the Federation (fed.py's protocol, every client on
one shared model); run stage1_rounds + stage2_rounds rounds, scoring every client after its
local training and after the server's download, logging and checkpointing every round; finally
score every client on the other tasks' test splits and write results.md and results.json.

Hand-offs to tools/ (pilot, model, fed and data never import it): runs.py, the run folder, its
identity, checkpoints, log and results; and only where a config or a flag asks for them,
embedded.py (model.llava "embedded", the synthetic scenarios), sizing.py (--dry-run) and use.py
(--ask, --score). The config is a tree of dataclasses whose field names are exactly the
keys of config.yaml (unknown keys, wrong types: errors naming the key); `python train.py` (cli)
turns every failure into one line, exit code 2 for config and data, 1 for a run that cannot go on.
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
from tools import runs

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
    """A bad config value, file or command line: exit code 2."""


class RunError(RuntimeError):
    """A run that cannot go on (a non-finite loss, an unreadable run directory): exit code 1."""


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
         f"one of {sorted(embedded().SCENARIOS) + ['manifest']}"),
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
            raise ConfigError(f"{key} = {value!r}: must be {allowed}")


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
# The federation in one process: fed.py's protocol, every client on one shared model


class States(typing.Sequence):
    """The clients' states as a sequence, each read from (and written to) its file in the store
    when indexed: `fedn.states[k]` loads client k's state, `fedn.states[k] = state` saves it."""

    def __init__(self, store):
        self.store = store

    def __len__(self) -> int:
        return len(self.store.names)

    def __getitem__(self, k: int) -> dict:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return self.store.load(k % len(self))

    def __setitem__(self, k: int, state: dict) -> None:
        self.store.save(k % len(self), state)


class Federation(fed_mod.Coordinator):
    """The whole federation in one process: K clients (their data, and their states in files:
    tools/store.ClientStore, one state in memory at a time) on one shared model, and the
    coordinator that runs the rounds; it is its own `nodes`. The round's uploads and the
    personalised downloads are files too, which the server reads and writes key by key, so the
    host memory of a round does not grow with K (docs/cost.md). The state to checkpoint is the
    store's files, `stage` and the server's `state()`; everything random is derived from (seed,
    purpose, round, client).

    [choice] When a client is scored (SPEC 5b): every round, every method, at two points:
    `after_local` (the state after its own local training of the round, as personalised-FL
    papers score it) and `after_download` (the state the server's reply leaves it with), on
    its test split and, when it has one, its validation split."""

    def __init__(self, cfg: fed_mod.FedConfig, model: model_mod.PilotLlava, base: model_mod.Base,
                 clients: Sequence[data_mod.ClientData], enc: model_mod.Encoder, seed: int, max_new_tokens: int,
                 state_dir: str | None = None):
        from tools import store as store_mod
        self.clients, self.model, self.base, self.enc = list(clients), model, base, enc
        self.max_new_tokens = max_new_tokens
        temporary = state_dir is None   # built without a run folder (tests, notebooks): a temp one
        state_dir = tempfile.mkdtemp(prefix="pilot-states-") if temporary else state_dir
        self.store = store_mod.ClientStore(state_dir, [d.name for d in self.clients])
        if temporary:   # removed with the store (which fedn.states views share)
            weakref.finalize(self.store, shutil.rmtree, state_dir, True)
        # [choice] every client starts from the same initial state (as if broadcast by the server)
        initial = model_mod.client_state(model)
        for k in range(len(self.clients)):
            self.store.save(k, initial)
        self.initial_keys = frozenset(initial)
        self.stage = 1
        super().__init__(cfg, [d.name for d in self.clients], [d.task for d in self.clients],
                         [len(d.train) for d in self.clients], seed, fed_mod.adapter_tensors(initial, fed_mod.OWN_ADAPTER))
        self.server.store = self.store
        self.nodes = [fed_mod.Client(k, d, self.tasks, cfg, model, base, enc, seed, max_new_tokens)
                      for k, d in enumerate(self.clients)]

    @property
    def states(self) -> States:
        return States(self.store)

    @states.setter
    def states(self, states: Sequence[dict]) -> None:
        for k, state in enumerate(states):
            self.store.save(k, state)

    def run_round(self, r: int, progress=None) -> dict:
        return runs.round_record(self.names, *self.communication_round(r, self, progress))

    # `nodes`, in process: call each client in turn, its state read from and written back to its file

    def local_round(self, r: int, stage: int, chosen: Sequence[int], progress=None) -> dict[int, dict]:
        replies = {}
        for k, node in enumerate(self.nodes):
            state, replies[k] = node.local_round(self.store.load(k), r, stage, k in chosen, progress)
            self.store.save(k, state)
            if replies[k]["upload"]:   # the upload as files the server reads one tensor at a time
                replies[k]["upload"] = {g: self.store.message_file(f"up_{k}.{g}", t)
                                        for g, t in replies[k]["upload"].items()}
            del state
        return replies

    def deliver(self, r: int, downloads: dict[int, dict], handover: bool) -> dict[int, dict]:
        replies = {}
        for k, msg in downloads.items():
            if msg:
                state, _, replies[k] = self.nodes[k].take(self.store.load(k), self.stage, msg, handover)
                self.store.save(k, state)
                del state
        if handover:
            self.set_stage(2)
        return replies

    # what train.py needs for checkpoints and results

    def set_stage(self, stage: int) -> None:
        """Give the shared model the connector structure of `stage`; used when stage 2 starts
        and when resuming in stage 2."""
        self.nodes[0].structure(stage)
        self.stage = stage

    def state_keys(self, stage: int) -> set[str]:
        """The key set of a client state in `stage` (to check a checkpoint before loading it)."""
        keys = set(self.initial_keys)
        if stage == 2:
            keys = {k for k in keys if pilot.is_lora(k)} | {f"connector.{n}" for n in self.nodes[0].ctmoa_shell().state_dict()}
        return keys

    def train_client(self, k: int, r: int, stage: int, progress=None) -> dict[str, float]:
        """Client k's local training of round r (its trained state is left in the shared model)."""
        return self.nodes[k].train(self.store.load(k), r, stage, progress)

    def score(self, k: int, full: bool = False) -> dict[str, float]:
        return self.nodes[k].score(self.store.load(k), self.stage, full)

    def evaluate_cross(self) -> dict[str, dict[str, float]]:
        """Each client on every other task's test splits (what it learned from other tasks).
        Answers are judged against the other clients' phrasing, so this is a lower bound."""
        out = {}
        for k, client in enumerate(self.clients):
            self.nodes[k].structure(self.stage)
            model_mod.load_client_state(self.model, self.store.load(k))
            out[client.name] = {}
            for task in self.tasks:
                if task == client.task:
                    continue
                others = [o for o in self.clients if o.task == task]
                samples = [s for o in others for s in fed_mod.eval_subset(o.test, self.cfg.eval_max_samples, self.seed,
                                                                   o.name, "test")]
                out[client.name][task] = model_mod.evaluate(self.model, self.enc, samples, others[0].metric,
                                                  self.cfg.eval_batch_size, self.max_new_tokens)
        return out


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
    shape = (cfg.model, cfg.fed.method, n_tasks, cfg.fed.batch_size, cfg.data.max_length)
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


def llava_15_7b_config():
    """LLaVA-1.5-7B's shape (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 + Vicuna-7B v1.5."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14, projection_dim=768)
    tc = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_id=32000, image_seq_length=576)


def meta_config(cfg: model_mod.ModelConfig, source: model_mod.Loader):
    """The LlavaConfig a run would load from `source`, without weights or downloads: a local (or
    already cached) checkpoint's config (the embedded recipe's), else LLaVA-1.5-7B's built-in shape."""
    try:
        return source.config(cfg)
    except (OSError, ValueError):
        if cfg.llava == "embedded":
            raise
        return llava_15_7b_config(), "built-in LLaVA-1.5-7B shape (checkpoint config not available offline)"


def missing_lora_targets(cfg: model_mod.ModelConfig, source: model_mod.Loader) -> list[str]:
    """The names in model.lora_targets that match no nn.Linear of the configured LM (built on
    the meta device from its config: no weights, no download)."""
    from transformers import AutoModelForCausalLM
    config, _ = meta_config(cfg, source)
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
    text_enc = model_mod.Encoder(tok, None, image_token_id, n_image_tokens, cfg.data.system_prompt, cfg.data.max_length)
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


def check_encodable(clients: Sequence[data_mod.ClientData], enc: model_mod.Encoder, skip_bad_records: bool = False,
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

HEADLINE = "after_local"   # [choice] the score the README and results.json's "mean" report; see README


def build_model(cfg: Config):
    """-> (model, base, encoder): the base model with the method's connector and LoRA. The
    initial connector and LoRA come from one generator derived from the seed, so every
    client, in this process or on a Flower node, starts from the same state."""
    base = base_loader(cfg.model).base(cfg.model)
    kind = fed_mod.METHODS[cfg.fed.method].connector
    init = fed_mod.generator(cfg.seed, "init")
    connector = model_mod.build_connector(kind, base, cfg.fed.released_init, init)
    model = model_mod.build_model(base, connector, cfg.model, init)
    d = cfg.data
    enc = model_mod.Encoder(base.tokenizer, base.image_processor, base.image_token_id, base.n_image_tokens,
                           d.system_prompt, d.max_length, d.max_image_side, d.num_workers, d.skip_bad_records,
                           d.image_aspect_ratio)
    return model, base, enc


def build(cfg: Config, clients=None, state_dir: str | None = None) -> Federation:
    """Data (checked first), then the base model, then the federation (its client states in
    `state_dir`, <run_dir>/states in a run; None: a temporary folder)."""
    clients = load_data(cfg) if clients is None else clients
    model, base, enc = build_model(cfg)
    return Federation(cfg.fed, model, base, clients, enc, cfg.seed, cfg.data.max_new_tokens, state_dir)


def run_rounds(cfg: Config, fedn: Federation, start: int, records: list[dict]) -> list[dict]:
    """Rounds start+1 .. total: train, score, log one JSON line, checkpoint."""
    rounds = tqdm(range(start + 1, fedn.total_rounds + 1), desc="rounds", initial=start,
                  total=fedn.total_rounds, disable=None)
    for r in rounds:
        t0 = time.perf_counter()
        with tqdm(desc=f"round {r} local steps", leave=False, disable=None) as steps:
            try:
                record = fedn.run_round(r, progress=steps)
            except FloatingPointError as e:   # the last good checkpoint stays as it is
                raise RunError(f"stopped: {e}; the last complete round's checkpoint is in {cfg.run_dir}/ckpt") from None
        runs.log_round(cfg.run_dir, record, t0)
        rounds.write(runs.round_line(record, fedn.total_rounds))
        rounds.set_postfix(stage=record["stage"], mean=f"{record['mean'][HEADLINE]:.3f}")
        records.append(record)
        runs.save_checkpoint(cfg.run_dir, r, fedn, cfg)
    return records


def finish(cfg: Config, fedn: Federation, records: list[dict]) -> dict:
    """The final scores (the last round's, each client on the other tasks' test splits, and on
    every test sample where rounds scored a subset), written as results.md and results.json."""
    if records:
        last = {p: records[-1][p] for p in fed_mod.EVAL_POINTS}
    else:   # zero rounds left to run: score the states as they are
        scores = {c.name: fedn.score(k)["test"] for k, c in enumerate(fedn.clients)}
        last = {p: scores for p in fed_mod.EVAL_POINTS}
    cross = fedn.evaluate_cross()
    full = None
    if cfg.fed.eval_max_samples is not None:   # rounds scored a subset: the final states on every test sample
        full = {c.name: fedn.score(k, full=True)["test"] for k, c in enumerate(fedn.clients)}
    results, text = runs.write_results(cfg, fedn.clients, fedn.total_rounds, records, last, cross, full)
    print(text)
    return results


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
    if args.ask or args.score:   # using what a run trained: handed to tools/use.py
        from tools import use
    if args.ask:
        answer = use.ask(cfg, args.ask, args.image, args.prompt)
        print(answer)
        return {"answer": answer}
    if args.score:
        result = use.score_file(cfg, args.score, args.data, args.images, args.metric)
        print(f"{result['metric']} {result['score']:.4f} on {result['records']} records of {args.data} "
              f"(client {args.score}, round {result['round']})")
        return result
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
        start = runs.load_checkpoint(cfg.run_dir, fedn) if args.resume else 0
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
    # run as the module `train`, the one tools/ import, so that their ConfigError is this cli's
    import train
    train.cli()
