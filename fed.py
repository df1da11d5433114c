"""fed.py -- the federated protocol of Pilot (SPEC section 5): clients, server, rounds.

Every round, each sampled client trains locally (on a model it is given: one shared instance
in process, its state swapped in and out), is scored `after_local`, and uploads {group: {name:
tensor}}: its task adapter psi_t (h_0 in stage 2) and its LoRA, never psi_s, psi_c or the
router (make_upload). The server averages task adapters per task (pilot.task_average), mixes
LoRA per client by ATA (one personalised LoRA each) and sends back each client's LoRA and the
task adapters it needs; the client takes them (apply_download) and is scored `after_download`.
Stage 1 (`stage1_rounds`) uses the TaskClientConnector; stage 2 the CT-MoA, which each client
builds from its stage-1 connector and the T task adapters of the last stage-1 round's message.

Client is one client's side of a round, Coordinator the server's; the Coordinator is handed an
Engine that carries its two calls a round to the clients and back (tools/engine.InProcess in
one process, tools/flower_app.GridNodes on Flower), and both engines answer with the same typed
replies (Reply, Taken), from which tools/runs.py makes the log's record. Methods
(`fed.method`): pilot and the baselines and ablations of SPEC section 6, each a row of METHODS
saying what it changes. Every random draw comes from a generator seeded by (seed, purpose,
round, client) (derive_seed), so a run is a function of its seed and resumes exactly. This file
imports pilot, model and data, nothing above them.

Shape legend: K clients, T tasks, B batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

import data as data_mod
import model as model_mod
import pilot


# -----------------------------------------------------------------------------
# Methods: what each one changes


@dataclass(frozen=True)
class Method:
    connector: str = "stage1"   # "stage1": psi_t + psi_s (Pilot) | "plain": one LLaVA projector
    shares: str = "pilot"       # what travels: "pilot" task adapter + LoRA | "model" projector + LoRA | "nothing"
    lora: str = "ata"           # the server's LoRA rule for "pilot": "ata" | "fedavg" | "task" (FedAvg within a task)
    stage2: bool = True         # the CT-MoA after stage1_rounds
    difference: bool = True     # the difference loss in stage 1 (lambda_d)
    prox: bool = False          # FedProx's (mu/2)||w - w_global||^2 in the local loss


BASELINE = Method(connector="plain", shares="model", stage2=False)   # one LLaVA projector + LoRA
METHODS = {
    "pilot": Method(),
    "local": dataclasses.replace(BASELINE, shares="nothing"),        # no communication
    "fedavg": BASELINE,                                               # sample-weighted mean of everything trainable
    "fedprox": dataclasses.replace(BASELINE, prox=True),
    "pilot_no_diff": Method(difference=False),                        # lambda_d = 0
    "pilot_no_moa": Method(stage2=False),                             # stage 1 for all the rounds
    "pilot_fedavg_lora": Method(lora="fedavg"),                       # FedAvg instead of ATA for LoRA
    "pilot_task_oracle": Method(lora="task"),                         # LoRA averaged within each task
}

# -----------------------------------------------------------------------------
# Config (keys of the `fed:` section of config.yaml)


@dataclass
class FedConfig:
    method: str = "pilot"            # a key of METHODS
    stage1_rounds: int = 3           # paper: stage 1 warms up once (1 round at 7B)
    stage2_rounds: int = 3           # paper: 3 rounds
    local_epochs: int = 4            # paper: 1
    client_fraction: float = 1.0     # fraction of clients sampled each round
    batch_size: int = 8              # paper: 16 x 2 accumulation per GPU
    grad_accum: int = 1              # micro-batches per optimizer step
    lr_connector: float = 3e-3       # paper: 2e-5
    lr_lora_stage1: float = 3e-3     # paper: 2e-5
    lr_lora_stage2: float = 3e-3     # paper: 4e-5
    warmup_ratio: float = 0.03       # paper: 3%, cosine schedule
    weight_decay: float = 0.0        # paper: 0
    grad_clip: float = 1.0
    lambda_d: float = 0.1            # difference loss, stage 1 (released script: 0.1)
    lambda_d_stage2: float = 0.0     # difference loss psi_s vs h_0 in stage 2 (SPEC: default 0)
    lambda_b: float = 0.1            # balance loss (released script: 0.1)
    lambda_z: float = 0.01           # router z-loss (released script: 0.01)
    top_k: int | None = None         # CT-MoA experts per token; null = T (dense, released script)
    ata_form: str = "spread"         # ATA weights from the distances: spread | kernel, top_m (earlier forms)
    ata_tau: float | None = None     # ATA temperature; null: the form's default (spread 0.25, others 1)
    ata_top_m: int | None = None     # ATA neighbours M; null (or > K-1) = all other clients
    stage2_ramp_steps: int | None = None   # CT-MoA gate g: 0 -> 1 over this many stage-2 steps; null: one round's; 0: g = 1
    prox_mu: float = 0.01            # fedprox only
    released_init: bool = False      # psi_s starts as a copy of the projector (released code)
    eval_batch_size: int = 32
    eval_max_samples: int | None = None   # samples scored per client, split and evaluation point (null: all)


def derive_seed(seed: int, purpose: str, *keys) -> int:
    """A 63-bit seed for one purpose ("data", "sample", "init", ...) at one round / client."""
    h = hashlib.sha256(repr((seed, purpose) + keys).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def generator(seed: int, purpose: str, *keys) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *keys))


# -----------------------------------------------------------------------------
# A client's state: its layout, and where each received task adapter goes
#
# What a client owns is model.client_state's business (its whole connector + its LoRA, as
# {client-state name: tensor}). This section is the one place that maps wire names to
# client-state names; pilot.expert_tasks orders the CT-MoA's experts and pilot.expert_slot
# places each one.

OWN_ADAPTER = "connector.psi_t."        # psi_t, the own task's adapter in stage 1
MOA = "connector.moa."                  # the stage-2 connector's CT-MoA: expert i's adapter at MOA + expert_slot(i)
PROJECTOR = "connector.projector."      # the baselines' single LLaVA projector


def adapter_prefix(own_task: str, tasks: Sequence[str], task: str) -> str:
    """Client-state prefix of `task`'s global adapter for a client of `own_task` in stage 2:
    expert i of pilot.expert_tasks sits in the CT-MoA at pilot.expert_slot(i) (h_0 for its own)."""
    return f"{MOA}{pilot.expert_slot(pilot.expert_tasks(tasks, own_task).index(task))}."


def own_adapter(state: dict[str, torch.Tensor]) -> str:
    """Where a client state holds its own task's adapter: psi_t in stage 1, the CT-MoA's h_0
    (MOA + "psi_t.") in stage 2."""
    return MOA + "psi_t." if any(k.startswith(MOA) for k in state) else OWN_ADAPTER


def adapter_tensors(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The Adapter state_dict (linear_1.*, linear_2.*) stored under `prefix` in a client state."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def lora_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's LoRA factors, under their client-state names (the wire names of LoRA)."""
    return {k: v for k, v in state.items() if pilot.is_lora(k)}


# -----------------------------------------------------------------------------
# Messages: exactly what travels, {group: {name: tensor}}

Message = dict[str, dict[str, torch.Tensor]]   # groups: "lora", "projector", "task_adapter.<task>"


def make_upload(method: str, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A client's message to the server (SPEC section 5). Pilot's methods: its task adapter psi_t
    (h_0 in stage 2) and its LoRA; fedavg/fedprox: the projector and LoRA; local: nothing.
    psi_s, psi_c, the gate and the router never leave the client."""
    shares = METHODS[method].shares
    if shares == "nothing":
        return {}
    if shares == "model":
        return {"projector": adapter_tensors(state, PROJECTOR), "lora": lora_tensors(state)}
    return {"task_adapter": adapter_tensors(state, own_adapter(state)), "lora": lora_tensors(state)}


def received_adapters(msg: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """{task: Adapter state} of the task adapters in a server message."""
    return {g.split(".", 1)[1]: t for g, t in msg.items() if g.startswith("task_adapter.")}


def apply_download(state: dict[str, torch.Tensor], msg: dict[str, dict[str, torch.Tensor]],
                   own_task: str, tasks: Sequence[str], stage: int) -> dict[str, torch.Tensor]:
    """A client's state after taking the server's message: LoRA and the projector by name; its
    own task's adapter into psi_t (h_0); in stage 2 every other task's adapter into its frozen
    expert (adapter_prefix). In stage 1 a client has no place for other tasks' adapters: the
    caller builds the stage-2 state from them first (Client.take, at the handover)."""
    state = dict(state)

    def put(prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            if prefix + k not in state:
                raise KeyError(f"download key {k} has no place {prefix + k} in the client state")
            state[prefix + k] = v.clone()

    for group, tensors in msg.items():
        if group == "lora":
            put("", tensors)
        elif group == "projector":
            put(PROJECTOR, tensors)
        elif not group.startswith("task_adapter."):
            raise KeyError(f"unknown message group {group!r}")
    for task, tensors in received_adapters(msg).items():
        if task == own_task:
            put(own_adapter(state), tensors)
        elif stage == 2:
            put(adapter_prefix(own_task, tasks, task), tensors)
    return state


# -----------------------------------------------------------------------------
# Server


class LoraMix(NamedTuple):
    """How a round's personalised LoRA were mixed: the uploaders `ids` (K'), the (K', K')
    mixing matrix W and the LoRA distances d it came from (what the log shows of ATA)."""
    ids: list[int]
    W: torch.Tensor
    d: torch.Tensor


class Aggregate(NamedTuple):
    """What one round's aggregation gives: the downloads, and (Pilot's methods) how LoRA was mixed."""
    downloads: dict[int, Message]   # {client: message}
    mix: LoraMix | None


def mix_shares(W: torch.Tensor, tasks: Sequence[str]) -> list[dict[str, float]]:
    """Row i of the mixing matrix W (K', K') summed as the log shows it: the weight of client
    i's own LoRA, of its task mates' and of the other tasks' clients (tasks[j]: client j's)."""
    return [{"self": W[i, i].item(),
             "same_task": sum(W[i, j].item() for j in range(len(tasks)) if j != i and tasks[j] == tasks[i]),
             "other_tasks": sum(W[i, j].item() for j in range(len(tasks)) if tasks[j] != tasks[i])}
            for i in range(len(tasks))]


class Server:
    """Holds the global task adapters; aggregates uploads into per-client downloads by the
    method's rule (Method.shares: `nothing`, `model` for FedAvg, `pilot`). Tensor arithmetic
    over the messages: it never sees data or anything else."""

    def __init__(self, method: str, tasks: Sequence[str], n_samples: Sequence[int], ata_top_m: int | None,
                 ata_form: str = "spread", ata_tau: float | None = None):
        self.method, self.tasks, self.n_samples = METHODS[method], list(tasks), list(n_samples)
        self.ata_top_m, self.ata_form, self.ata_tau = ata_top_m, ata_form, ata_tau
        self.task_adapters: dict[str, dict[str, torch.Tensor]] = {}
        # Where the sums over clients are computed: None, in memory (pilot.gram_matrix,
        # pilot.weighted_averages); or an object with gram(states) -> (K, K) and mix(states, W,
        # names) -> the K' states (names: a message per row, the personalised LoRA; None: the
        # task adapters): tools/store.ClientStore, which reads and writes files key by key in
        # row blocks, so the server's memory does not grow with K.
        self.store = None

    def aggregate(self, uploads: dict[int, Message], all_tasks: bool) -> Aggregate:
        """uploads {client: message} -> the downloads, by the method's rule. `all_tasks`: send
        every task's adapter (the handover round, the last of stage 1, and every stage-2 round)."""
        rule = {"nothing": self.keep_local, "model": self.fedavg, "pilot": self.pilot}[self.method.shares]
        return rule(uploads, all_tasks)

    def keep_local(self, uploads: dict[int, Message], all_tasks: bool) -> Aggregate:
        """local: nothing travels, each uploader gets an empty message."""
        return Aggregate({k: {} for k in sorted(uploads)}, None)

    def fedavg(self, uploads: dict[int, Message], all_tasks: bool) -> Aggregate:
        """fedavg/fedprox: the sample-weighted mean of the projector and of LoRA, sent to every
        client (one not sampled this round would fetch it when next sampled)."""
        ids = sorted(uploads)
        if not ids:
            return Aggregate({}, None)
        n = [self.n_samples[k] for k in ids]
        w = torch.tensor(n, dtype=torch.float32) / sum(n)
        glob = {"lora": pilot.weighted_average([uploads[k]["lora"] for k in ids], w),
                "projector": pilot.weighted_average([uploads[k]["projector"] for k in ids], w)}
        return Aggregate({k: glob for k in range(len(self.tasks))}, None)

    def pilot(self, uploads: dict[int, Message], all_tasks: bool) -> Aggregate:
        """Pilot (SPEC section 5): task-aware visual aggregation (global psi_t per task, by
        pilot.task_average; tasks with no upload keep theirs) and adaptive text aggregation (one
        personalised LoRA per uploading client, by lora_mix). The task adapters go to EVERY
        client, as one not sampled would fetch them when next sampled; a personalised LoRA only
        to the client that uploaded one. [choice] stage 1 sends a client its own task's adapter;
        `all_tasks` sends all T."""
        ids = sorted(uploads)
        personal, mix = {}, None
        if ids:
            n = [self.n_samples[k] for k in ids]
            average = None if self.store is None else (lambda states, w: self.store.mix(states, w[None])[0])
            self.task_adapters.update(pilot.task_average([uploads[k]["task_adapter"] for k in ids], n,
                                                         [self.tasks[k] for k in ids], average))
            loras = [uploads[k]["lora"] for k in ids]
            W, d = self.lora_mix(ids, loras)
            if self.store is None:
                personal = dict(zip(ids, pilot.weighted_averages(loras, W)))
            else:   # the same sums, written as they come: no K' LoRA states in memory
                personal = dict(zip(ids, self.store.mix(loras, W, [f"down_{k}.lora" for k in ids])))
            mix = LoraMix(ids, W, d)
        downloads = {}
        for k in range(len(self.tasks)):
            wanted = sorted(self.task_adapters) if all_tasks else [self.tasks[k]]
            downloads[k] = {f"task_adapter.{t}": self.task_adapters[t] for t in wanted}
            if k in personal:
                downloads[k]["lora"] = personal[k]
        return Aggregate(downloads, mix)

    def lora_mix(self, ids: list[int], loras: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, d) over the uploading clients `ids`, both (K', K'): the LoRA distances d and the
        mixing weights from them, by the method's rule: ATA (pilot), FedAvg weights
        (pilot_fedavg_lora), or the task oracle, FedAvg within each task (pilot_task_oracle;
        the server knows every client's task, as task_average needs)."""
        n = torch.tensor([float(self.n_samples[k]) for k in ids])               # (K',)
        d = pilot.pairwise_distances(loras, None if self.store is None else self.store.gram(loras))   # (K', K')
        if self.method.lora == "fedavg":
            return (n / n.sum()).expand(len(ids), len(ids)), d
        if self.method.lora == "task":
            same = torch.tensor([[self.tasks[j] == self.tasks[k] for j in ids] for k in ids])   # (K', K')
            W = same * n
            return W / W.sum(dim=1, keepdim=True), d
        return pilot.ata(d, n.tolist(), self.ata_form, self.ata_top_m, self.ata_tau), d

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{t}/{k}": v for t, s in self.task_adapters.items() for k, v in s.items()}

    def load_state(self, flat: dict[str, torch.Tensor]) -> None:
        self.task_adapters = {}
        for key, v in flat.items():
            t, k = key.split("/", 1)
            self.task_adapters.setdefault(t, {})[k] = v


# -----------------------------------------------------------------------------
# Local training: optimiser, schedule, batches, then the step loop alone (scoring: model.evaluate)


def total_loss(out: model_mod.Output, weights: dict[str, float]) -> torch.Tensor:
    """L = L_ce + sum_k lambda_k L_k over the connector's auxiliary losses."""
    return out.ce + sum(weights[k] * out.aux[k] for k in pilot.AUX_KEYS)


def make_optimizer(model: model_mod.PilotLlava, cfg: FedConfig, lr_lora: float):
    """AdamW over the trainable parameters, connector and LoRA with their own learning rates.
    [choice] A fresh optimiser every round (AdamW's moments are not carried across rounds,
    as in FedIT-style federated LoRA; carrying them would be client state that the server's
    download makes stale)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not pilot.is_lora(n)], "lr": cfg.lr_connector},
              {"params": [p for n, p in params if pilot.is_lora(n)], "lr": lr_lora}]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay), [p for _, p in params]


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    """Linear warmup over round(warmup_ratio * steps) steps, then cosine to 0 (paper: 3%).
    [choice] The schedule restarts every round, over that round's local steps."""
    warm = int(round(warmup_ratio * steps))

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def plan_batches(n: int, cfg: FedConfig, gen: torch.Generator) -> list[list[list[int]]]:
    """The round's optimiser steps, each a list of micro-batches of sample indices. Epoch by
    epoch: a fresh permutation, cut into micro-batches of batch_size (the last may be
    smaller), grouped grad_accum at a time. No step is empty and no micro-batch straddles two
    epochs: epochs x ceil(ceil(n / batch_size) / grad_accum) steps."""
    steps = []
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=gen).tolist()
        micro = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        steps += [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
    return steps


def steps_per_round(n: int, cfg: FedConfig) -> int:
    """Optimiser steps in a local round over n samples: plan_batches' count."""
    return cfg.local_epochs * math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum)


class LocalSettings(NamedTuple):
    """How a client trains in one round: the config's schedule and sizes, and what its stage
    and method set (Client.settings builds it)."""
    cfg: FedConfig                           # epochs, batch size, accumulation, connector lr, warmup, decay, clip
    lr_lora: float                           # the stage's LoRA learning rate
    loss_weights: dict[str, float]           # lambda of each of pilot.AUX_KEYS
    prox_mu: float = 0.0                     # FedProx's mu (0: no proximal term)
    after_step: Callable[[int], None] | None = None   # called after optimiser step s (0-based): the gate ramp


def local_train(model: model_mod.PilotLlava, enc: data_mod.Encoder, samples: Sequence[data_mod.Sample],
                settings: LocalSettings, gen: torch.Generator, *, where: str = "", skipped: list[str] | None = None,
                progress=None) -> dict[str, float]:
    """One client's local epochs on the shared model (its state already loaded), drawing the
    batch order from `gen`. Returns the mean of each loss term over the steps, and the number
    of steps. Batches come from a DataLoader (data.load_batches) in the plan's order, so
    workers change nothing but speed; a record skipped there is added to `skipped`; `where`
    names the client and round in an error."""
    cfg, prox_mu, after_step = settings.cfg, settings.prox_mu, settings.after_step
    model.train()
    plan = plan_batches(len(samples), cfg, gen)
    opt, params = make_optimizer(model, cfg, settings.lr_lora)
    sched = cosine_schedule(opt, len(plan), cfg.warmup_ratio)
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None   # w_global (fedprox)
    sums = dict.fromkeys(("loss", "ce", *pilot.AUX_KEYS, "prox"), 0.0)
    dev = next(model.lm.parameters()).device
    batches = data_mod.load_batches(enc, samples, [m for step in plan for m in step], dev, skipped=skipped)
    for step, micro in enumerate(plan):
        for _ in micro:
            batch, _ = next(batches)
            if batch is None:   # every picture of this micro-batch failed to decode (skip_bad_records)
                continue
            with model_mod.autocast(model):
                out = model(**batch)
                loss = total_loss(out, settings.loss_weights)
            terms = {"ce": out.ce, **out.aux}
            if anchor is not None:
                terms["prox"] = pilot.prox_term(params, anchor, prox_mu)
                loss = loss + terms["prox"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at {where} step {step}")
            (loss / len(micro)).backward()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] += v.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
        if progress is not None:
            progress.set_postfix_str(f"{where} loss {sums['loss'] / (step + 1):.3f}", refresh=False)
            progress.update(1)
    return {k: v / len(plan) for k, v in sums.items()} | {"steps": len(plan)}


def eval_subset(samples: Sequence[data_mod.Sample], n: int | None, seed: int, client: str,
                split: str) -> list[data_mod.Sample]:
    """[choice] fed.eval_max_samples: the n samples of a split that every round scores, drawn
    once from (seed, client, split) alone, so every method, round and resume scores the same
    ones (in their file order). None, or n >= the split, means the whole split."""
    if n is None or n >= len(samples):
        return list(samples)
    pick = torch.randperm(len(samples), generator=generator(seed, "eval-subset", client, split))[:n]
    return [samples[i] for i in sorted(pick.tolist())]


# -----------------------------------------------------------------------------
# What a round sends back: a client's replies, and the round so far
#
# The protocol's two halves, a client's (Client) and the server's (Coordinator), meet through
# an Engine in two calls a round: local_round -> {k: Reply}, deliver -> then taken() -> {k: Taken}.
# Both engines build these same types; the log's record (tools/runs.RoundRecord) is made from them.

EVAL_POINTS = ("after_download", "after_local")
HEADLINE = "after_local"   # [choice] the score the README and results.json's "mean" report; see README


class Reply(NamedTuple):
    """A client's reply to a round's instruction (Client.local_round)."""
    scores: dict[str, float]         # {"test": ..., "val": ...}: its state after local training ("after_local")
    losses: dict[str, float] | None  # mean loss terms over its steps, "steps" (and "gate" in stage 2); None: not chosen
    upload: Message | None           # make_upload's message; None: nothing to aggregate
    excluded: bool                   # it trained, but the result was not finite: its previous state is kept
    seconds_local: float
    seconds_scoring: float


class Taken(NamedTuple):
    """A client's reply to its download (Client.take): the state it is left with, scored ("after_download")."""
    scores: dict[str, float]
    seconds_scoring: float


@dataclass
class Opened:
    """The first half of round r (Coordinator.train_and_aggregate): who was chosen, what came
    back, and the downloads to deliver."""
    round: int
    stage: int
    chosen: list[int]
    handover: bool                   # the last stage-1 round: its downloads start stage 2
    replies: dict[int, Reply]        # every client that replied
    uploads: dict[int, Message]
    agg: Aggregate


# -----------------------------------------------------------------------------
# The engine: how the protocol reaches its clients


class Engine(Protocol):
    """What carries the protocol's two calls a round to the clients and back; the Coordinator
    is handed one. tools/engine.InProcess calls each Client in turn in this process (a state
    file each); tools/flower_app.GridNodes sends ONE Flower message per client and round (round
    r's download rides with round r+1's instruction). A client missing from a reply did not
    take part."""

    def local_round(self, r: int, stage: int, chosen: Sequence[int], progress=None) -> dict[int, Reply]:
        """Every reachable client trains if chosen, is scored `after_local` and replies
        (Client.local_round)."""

    def deliver(self, r: int, downloads: dict[int, Message], handover: bool) -> None:
        """Round r's downloads handed to their clients (Client.take)."""

    def taken(self) -> dict[int, Taken]:
        """The replies to the downloads last delivered, once they are back: in process at once,
        on Flower with the next message (round r+1's local_round, or the final one)."""


# -----------------------------------------------------------------------------
# A client's side of a round


@dataclass
class Shared:
    """What the clients of one process work on, built once (train.build_model): the model (one
    instance; a client's state is swapped in and out), its base (shapes), the encoder of its
    inputs and the longest answer to generate. The stage-1 connector module is kept to put
    back for stage-1 work, as the model may hold a CT-MoA."""
    model: model_mod.PilotLlava
    base: model_mod.Base
    enc: data_mod.Encoder
    max_new_tokens: int
    stage1_connector: torch.nn.Module | None = None

    def __post_init__(self):
        if self.stage1_connector is None:
            self.stage1_connector = self.model.connector
        if isinstance(self.stage1_connector, pilot.Stage2Connector):
            raise ValueError("Shared needs the model's stage-1 connector (pass stage1_connector)")


class Client:
    """One client's side of a round, on the model it is given (Shared: one for all clients in
    process; the node's own on Flower). Storage-free: every call takes the client's state and
    returns the new one, so the engine decides where the state lives (a file in process, the
    node's context on Flower). Its replies hold scores, losses and the upload, never the state."""

    def __init__(self, k: int, data: data_mod.ClientData, tasks: Sequence[str], cfg: FedConfig, seed: int,
                 shared: Shared):
        self.k, self.data, self.tasks, self.cfg, self.seed, self.shared = k, data, list(tasks), cfg, seed, shared
        self.model, self.base, self.enc = shared.model, shared.base, shared.enc

    def ctmoa_shell(self) -> pilot.Stage2Connector:
        """A stage-2 connector of this run's shape built on the meta device: no value is drawn or
        stored (170M parameters at 7B), for the key names or for a client state to fill."""
        cfg, b = self.cfg, self.base
        with torch.device("meta"):
            return pilot.Stage2Connector(b.vision_width, b.llm_width, len(self.tasks), cfg.top_k, cfg.lambda_d_stage2 > 0)

    def structure(self, stage: int) -> None:
        """Give the model the connector structure of `stage`; its values come from the client
        state loaded next (load_client_state sets every tensor of it). The first client to reach
        stage 2 builds the CT-MoA for all."""
        is_moa = isinstance(self.model.connector, pilot.Stage2Connector)
        if stage == 2 and not is_moa:
            self.model.set_connector(self.ctmoa_shell().to_empty(device=next(self.model.lm.parameters()).device))
        elif stage == 1 and is_moa:
            self.model.set_connector(self.shared.stage1_connector)

    def loss_weights(self, stage: int) -> dict[str, float]:
        cfg = self.cfg
        if stage == 1:
            return {"difference": cfg.lambda_d if METHODS[cfg.method].difference else 0.0,
                    "balance": 0.0, "router_z": 0.0}
        return {"difference": cfg.lambda_d_stage2, "balance": cfg.lambda_b, "router_z": cfg.lambda_z}

    def gate_ramp(self):
        """[choice] The CT-MoA gate's schedule: g = min(1, s / R) after the client's s-th
        stage-2 optimiser step, R = fed.stage2_ramp_steps (null: one round's steps, so the first
        stage-2 round ramps and every later one is the paper's formula exactly). The ramp's
        progress is kept in the gate itself (s = round(g R)), so it survives checkpoints,
        resumes and rounds the client sits out. -> after_step for local_train, or None (R = 0)."""
        R = self.cfg.stage2_ramp_steps
        R = steps_per_round(len(self.data.train), self.cfg) if R is None else R
        if R == 0:
            return None
        gate = self.model.connector.gate
        done = round(gate.item() * R)                  # stage-2 steps before this round
        return lambda step: gate.fill_(min(1.0, (done + step + 1) / R))

    def settings(self, stage: int) -> LocalSettings:
        """How this client trains in a round of `stage` (call after structure(stage): the ramp reads the gate)."""
        cfg = self.cfg
        return LocalSettings(cfg, cfg.lr_lora_stage1 if stage == 1 else cfg.lr_lora_stage2, self.loss_weights(stage),
                             cfg.prox_mu if METHODS[cfg.method].prox else 0.0, self.gate_ramp() if stage == 2 else None)

    def train(self, state: dict[str, torch.Tensor], r: int, stage: int, progress=None) -> dict[str, float]:
        """Local training of round r from `state`; the trained state is left in the model. In
        stage 2 the losses carry the gate g the round ended with."""
        self.structure(stage)
        model_mod.load_client_state(self.model, state)
        dev = next(self.model.lm.parameters()).device
        pilot.set_dropout_generator(self.model, torch.Generator(dev).manual_seed(derive_seed(self.seed, "dropout", r, self.k)))
        try:
            losses = local_train(self.model, self.enc, self.data.train, self.settings(stage),
                                 generator(self.seed, "data", r, self.k), where=f"client {self.data.name} round {r}",
                                 skipped=self.data.skipped, progress=progress)
        finally:
            pilot.set_dropout_generator(self.model, None)
        if stage == 2:
            losses["gate"] = self.model.connector.gate.item()
        return losses

    def local_round(self, state: dict[str, torch.Tensor], r: int, stage: int, chosen: bool,
                    progress=None) -> tuple[dict[str, torch.Tensor], Reply]:
        """-> (state, reply). A chosen client trains; a non-finite result is not kept and not
        uploaded (reply.excluded). Every client is scored `after_local`."""
        losses, upload, excluded, seconds_local = None, None, False, 0.0
        if chosen:
            t0 = time.perf_counter()
            losses = self.train(state, r, stage, progress)
            seconds_local = time.perf_counter() - t0
            new_state = model_mod.client_state(self.model)
            if all(torch.isfinite(v).all() for v in new_state.values()):
                state = new_state
                upload = make_upload(self.cfg.method, new_state)
            else:
                excluded = True   # keep the previous state; upload nothing
        t0 = time.perf_counter()
        scores = self.score(state, stage)
        return state, Reply(scores, losses, upload, excluded, seconds_local, time.perf_counter() - t0)

    def take(self, state: dict[str, torch.Tensor], stage: int, msg: Message,
             handover: bool) -> tuple[dict[str, torch.Tensor], int, Taken]:
        """-> (state, stage, reply): the server's message applied, then scored `after_download`.
        With the last stage-1 message the client first builds its stage-2 state from the task
        adapters in that message."""
        if handover:
            state, stage = self.stage2_state(state, received_adapters(msg)), 2
        state = apply_download(state, msg, self.data.task, self.tasks, stage)
        t0 = time.perf_counter()
        scores = self.score(state, stage)
        return state, stage, Taken(scores, time.perf_counter() - t0)

    def stage2_state(self, state: dict[str, torch.Tensor], adapters: dict[str, dict[str, torch.Tensor]]):
        """The client's first stage-2 state, built from its stage-1 state and the T task
        adapters IT RECEIVED (SPEC section 4): own adapter -> h_0, the others -> frozen experts,
        psi_s carried over; router and psi_c from one generator, the same on every client; the
        gate at 0 (ramped by gate_ramp), or at 1 when fed.stage2_ramp_steps is 0."""
        cfg, b = self.cfg, self.base
        with torch.device("meta"):   # a shell for the state's values: nothing drawn
            stage1 = pilot.TaskClientConnector(b.vision_width, b.llm_width)
        stage1 = stage1.to_empty(device="cpu")
        stage1.load_state_dict(adapter_tensors(state, "connector."))
        moa = pilot.stage2_from_stage1(stage1, adapters, self.data.task, cfg.top_k, cfg.lambda_d_stage2 > 0,
                                      0.0 if cfg.stage2_ramp_steps != 0 else 1.0, generator(self.seed, "init-stage2"))
        return {f"connector.{n}": v.detach().clone() for n, v in moa.state_dict().items()} | lora_tensors(state)

    def score(self, state: dict[str, torch.Tensor], stage: int, full: bool = False) -> dict[str, float]:
        """The state scored on the client's own test split (and validation split, if any):
        on fed.eval_max_samples of each (eval_subset), or on the whole splits when `full`."""
        self.structure(stage)
        model_mod.load_client_state(self.model, state)
        d, cfg = self.data, self.cfg
        out = {}
        for split in ("test", "val") if d.val else ("test",):
            samples = getattr(d, split)
            if not full:
                samples = eval_subset(samples, cfg.eval_max_samples, self.seed, d.name, split)
            out[split] = model_mod.evaluate(self.model, self.enc, samples, d.metric, cfg.eval_batch_size,
                                            self.shared.max_new_tokens, progress=True, skipped=d.skipped)
        return out


# -----------------------------------------------------------------------------
# The server's side of a round


class Coordinator:
    """The server's side: who takes part in a round, the stage schedule and the Server's
    aggregation. It knows each client only by name, task and training-set size (what a Flower
    node says when it joins) and reaches clients only through the Engine it is handed; a client
    whose reply does not come back is left out of that round, as one with a non-finite update is."""

    def __init__(self, cfg: FedConfig, names: Sequence[str], client_tasks: Sequence[str],
                 n_samples: Sequence[int], seed: int, initial_adapter: dict[str, torch.Tensor] | None):
        if cfg.method not in METHODS:
            raise ValueError(f"fed.method must be one of {tuple(METHODS)}, got {cfg.method!r}")
        self.cfg, self.names, self.client_tasks, self.seed = cfg, list(names), list(client_tasks), seed
        self.tasks = sorted(set(client_tasks))
        self.method = METHODS[cfg.method]
        self.server = Server(cfg.method, client_tasks, n_samples, cfg.ata_top_m, cfg.ata_form, cfg.ata_tau)
        if self.method.shares == "pilot":   # [choice] every task's global adapter starts as the initial psi_t (own copy each)
            self.server.task_adapters = {t: {k: v.clone() for k, v in initial_adapter.items()} for t in self.tasks}

    @property
    def total_rounds(self) -> int:
        return self.cfg.stage1_rounds + self.cfg.stage2_rounds

    def stage_of(self, r: int) -> int:
        """Rounds are numbered from 1; a method without stage 2 stays in stage 1."""
        if self.method.stage2 and r > self.cfg.stage1_rounds:
            return 2
        return 1

    def sample_clients(self, r: int) -> list[int]:
        K = len(self.names)
        m = max(1, round(self.cfg.client_fraction * K))
        perm = torch.randperm(K, generator=generator(self.seed, "sample", r)).tolist()
        return sorted(perm[:m])

    def train_and_aggregate(self, r: int, engine: Engine, progress=None) -> Opened:
        """The first half of round r (1-based): every reachable client trains if chosen and is
        scored `after_local`; the uploads are aggregated into the downloads to deliver."""
        stage = self.stage_of(r)
        chosen = self.sample_clients(r)
        # the handover: the last stage-1 round sends every task's adapter, and each client
        # builds its stage-2 CT-MoA from them (Client.take)
        handover = stage == 1 and self.stage_of(r + 1) == 2 and r < self.total_rounds
        replies = engine.local_round(r, stage, chosen, progress)
        uploads = {k: rep.upload for k, rep in replies.items() if rep.upload is not None}
        agg = self.server.aggregate(uploads, all_tasks=stage == 2 or handover)
        return Opened(r, stage, chosen, handover, replies, uploads, agg)

    def communication_round(self, r: int, engine: Engine, progress=None) -> tuple[Opened, dict[int, Taken]]:
        """One whole round r: train_and_aggregate, then the downloads delivered and scored
        `after_download`. -> (the round's first half, the replies to its downloads), from which
        tools/runs.round_record makes the round's log record."""
        opened = self.train_and_aggregate(r, engine, progress)
        engine.deliver(r, opened.agg.downloads, opened.handover)
        return opened, engine.taken()
