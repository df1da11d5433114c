"""fed.py -- the federated protocol of Pilot, in process: clients, server, rounds.

Readable as the protocol itself (SPEC section 5):
  every round, each sampled client
    1. trains locally on ONE shared model instance (its state is swapped in, then out);
    2. uploads a message {group: {name: tensor}}: its task adapter psi_t and its LoRA
       (never psi_s, psi_c or the router: make_upload picks exactly what travels);
  the server
    3. averages task adapters per task (task_average) and aggregates LoRA per client with
       adaptive text aggregation (ata_weights): one personalised LoRA per client;
    4. sends back each client's LoRA and the task adapters it needs.
  Stage 1 (`stage1_rounds`) uses the TaskClientConnector; stage 2 (`stage2_rounds`) the CT-MoA,
  built on each client from its stage-1 connector and the T global task adapters.

Methods (`fed.method`): pilot, and baselines / ablations of SPEC section 6:
  local           plain LLaVA projector + LoRA, no communication
  fedavg          plain projector + LoRA, sample-weighted mean of everything trainable
  fedprox         fedavg + (mu/2)||w - w_global||^2 in the local loss
  pilot_no_diff   pilot with lambda_d = 0
  pilot_no_moa    pilot with stage 1 for all stage1_rounds + stage2_rounds rounds
  pilot_fedavg_lora  pilot with FedAvg instead of ATA for LoRA

Randomness: every draw comes from a generator seeded by (seed, purpose, round, client) via
derive_seed, never from reseeding the global RNG, so a run is a function of its seed and a
resumed run continues exactly.

Shape legend: K clients, T tasks, B batch.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

import data as data_mod
import model as model_mod
import pilot

METHODS = ("pilot", "local", "fedavg", "fedprox", "pilot_no_diff", "pilot_no_moa", "pilot_fedavg_lora")

# -----------------------------------------------------------------------------
# Config (keys of the `fed:` section of config.yaml)


@dataclass
class FedConfig:
    method: str = "pilot"            # one of METHODS
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
    ata_top_m: int | None = 1        # ATA neighbours M; null = K - 1
    prox_mu: float = 0.01            # fedprox only
    released_init: bool = False      # psi_s starts as a copy of the projector (released code)
    eval_batch_size: int = 32


def derive_seed(seed: int, purpose: str, *keys) -> int:
    """A 63-bit seed for one purpose ("data", "sample", "init", ...) at one round / client."""
    h = hashlib.sha256(repr((seed, purpose) + keys).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def generator(seed: int, purpose: str, *keys) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *keys))


# -----------------------------------------------------------------------------
# Messages: exactly what travels


def pick(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def lora_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("lm.") and k.endswith(("lora_A", "lora_B"))}


def make_upload(method: str, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A client's message to the server: {group: {name: tensor}} (SPEC section 5).
    pilot*: its task adapter psi_t (h_0 in stage 2) and its LoRA; fedavg/fedprox: the projector
    and LoRA; local: nothing. psi_s, psi_c and the router never leave the client."""
    if method == "local":
        return {}
    if method in ("fedavg", "fedprox"):
        return {"projector": pick(state, "connector.projector."), "lora": lora_keys(state)}
    return {"task_adapter": pick(state, "connector.psi_t."), "lora": lora_keys(state)}


def message_bytes(msg: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    """Bytes per parameter group ("task_adapter.<task>" counts as "task_adapter")."""
    out: dict[str, int] = {}
    for group, tensors in msg.items():
        name = group.split(".")[0]
        out[name] = out.get(name, 0) + sum(t.numel() * t.element_size() for t in tensors.values())
    return out


def apply_download(state: dict[str, torch.Tensor], msg: dict[str, dict[str, torch.Tensor]],
                   own_task: str, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """A client's state after taking the server's message: its LoRA, its own task adapter into
    psi_t (h_0) and, in stage 2, the other tasks' adapters into the frozen experts."""
    state = dict(state)

    def put(prefix: str, tensors: dict[str, torch.Tensor], src_prefix: str) -> None:
        for k, v in tensors.items():
            dst = prefix + k[len(src_prefix):]
            if dst not in state:
                raise KeyError(f"download key {k} has no place {dst} in the client state")
            state[dst] = v.clone()

    for group, tensors in msg.items():
        if group in ("lora", "projector"):
            put("", tensors, "")
        elif group.startswith("task_adapter."):
            task = group[len("task_adapter."):]
            order = pilot.expert_tasks(tasks, own_task)
            if task == own_task:
                put("connector.psi_t.", tensors, "connector.psi_t.")
            elif any(k.startswith("connector.psi_t_other.") for k in state):
                put(f"connector.psi_t_other.{order.index(task) - 1}.", tensors, "connector.psi_t.")
        else:
            raise KeyError(f"unknown message group {group!r}")
    return state


# -----------------------------------------------------------------------------
# Server


class Server:
    """Holds the global task adapters; aggregates uploads into per-client downloads.
    Pure tensor arithmetic over the messages: it never sees data or anything else."""

    def __init__(self, method: str, tasks: Sequence[str], n_samples: Sequence[int], ata_top_m: int | None):
        self.method, self.tasks, self.n_samples = method, list(tasks), list(n_samples)
        self.ata_top_m = ata_top_m
        self.task_adapters: dict[str, dict[str, torch.Tensor]] = {}

    def aggregate(self, uploads: dict[int, dict[str, dict[str, torch.Tensor]]], send_all_tasks: bool):
        """uploads {client: message} -> downloads {client: message}."""
        ids = sorted(uploads)
        if not ids or self.method == "local":
            return {k: {} for k in ids}
        n = [self.n_samples[k] for k in ids]
        loras = [uploads[k]["lora"] for k in ids]
        if self.method in ("fedavg", "fedprox"):
            w = torch.tensor(n, dtype=torch.float32) / sum(n)
            lora = pilot.weighted_average(loras, w)
            proj = pilot.weighted_average([uploads[k]["projector"] for k in ids], w)
            return {k: {"lora": lora, "projector": proj} for k in ids}
        # task-aware visual aggregation: global psi_t per task (tasks with no upload keep theirs)
        self.task_adapters.update(pilot.task_average([uploads[k]["task_adapter"] for k in ids], n,
                                                     [self.tasks[k] for k in ids]))
        # adaptive text aggregation: one personalised LoRA per client
        if self.method == "pilot_fedavg_lora":
            W = (torch.tensor(n, dtype=torch.float32) / sum(n)).expand(len(ids), len(ids))
        else:
            m = len(ids) - 1 if self.ata_top_m is None else min(self.ata_top_m, len(ids) - 1)
            W = pilot.ata_weights(loras, n, m)
        personal = pilot.weighted_average(loras, W)
        downloads = {}
        for row, k in enumerate(ids):
            wanted = sorted(self.task_adapters) if send_all_tasks else [self.tasks[k]]
            msg = {f"task_adapter.{t}": self.task_adapters[t] for t in wanted}
            msg["lora"] = personal[row]
            downloads[k] = msg
        return downloads

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{t}/{k}": v for t, s in self.task_adapters.items() for k, v in s.items()}

    def load_state(self, flat: dict[str, torch.Tensor]) -> None:
        self.task_adapters = {}
        for key, v in flat.items():
            t, k = key.split("/", 1)
            self.task_adapters.setdefault(t, {})[k] = v


# -----------------------------------------------------------------------------
# Local training and evaluation on the shared model


def total_loss(out: model_mod.Output, weights: dict[str, float]) -> torch.Tensor:
    """L = L_ce + sum_k lambda_k L_k over the connector's auxiliary losses."""
    return out.ce + sum(weights[k] * out.aux[k] for k in pilot.AUX_KEYS)


def autocast(model: model_mod.PilotLlava):
    """bf16/fp16 autocast on CUDA when the base is in half precision; a no-op on CPU."""
    p = next(model.lm.parameters())
    enabled = p.device.type == "cuda" and p.dtype != torch.float32
    return torch.autocast("cuda", dtype=p.dtype, enabled=enabled)


def local_train(model: model_mod.PilotLlava, enc: data_mod.Encoder, samples: Sequence[data_mod.Sample],
                cfg: FedConfig, lr_lora: float, loss_weights: dict[str, float], gen: torch.Generator,
                prox_mu: float = 0.0, where: str = "", progress=None) -> dict[str, float]:
    """One client's local epochs on the shared model (its state already loaded). AdamW with
    separate learning rates for the connector and LoRA, cosine schedule with warmup (paper).
    Returns the mean of each loss term over the steps."""
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    conn = [p for n, p in params if n.startswith("connector.")]
    lora = [p for n, p in params if not n.startswith("connector.")]
    opt = torch.optim.AdamW([{"params": conn, "lr": cfg.lr_connector}, {"params": lora, "lr": lr_lora}],
                            weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(samples) / (cfg.batch_size * cfg.grad_accum))
    steps = max(1, cfg.local_epochs * per_epoch)
    warm = int(round(cfg.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / max(1, warm) if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    anchor = [p.detach().clone() for _, p in params] if prox_mu > 0 else None   # w_global (fedprox)
    sums = {k: 0.0 for k in ("loss", "ce", *pilot.AUX_KEYS, "prox")}
    order = []
    for _ in range(cfg.local_epochs):
        order += torch.randperm(len(samples), generator=gen).tolist()
    micro = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    dev = next(model.lm.parameters()).device
    for step in range(steps):
        chunk = micro[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
        for idx in chunk:
            batch = {k: v.to(dev) for k, v in enc.collate([samples[i] for i in idx]).items()}
            with autocast(model):
                out = model(**batch)
                loss = total_loss(out, loss_weights)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for (_, p), a in zip(params, anchor)) * (prox_mu / 2)
                loss = loss + prox
                sums["prox"] += prox.item() / len(chunk)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at {where} step {step}")
            (loss / len(chunk)).backward()
            sums["loss"] += loss.item() / len(chunk)
            sums["ce"] += out.ce.item() / len(chunk)
            for k in pilot.AUX_KEYS:
                sums[k] += out.aux[k].item() / len(chunk)
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update(1)
    return {k: v / steps for k, v in sums.items()} | {"steps": steps}


@torch.no_grad()
def evaluate(model: model_mod.PilotLlava, enc: data_mod.Encoder, samples: Sequence[data_mod.Sample],
             metric: str, batch_size: int, max_new_tokens: int) -> float:
    """Mean exact match (or token F1) of greedy answers to the first turn."""
    model.eval()
    tok = enc.tokenizer
    dev = next(model.lm.parameters()).device
    score = 0.0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = {k: v.to(dev) for k, v in enc.collate_prompts(chunk).items()}
        with autocast(model):
            seqs = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
        for s, seq in zip(chunk, seqs):
            score += data_mod.METRICS[metric](tok.decode(seq, skip_special_tokens=True), s.turns[0][1])
    return score / len(samples)


# -----------------------------------------------------------------------------
# The federation: K clients' states, one shared model, a server


class Federation:
    """K clients (their data and their state as CPU tensors), one shared model, one server.
    `run_round(r)` is one communication round; the state to checkpoint is `states` plus the
    server's `state()`; everything random is derived from (seed, round, client)."""

    def __init__(self, cfg: FedConfig, model: model_mod.PilotLlava, base: model_mod.Base,
                 clients: Sequence[data_mod.ClientData], enc: data_mod.Encoder, seed: int, max_new_tokens: int):
        if cfg.method not in METHODS:
            raise ValueError(f"fed.method must be one of {METHODS}, got {cfg.method!r}")
        self.cfg, self.model, self.base, self.clients, self.enc = cfg, model, base, list(clients), enc
        self.seed, self.max_new_tokens = seed, max_new_tokens
        self.tasks = sorted({c.task for c in clients})
        self.pilot = cfg.method.startswith("pilot")
        self.server = Server(cfg.method, [c.task for c in clients], [len(c.train) for c in clients], cfg.ata_top_m)
        # every client starts from the same initial state (as if broadcast by the server)
        self.states = [model_mod.client_state(model) for _ in clients]
        self.stage = 1
        if self.pilot:   # the server starts every task's global adapter from the initial psi_t
            init = pick(self.states[0], "connector.psi_t.")
            self.server.task_adapters = {t: dict(init) for t in self.tasks}

    @property
    def total_rounds(self) -> int:
        return self.cfg.stage1_rounds + self.cfg.stage2_rounds

    def stage_of(self, r: int) -> int:
        """Rounds are numbered from 1; pilot_no_moa and the baselines stay in stage 1."""
        if self.pilot and self.cfg.method != "pilot_no_moa" and r > self.cfg.stage1_rounds:
            return 2
        return 1

    def enter_stage2(self) -> None:
        """Every client builds its CT-MoA from its stage-1 connector and the T global task
        adapters (SPEC section 4); the shared model's connector becomes a CT-MoA."""
        c = self.cfg
        moa = None
        prefix = "connector.psi_t."   # the wire names of a task adapter -> Adapter state_dict names
        adapters = {t: {name[len(prefix):]: v for name, v in s.items()} for t, s in self.server.task_adapters.items()}
        for k, client in enumerate(self.clients):
            model_mod.load_client_state(self.model, self.states[k])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "init-stage2"))   # same init on every client
                moa = pilot.ctmoa_from_stage1(self.model.connector, adapters, client.task, c.top_k,
                                              use_difference=c.lambda_d_stage2 > 0)
            lora = lora_keys(self.states[k])
            self.states[k] = {f"connector.{n}": v.detach().clone().cpu() for n, v in moa.state_dict().items()} | lora
        self.model.set_connector(moa)
        self.stage = 2

    def enter_stage2_structure(self) -> None:
        """For resuming in stage 2: give the shared model a CT-MoA (weights come from the
        checkpoint's client states) and stage-2-shaped placeholder states."""
        b, c = self.base, self.cfg
        moa = pilot.CTMoA(b.vision_width, b.llm_width, len(self.tasks), c.top_k, c.lambda_d_stage2 > 0)
        self.model.set_connector(moa.to(next(self.model.lm.parameters()).device))
        self.states = [model_mod.client_state(self.model) for _ in self.clients]
        self.stage = 2

    def loss_weights(self, stage: int) -> dict[str, float]:
        c = self.cfg
        if stage == 1:
            return {"difference": 0.0 if self.cfg.method == "pilot_no_diff" else c.lambda_d,
                    "balance": 0.0, "router_z": 0.0}
        return {"difference": c.lambda_d_stage2, "balance": c.lambda_b, "router_z": c.lambda_z}

    def sample_clients(self, r: int) -> list[int]:
        K = len(self.clients)
        m = max(1, round(self.cfg.client_fraction * K))
        perm = torch.randperm(K, generator=generator(self.seed, "sample", r)).tolist()
        return sorted(perm[:m])

    def run_round(self, r: int, progress=None) -> dict:
        """One communication round r (1-based). Returns the round's log record."""
        stage = self.stage_of(r)
        if stage == 2 and self.stage == 1:
            self.enter_stage2()
        c = self.cfg
        lr_lora = c.lr_lora_stage1 if stage == 1 else c.lr_lora_stage2
        prox = c.prox_mu if c.method == "fedprox" else 0.0
        chosen = self.sample_clients(r)
        losses, uploads, excluded, t_local = {}, {}, [], 0.0
        for k in chosen:
            client = self.clients[k]
            model_mod.load_client_state(self.model, self.states[k])
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):   # dropout etc.: a stream per (round, client)
                torch.manual_seed(derive_seed(self.seed, "dropout", r, k))
                losses[client.name] = local_train(self.model, self.enc, client.train, c, lr_lora,
                                                  self.loss_weights(stage), generator(self.seed, "data", r, k),
                                                  prox, where=f"client {client.name} round {r}", progress=progress)
            t_local += time.perf_counter() - t0
            new_state = model_mod.client_state(self.model)
            if not all(torch.isfinite(v).all() for v in new_state.values()):
                excluded.append(client.name)   # keep its previous state; upload nothing
                continue
            self.states[k] = new_state
            uploads[k] = make_upload(c.method, self.states[k])
        # the last stage-1 round sends every task's adapter: stage 2 builds its experts from them
        send_all = stage == 2 or (self.pilot and r == c.stage1_rounds and self.stage_of(r + 1) == 2)
        downloads = self.server.aggregate(uploads, send_all)
        if send_all and stage == 1:   # clients that sat this round out need the adapters too
            for k in range(len(self.clients)):
                downloads.setdefault(k, {f"task_adapter.{t}": s for t, s in self.server.task_adapters.items()})
        comm = {}
        for k, msg in downloads.items():
            self.states[k] = apply_download(self.states[k], msg, self.clients[k].task, self.tasks)
            comm[self.clients[k].name] = {"up": message_bytes(uploads.get(k, {})), "down": message_bytes(msg)}
        return {"round": r, "stage": stage, "clients": [self.clients[k].name for k in chosen],
                "excluded": excluded, "losses": losses, "comm": comm, "seconds_local_training": round(t_local, 4)}

    def evaluate_own(self) -> dict[str, float]:
        """Each client, with its own state, on its own held-out test split."""
        out = {}
        for k, client in enumerate(self.clients):
            model_mod.load_client_state(self.model, self.states[k])
            out[client.name] = evaluate(self.model, self.enc, client.test, client.metric,
                                        self.cfg.eval_batch_size, self.max_new_tokens)
        return out

    def evaluate_cross(self) -> dict[str, dict[str, float]]:
        """Each client on every other task's test splits (what it learned from other tasks).
        Answers are judged against the other clients' phrasing, so this is a lower bound."""
        out = {}
        for k, client in enumerate(self.clients):
            model_mod.load_client_state(self.model, self.states[k])
            out[client.name] = {}
            for task in self.tasks:
                if task == client.task:
                    continue
                others = [c for c in self.clients if c.task == task]
                samples = [s for c in others for s in c.test]
                out[client.name][task] = evaluate(self.model, self.enc, samples, others[0].metric,
                                                  self.cfg.eval_batch_size, self.max_new_tokens)
        return out
