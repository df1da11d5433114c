"""pilot.py -- every component of Pilot, in plain torch.

Pilot: Building the Federated Multimodal Instruction Tuning Framework (Xiong, Yang, Song, Wang,
Xu; AAAI 2025; arXiv 2501.13985): the method itself, each piece small enough to copy alone.
  LoRA      LoRALinear, add_lora, lora_state_dict, merge_lora                              (SPEC 2)
  Adapter   the LLaVA projector shape, Linear -> GELU -> Linear                            (SPEC 2)
  stage 1   difference_loss, TaskClientConnector                                           (SPEC 3)
  stage 2   route, balance_loss, router_z_loss, CTMoA (the cross-task Mixture-of-Adapters),
            Stage2Connector (psi_s + the gated CT-MoA), stage2_from_stage1                 (SPEC 4)
  baseline  PlainConnector (the LLaVA-1.5 projector, for local/fedavg/fedprox), prox_term
  server    task_average, weighted_average(s) (weighted_averages_into: the same, streamed key by key);
            pairwise_distances, ata (ATA's mixing matrix from the distances, any form)      (SPEC 5)

Every connector returns ConnectorOutput(tokens, aux), aux always holding the keys of AUX_KEYS
(zeros where unused), so training code never branches on the connector; the losses are raw,
their lambdas applied by the caller (fed.total_loss). Every initialiser takes an optional
torch.Generator (None: torch's global RNG; nn.init's `generator=` needs torch >= 2.1).
Copying a component: the imports below, the component, and what its docstring's last line names
(`Copy with: ...`); tests/test_copy.py runs each copy alone (torch, math and the standard library
only) and checks it against this file bit for bit.

Shape legend: B batch, N image tokens per image, C_v vision width, C LLM width, T tasks = CT-MoA
experts, K clients, r LoRA rank, D = N * C. Tests: `pytest tests/test_pilot.py tests/test_copy.py`.
"""

from __future__ import annotations

import math
from typing import Mapping, MutableMapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021), plain torch

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def reset_linear(linear: nn.Linear, generator: torch.Generator | None = None) -> nn.Linear:
    """nn.Linear's default init (Kaiming-uniform weight, a = sqrt(5); bias uniform in
    +-1/sqrt(fan_in)) drawn from `generator` on the CPU. Copy with: nothing else."""
    w = torch.empty(linear.weight.shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    linear.weight.copy_(w)
    if linear.bias is not None:
        bound = 1 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0.0
        linear.bias.copy_(torch.empty(linear.bias.shape).uniform_(-bound, bound, generator=generator))
    return linear


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (LoRA, Hu et al. 2021, eq. 3):
        h = W0 x + b + (alpha / r) * B A dropout(x)
    A (r, in) is initialised like nn.Linear (Kaiming-uniform, from `generator`), B (out, r) with zeros, so the
    layer starts exactly equal to the base. Dropout acts on the LoRA path only, its masks from
    `dropout_generator` if set (set_dropout_generator), else torch's global RNG. A and B stay float32 on a bf16
    base (as PEFT); keys `base.*`, `lora_A`, `lora_B`. Copy with: nothing else."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scale, self.dropout = r, alpha, alpha / r, dropout
        self.dropout_generator: torch.Generator | None = None   # dropout masks (set_dropout_generator)
        a = torch.empty(r, base.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # same rule as nn.Linear's weight
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)                                              # (..., out)
        if self.training and self.dropout > 0:                        # inverted dropout, LoRA path only
            keep = torch.empty_like(x).bernoulli_(1 - self.dropout, generator=self.dropout_generator)
            x = x * keep / (1 - self.dropout)                         # (..., in)
        xa = x.to(self.lora_A.dtype) @ self.lora_A.t()                # (..., r)
        return y + (xa @ self.lora_B.t() * self.scale).to(y.dtype)    # (..., out)


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = DEFAULT_LORA_TARGETS, generator: torch.Generator | None = None) -> list[str]:
    """Freeze `model`, wrap every nn.Linear named in `targets` in a LoRALinear (SPEC section 2: q, k, v, o, gate,
    up, down of every decoder layer; lm_head and the embeddings are refused). Returns the wrapped layers' names;
    afterwards only LoRA is trainable. Copy with: LoRALinear, DEFAULT_LORA_TARGETS."""
    bad = {"lm_head", "embed_tokens"} & set(targets)
    if bad:
        raise ValueError(f"LoRA targets must not include {sorted(bad)} (SPEC section 2)")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout, generator))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"add_lora found no nn.Linear named any of {list(targets)}")
    return wrapped


def is_lora(name: str) -> bool:
    """The one rule that tells a LoRA factor by its name (module, state-dict or wire name).
    Copy with: nothing else."""
    return name.endswith(("lora_A", "lora_B"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of every LoRA factor in `model`. Copy with: is_lora."""
    return {k: v for k, v in model.state_dict().items() if is_lora(k)}


def set_dropout_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Draw every LoRALinear's dropout masks from `generator` (None: torch's global RNG). Copy with: LoRALinear."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.dropout_generator = generator


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its base, W0 <- W0 + (alpha/r) B A, the plain nn.Linear back in
    its place (for export or inference). Copy with: LoRALinear."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                delta = (child.lora_B @ child.lora_A) * child.scale   # (out, in), fp32
                child.base.weight += delta.to(child.base.weight.dtype)
                setattr(module, child_name, child.base)
    return model


# -----------------------------------------------------------------------------
# Adapter (the LLaVA-1.5 projector shape) and the one output structure of every connector


class Adapter(nn.Module):
    """Linear(C_v, C) -> GELU -> Linear(C, C), the LLaVA-1.5 `mlp2x_gelu` projector; names as transformers'
    LlavaMultiModalProjector (`linear_1`, `linear_2`), so a llava-hf projector loads strictly. `zero_last=True`:
    the adapter outputs exactly 0 at init (psi_s and psi_c, SPEC sections 3-4 [choice]). Copy with:
    reset_linear."""

    def __init__(self, in_dim: int, out_dim: int, zero_last: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)
        if generator is not None:
            reset_linear(self.linear_1, generator)
            reset_linear(self.linear_2, generator)
        if zero_last:
            nn.init.zeros_(self.linear_2.weight)
            nn.init.zeros_(self.linear_2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(h)))  # (..., C_v) -> (..., C)


AUX_KEYS = ("difference", "balance", "router_z")


class ConnectorOutput(NamedTuple):
    """What every connector returns. Copy with: AUX_KEYS, aux_losses."""
    tokens: torch.Tensor           # (B, N, C) image tokens for the LLM
    aux: dict[str, torch.Tensor]   # raw auxiliary losses, always exactly AUX_KEYS (0-dim)


def aux_losses(h: torch.Tensor, **losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """The aux dict of a ConnectorOutput: every key of AUX_KEYS, 0 where not given. Copy with: AUX_KEYS."""
    zero = h.new_zeros((), dtype=torch.float32)
    return {k: losses.get(k, zero) for k in AUX_KEYS}


class PlainConnector(nn.Module):
    """The baselines' connector (local, fedavg, fedprox): one LLaVA projector, no aux loss.
    Copy with: Adapter, reset_linear, ConnectorOutput, AUX_KEYS, aux_losses."""

    def __init__(self, in_dim: int, out_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.projector = Adapter(in_dim, out_dim, generator=generator)

    def forward(self, h: torch.Tensor) -> ConnectorOutput:
        return ConnectorOutput(self.projector(h), aux_losses(h))  # (B, N, C)


def prox_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term (Li et al. 2020, eq. 2): (mu / 2) ||w - w_global||^2 over the
    trainable tensors, w_global (`anchor`) their values at the round's start. Copy with: nothing else."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor)) * (mu / 2)


# -----------------------------------------------------------------------------
# Stage 1: task-specific + client-specific adapters, difference loss (SPEC section 3)


def difference_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Difference loss of Domain Separation Networks (Bousmalis et al. 2016), as in the
    released Pilot code: flatten each sample to a row, L2-normalise rows (norm detached, +1e-6),
    L_d = mean((X_a^T X_b)^2) over the D x D matrix, D = N * C.
    [choice] At LLaVA size (D = 576 * 4096) the D x D matrix has 5.6e12 entries and cannot be
    built; the same number, exactly, via B x B Gram matrices:
        sum((X_a^T X_b)^2) = trace(X_b^T X_a X_a^T X_b) = sum((X_a X_a^T) * (X_b X_b^T)),
    then divide by D^2. Cost O(B^2 D) time, O(B^2) extra memory. Computed in float32, with
    autocast off: under autocast `.float()` alone would still run the matmuls in bf16. Copy with: nothing else."""
    with torch.autocast(a.device.type, enabled=False):
        xa = a.reshape(a.shape[0], -1).float()                      # (B, D)
        xb = b.reshape(b.shape[0], -1).float()                      # (B, D)
        xa = xa / (xa.norm(dim=1, keepdim=True).detach() + 1e-6)    # (B, D)
        xb = xb / (xb.norm(dim=1, keepdim=True).detach() + 1e-6)    # (B, D)
        d = xa.shape[1]
        # divide each Gram by D before the product, to keep the float32 sum well inside range
        return ((xa @ xa.t() / d) * (xb @ xb.t() / d)).sum()        # (B, B) -> ()


class TaskClientConnector(nn.Module):
    """Stage-1 connector (SPEC section 3): x_img = psi_t(H_v) + psi_s(H_v). psi_t: the task's adapter, shared by
    its clients (uploaded, task-averaged); psi_s: the client's, never leaves it. [choice] psi_s starts with its
    last layer zeroed, so step 0 is the pretrained LLaVA; `released_init=True` starts it random for the caller
    to overwrite with the projector, as the released code does (doubling the projector output at step 0).
    aux["difference"] = difference_loss(psi_t(H), psi_s(H)), weighed by lambda_d by the caller. Copy with:
    Adapter, reset_linear, difference_loss, ConnectorOutput, AUX_KEYS, aux_losses."""

    def __init__(self, in_dim: int, out_dim: int, released_init: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.psi_t = Adapter(in_dim, out_dim, generator=generator)
        self.psi_s = Adapter(in_dim, out_dim, zero_last=not released_init, generator=generator)

    def forward(self, h: torch.Tensor) -> ConnectorOutput:
        t = self.psi_t(h)                                   # (B, N, C)
        s = self.psi_s(h)                                   # (B, N, C)
        return ConnectorOutput(t + s, aux_losses(h, difference=difference_loss(t, s)))


# -----------------------------------------------------------------------------
# Stage 2: cross-task Mixture-of-Adapters (SPEC section 4)


class Routing(NamedTuple):
    """What the router decides for every image token. Copy with: nothing else."""
    logits: torch.Tensor           # (B, N, T) phi(H), float32
    probs: torch.Tensor            # (B, N, T) P = softmax(phi(H))
    top_p: torch.Tensor            # (B, N, k) the k largest P, renormalised to sum 1
    top_i: torch.Tensor            # (B, N, k) their experts


def route(h: torch.Tensor, router: nn.Linear, top_k: int) -> Routing:
    """The CT-MoA router phi (SPEC section 4): logits phi(H) per image token, P = softmax, the top-k renormalised,
    as the released code does (top_k = 1: weight p / p = 1, so the router learns through the aux losses alone;
    Switch keeps the raw p). float32, autocast off (ST-MoE). Copy with: nothing else."""
    with torch.autocast(h.device.type, enabled=False):
        logits = F.linear(h.float(), router.weight.float())            # (B, N, T)
    probs = logits.softmax(dim=-1)                                      # (B, N, T)
    top_p, top_i = probs.topk(top_k, dim=-1)                            # (B, N, k), (B, N, k)
    return Routing(logits, probs, top_p / top_p.sum(dim=-1, keepdim=True), top_i)


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss (Fedus et al. 2021, eq. 4), per image:
        L_b = T^2 * mean_{b,i}( mean_n P[b,n,i] * fraction of image b's tokens whose top-1 is i )
    exactly 1 for a uniform router. probs (B, N, T). Copy with: nothing else."""
    T = probs.shape[-1]
    top1 = F.one_hot(probs.argmax(dim=-1), T).float()                   # (B, N, T)
    return T * T * (probs.mean(dim=1) * top1.mean(dim=1)).mean()        # (B, T) -> ()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(phi(H))^2.
    logits (B, N, T). Copy with: nothing else."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()                # (B, N) -> ()


class MoAOutput(NamedTuple):
    """What a CTMoA returns. Copy with: nothing else."""
    mixture: torch.Tensor          # (B, N, C) float32: sum_i P_i h_i(H), the paper's CT-MoA(H)
    own: torch.Tensor              # (B, N, C) h_0(H), the own task's expert alone
    aux: dict[str, torch.Tensor]   # "balance" and "router_z", raw (the caller weighs them)


class CTMoA(nn.Module):
    """The cross-task Mixture-of-Adapters of SPEC section 4 (the paper's CT-MoA):
        CT-MoA(H) = sum_i P_i(H) h_i(H),   P = top-k of softmax(phi(H)), renormalised (route)
    Experts, in expert_tasks' order (own task first):
        h_0 = psi_t                           own task's adapter, trainable
        h_i = psi_t_other[i-1] + psi_c[i-1]   another task's adapter, FROZEN, plus a trainable
                                              cross-task adapter psi_c ("adapter on adapter")
    [choice] psi_c starts with its last layer zeroed (released code: a copy of the projector), so
    expert i starts as the other task's global adapter. aux: balance_loss and router_z_loss.
    Loops over the T experts only. top_k == T: every expert runs densely. top_k < T: each expert
    runs on the tokens that chose it, gathered from the whole batch and scattered back with
    index_add (litgpt-style) into a float32 accumulator; an unselected expert costs nothing.
    Copy with: route, Routing, balance_loss, router_z_loss, MoAOutput, expert_slot, Adapter, reset_linear."""

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        top_k = num_tasks if top_k is None else top_k
        if not 1 <= top_k <= num_tasks:
            raise ValueError(f"top_k must be in [1, {num_tasks}] (number of tasks), got {top_k}")
        self.num_tasks, self.top_k = num_tasks, top_k
        g = generator
        self.psi_t = Adapter(in_dim, out_dim, generator=g)                          # h_0, trainable
        self.psi_t_other = nn.ModuleList(Adapter(in_dim, out_dim, generator=g) for _ in range(num_tasks - 1))
        self.psi_c = nn.ModuleList(Adapter(in_dim, out_dim, zero_last=True, generator=g)
                                   for _ in range(num_tasks - 1))
        self.router = nn.Linear(in_dim, num_tasks, bias=False)                       # phi
        if g is not None:
            reset_linear(self.router, g)
        for p in self.psi_t_other.parameters():
            p.requires_grad_(False)

    def task_adapter(self, i: int) -> Adapter:
        """The task adapter of expert i: psi_t for i = 0, else psi_t_other[i-1] (expert_slot)."""
        return self.get_submodule(expert_slot(i))

    def expert(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h_i(h): (..., C_v) -> (..., C)."""
        if i == 0:
            return self.psi_t(h)
        return self.task_adapter(i)(h) + self.psi_c[i - 1](h)

    def forward(self, h: torch.Tensor) -> MoAOutput:
        B, N, Cv = h.shape
        T = self.num_tasks
        r = route(h, self.router, self.top_k)                          # (B, N, T) / (B, N, k)
        own = self.psi_t(h)                                             # (B, N, C) h_0, used twice
        if self.top_k == T:  # dense: the renormalised weights are the full softmax
            mixture = r.probs[..., :1] * own                            # (B, N, C), fp32
            for i in range(1, T):
                mixture = mixture + r.probs[..., i:i + 1] * self.expert(i, h)   # (B, N, C)
        else:  # sparse: per-expert gather of the selected tokens from the whole batch
            flat_h = h.reshape(B * N, Cv)                               # (BN, C_v)
            flat_own = own.reshape(B * N, -1)                           # (BN, C)
            flat_i = r.top_i.reshape(B * N, self.top_k)                 # (BN, k)
            flat_p = r.top_p.reshape(B * N, self.top_k)                 # (BN, k), fp32
            mixture = h.new_zeros(B * N, own.shape[-1], dtype=torch.float32)   # (BN, C) fp32 accumulator
            for i in range(T):
                tok, slot = (flat_i == i).nonzero(as_tuple=True)        # (n_i,), (n_i,)
                if tok.numel() == 0:
                    continue                                            # unselected: no compute, no grad
                out_i = flat_own[tok] if i == 0 else self.expert(i, flat_h[tok])   # (n_i, C)
                mixture = mixture.index_add(0, tok, flat_p[tok, slot, None] * out_i.float())
            mixture = mixture.reshape(B, N, -1)                         # (B, N, C)
        aux = {"balance": balance_loss(r.probs), "router_z": router_z_loss(r.logits)}
        return MoAOutput(mixture.float(), own, aux)


class Stage2Connector(nn.Module):
    """Stage-2 connector (SPEC section 4): x_img = psi_s(H) + CT-MoA(H), with the gate g:
        x_img = psi_s(H) + lerp(h_0(H), CT-MoA(H), g) = psi_s + h_0 + g (CT-MoA(H) - h_0),
    exactly h_0 at g = 0 and exactly the paper's CT-MoA(H) at g = 1 (torch.lerp, bit for bit).
    [choice] psi_s, the stage-1 client adapter, is frozen and used (the released code computes
    and drops it); stage2_from_stage1 copies it in. [choice] g is a buffer, 1 (the paper) when
    built alone; the federated loop ramps it 0 -> 1 over fed.stage2_ramp_steps, so stage 2 starts
    where stage 1 ended (docs/choices.md). aux: the CT-MoA's balance and router_z, and difference_loss(
    psi_s(H), h_0(H)) if use_difference (SPEC: lambda_d 0 in stage 2). Copy with: CTMoA (and what it
    names), difference_loss, ConnectorOutput, AUX_KEYS, aux_losses."""

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, top_k: int | None = None,
                 use_difference: bool = False, gate: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        self.use_difference = use_difference
        self.moa = CTMoA(in_dim, out_dim, num_tasks, top_k, generator)              # experts and router
        self.register_buffer("gate", torch.tensor(float(gate)))                     # g, set by its owner
        self.psi_s = Adapter(in_dim, out_dim, zero_last=True, generator=generator)  # frozen
        for p in self.psi_s.parameters():
            p.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> ConnectorOutput:
        moa = self.moa(h)                                               # (B, N, C) each
        x = torch.lerp(moa.own.float(), moa.mixture, self.gate.float())   # (B, N, C): h_0 at g = 0, the paper at 1
        s = self.psi_s(h)                                               # (B, N, C), frozen
        losses = dict(moa.aux)
        if self.use_difference:
            losses["difference"] = difference_loss(s, moa.own)
        return ConnectorOutput((s + x).to(moa.own.dtype), aux_losses(h, **losses))


def expert_tasks(tasks: Sequence[str], own_task: str) -> list[str]:
    """THE expert order of a CT-MoA for a client of `own_task`: own task first (h_0), then the
    others by name (h_1 .. h_{T-1}); everything that places an expert uses it. Copy with: nothing else."""
    if own_task not in tasks:
        raise KeyError(f"own task {own_task!r} is not among the tasks {sorted(tasks)}")
    return [own_task] + [t for t in sorted(set(tasks)) if t != own_task]


def expert_slot(i: int) -> str:
    """THE place of expert i's task adapter in a CTMoA (its submodule and state-dict prefix):
    `psi_t` for the own task (i = 0), `psi_t_other.{i-1}` for the others. Copy with: nothing else."""
    return "psi_t" if i == 0 else f"psi_t_other.{i - 1}"


@torch.no_grad()
def stage2_from_stage1(stage1: TaskClientConnector, task_adapters: dict[str, dict[str, torch.Tensor]],
                       own_task: str, top_k: int | None = None, use_difference: bool = False,
                       gate: float = 0.0, generator: torch.Generator | None = None) -> Stage2Connector:
    """A client's stage-2 connector from its stage-1 connector and the T task adapters it received
    {task: Adapter state} (SPEC section 4): experts in expert_tasks' order, psi_s carried over
    (frozen), router and psi_c drawn from `generator`. At gate 0 (the loop ramps it) its output
    is exactly the stage-1 output with psi_t = task_adapters[own_task]; gate 1 is the paper's.
    Copy with: Stage2Connector (and what it names), TaskClientConnector, expert_tasks."""
    order = expert_tasks(list(task_adapters), own_task)
    in_dim, out_dim = stage1.psi_t.linear_1.in_features, stage1.psi_t.linear_1.out_features
    conn = Stage2Connector(in_dim, out_dim, len(order), top_k, use_difference, gate, generator)
    for i, task in enumerate(order):
        conn.moa.task_adapter(i).load_state_dict(task_adapters[task])
    conn.psi_s.load_state_dict(stage1.psi_s.state_dict())
    return conn.to(stage1.psi_t.linear_1.weight.device)


# -----------------------------------------------------------------------------
# Server: task-aware visual aggregation and adaptive text aggregation (SPEC section 5)


def check_same_keys(states: Sequence[dict[str, torch.Tensor]]) -> None:
    """Aggregation is by parameter name: every state must hold the same names. Copy with: nothing else."""
    keys = set(states[0])
    for k, s in enumerate(states):
        if set(s) != keys:
            raise KeyError(f"state {k} has keys {sorted(set(s) ^ keys)} that state 0 does not share")


def weighted_average(states: Sequence[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """One state, sum_j w_j * states[j], key by key (by parameter name); weights (K,); float32
    sums, each tensor back in its dtype. LoRA's A and B average separately (FedIT, the paper):
    mean(B) @ mean(A) is not mean(B @ A), and that is the method. Copy with: weighted_averages, check_same_keys."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.dim() != 1:
        raise ValueError(f"weights must be (K,), got shape {tuple(w.shape)}; use weighted_averages for a matrix")
    return weighted_averages(states, w[None])[0]


def weighted_averages(states: Sequence[dict[str, torch.Tensor]], weights: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """K' states, row k = sum_j W[k, j] states[j], key by key, one key's K tensors stacked at a
    time; W (K', K). ATA's personalised LoRA, one per client. Copy with: weighted_averages_into,
    check_same_keys."""
    out = [dict() for _ in range(torch.as_tensor(weights).shape[0])]
    weighted_averages_into(states, weights, out)
    return out


def weighted_averages_into(states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                           out: Sequence[MutableMapping[str, torch.Tensor]]) -> None:
    """weighted_averages, streamed: row k of each key goes into out[k] as soon as that key is
    mixed, in states[0]'s key order, so the K' results need not be held at once (`out` may be
    files being written, and `states` files read one tensor at a time: the server's memory is
    then about K + K' tensors of one key, not K + K' states). Copy with: check_same_keys."""
    check_same_keys(states)
    W = torch.as_tensor(weights, dtype=torch.float32)
    if W.dim() != 2 or W.shape[1] != len(states) or W.shape[0] != len(out):
        raise ValueError(f"weights must be ({len(out)}, {len(states)}), got shape {tuple(W.shape)}")
    for key in states[0]:
        tensors = [s[key] for s in states]
        stacked = torch.stack([t.float() for t in tensors])                  # (K, *shape)
        mixed = torch.einsum("kj,j...->k...", W.to(stacked.device), stacked)   # (K', *shape)
        for k in range(W.shape[0]):
            out[k][key] = mixed[k].to(tensors[0].dtype)


def task_average(states: Sequence[dict[str, torch.Tensor]], n_samples: Sequence[int],
                 tasks: Sequence[str], average=None) -> dict[str, dict[str, torch.Tensor]]:
    """Task-aware visual aggregation: each task's global adapter is the sample-weighted mean of its clients' psi_t;
    tasks never mix. -> {task: state}. `average(states, w)`: how one weighted mean is computed
    (None: weighted_average; a server reading files passes its streamed form).
    Copy with: weighted_average, weighted_averages, weighted_averages_into, check_same_keys."""
    if not len(states) == len(n_samples) == len(tasks):
        raise ValueError("states, n_samples and tasks must have one entry per client")
    out = {}
    for task in sorted(set(tasks)):
        idx = [k for k, t in enumerate(tasks) if t == task]
        n = torch.tensor([float(n_samples[k]) for k in idx])
        out[task] = (average or weighted_average)([states[k] for k in idx], n / n.sum())
    return out


@torch.no_grad()
def gram_matrix(states: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """(K, K) inner products <a_i, a_j> of the clients' states, each as one vector, accumulated
    key by key in states[0]'s order (one key's K tensors at a time); float64. Copy with: nothing else."""
    if any(set(s) != set(states[0]) for s in states):
        raise KeyError("distances are by parameter name: every state must hold the same names")
    K = len(states)
    gram = torch.zeros(K, K, dtype=torch.float64)
    for key in states[0]:
        x = torch.stack([s[key].reshape(-1) for s in states]).double()    # (K, P_key)
        gram += (x @ x.t()).cpu()                                          # (K, K)
    return gram


@torch.no_grad()
def pairwise_distances(states: Sequence[Mapping[str, torch.Tensor]], gram: torch.Tensor | None = None) -> torch.Tensor:
    """(K, K) Euclidean distances between clients, each client's tensors as one vector, from one Gram
    matrix (||a-b||^2 = ||a||^2 + ||b||^2 - 2 a.b), never K full copies; float64, as the
    subtraction cancels when clients are close. `gram`: gram_matrix(states), if already
    accumulated (a server reading files does it in blocks). Copy with: gram_matrix."""
    gram = gram_matrix(states) if gram is None else gram
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)               # (K, K)
    d2.fill_diagonal_(0)
    return d2.sqrt()


def nearest_others(d: torch.Tensor, k: int, top_m: int) -> torch.Tensor:
    """N_k: the top_m nearest other clients of client k (ties broken by client index). Copy with: nothing else."""
    K = d.shape[0]
    others = torch.tensor([j for j in range(K) if j != k], dtype=torch.long)
    order = torch.sort(d[k, others], stable=True).indices
    return others[order[:top_m]]                                            # (M,)


def nearest_distance(d: torch.Tensor) -> torch.Tensor:
    """(K,) o_k = min_{j != k} d_kj, each client's distance to its nearest other. Copy with: nothing else."""
    K = d.shape[0]
    return (d + torch.diag(torch.full((K,), float("inf"), dtype=d.dtype))).min(dim=1).values


# The forms of ATA: each maps the (K, K) distances d, the (K,) sample counts n (float64) and the
# number m of neighbours to the (K, K) float64 mixing matrix W, rows summing to 1. `ata` below
# is the one entry point: it checks the settings, resolves m and tau and picks the form by name.


def ata_spread(d: torch.Tensor, n: torch.Tensor, m: int, tau: float = 0.25) -> torch.Tensor:
    """ATA weights, form "spread" (the default; SPEC section 5) [choice]: contrast from the SPREAD
    of the distances, not their common level, which the norms dominate (docs/choices.md):
        o_k  = min_{j != k} d_kj                 row k's offset: its nearest other client
        c    = median_k o_k                      the federation's typical nearest distance
        b_k  = min(o_k, c)                       a far outlier is measured from c, not from its
                                                 own far neighbour, so it keeps its own LoRA
        s    = median over pairs j != k of (d_kj - o_k)   the robust spread (lower median), one for all rows
        z_kj = (d_kj - b_k) / s                  0 for the nearest, ~1 one spread further on
        s_kk = n_k,   s_kj = n_j * exp(-z_kj / tau) for j in N_k,   W_kj = s_kj / sum_j s_kj
    Equal distances give FedAvg (n_j / sum n); s = 0 with some d_kj > b_k gives those weight 0.
    d (K, K), n (K,) counts, m neighbours (N_k: the m nearest others, ties by index) -> (K, K) float64.
    Copy with: nearest_others, nearest_distance."""
    K = d.shape[0]
    W = torch.diag(n.to(d.dtype))                                            # (K, K) self terms
    if K == 1:
        return W / W.sum(dim=1, keepdim=True)
    nearest = nearest_distance(d)                                            # (K,) o_k
    offset = torch.minimum(nearest, nearest.median())                       # (K,) b_k
    off_diag = ~torch.eye(K, dtype=torch.bool)
    spread = (d - nearest[:, None])[off_diag].median()                      # () s
    excess = (d - offset[:, None]).clamp_min(0)                             # (K, K) d_kj - b_k
    z = excess / spread if spread > 0 else torch.where(excess > 0, float("inf"), 0.0).to(d.dtype)
    for k in range(K):
        nbrs = nearest_others(d, k, m)                                       # (M,) N_k
        W[k, nbrs] = n[nbrs].to(d.dtype) * torch.exp(-z[k, nbrs] / tau)
    return W / W.sum(dim=1, keepdim=True)


def ata_kernel(d: torch.Tensor, n: torch.Tensor, m: int, tau: float = 1.0) -> torch.Tensor:
    """ATA weights, form "kernel" (the earlier default, an option), scale-free:
        d_ref = median_k min_{j != k} d_kj,   s_kk = n_k,   s_kj = n_j exp(-d_kj / (tau d_ref)) (j in N_k)
    W_kj = s_kj / sum_j s_kj; its self-weight is set by K, not the data (docs/choices.md). -> (K, K) float64.
    Copy with: nearest_others, nearest_distance."""
    K = d.shape[0]
    ratio = torch.zeros_like(d)                                              # (K, K)
    if K > 1:
        ratio = torch.where(d == 0, ratio, d / nearest_distance(d).median())  # inf where d_ref = 0 < d
    W = torch.diag(n.to(d.dtype))                                            # (K, K) self terms
    for k in range(K):
        nbrs = nearest_others(d, k, m)                                       # (M,)
        W[k, nbrs] = n[nbrs].to(d.dtype) * torch.exp(-ratio[k, nbrs] / tau)
    return W / W.sum(dim=1, keepdim=True)


def ata_top_m(d: torch.Tensor, n: torch.Tensor, m: int, tau: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """ATA weights, form "top_m" (the first form, kept as an option):
        a_kj = (n_j / (d_kj + eps)^(1/tau)) / sum_{j' in N_k} n_j' / (d_kj' + eps)^(1/tau)
        W_kk = n_k / (n_k + n_N),   W_kj = n_N a_kj / (n_k + n_N),   n_N = sum_{j in N_k} n_j
    (with M = 1 the self-weight is 1/2 whatever the distances). -> (K, K) float64. Copy with: nearest_others."""
    K = d.shape[0]
    W = torch.zeros(K, K, dtype=torch.float64)
    n = n.to(torch.float64)
    for k in range(K):
        nbrs = nearest_others(d, k, m)                                       # (M,)
        n_nbr = n[nbrs].sum()
        W[k, k] = n[k] / (n[k] + n_nbr)
        if m > 0:
            score = n[nbrs] / (d[k, nbrs] + eps) ** (1 / tau)                # (M,)
            W[k, nbrs] = n_nbr * (score / score.sum()) / (n[k] + n_nbr)
    return W


ATA_FORMS = {"spread": ata_spread, "kernel": ata_kernel, "top_m": ata_top_m}   # fed.ata_form picks one


@torch.no_grad()
def ata(d: torch.Tensor, n_samples: Sequence[float], form: str = "spread", top_m: int | None = None,
        tau: float | None = None) -> torch.Tensor:
    """Adaptive text aggregation (ATA, SPEC section 5): the (K, K) mixing matrix W (float32), rows
    summing to 1, from the clients' LoRA distances d (K, K) (pairwise_distances) and their sample
    counts, by the form named `form` (ATA_FORMS) with its `tau` (None: the form's default). N_k
    is the top_m nearest others, where None or more than K - 1 (client sampling varies K) means
    all. d comes from pairwise_distances; apply W with weighted_averages. [choice] The paper
    gives no normalisation. Copy with: ATA_FORMS, ata_spread, ata_kernel, ata_top_m, nearest_others, nearest_distance."""
    if form not in ATA_FORMS:
        raise ValueError(f"ATA form must be one of {tuple(ATA_FORMS)}, got {form!r}")
    if top_m is not None and top_m < 0:
        raise ValueError(f"ata_top_m must be >= 0 or None, got {top_m}")
    if tau is not None and not tau > 0:
        raise ValueError(f"ata_tau must be > 0 or None, got {tau}")
    K = d.shape[0]
    m = K - 1 if top_m is None else min(top_m, K - 1)
    n = torch.tensor([float(x) for x in n_samples], dtype=torch.float64)   # (K,)
    d = d.to(torch.float64)
    return (ATA_FORMS[form](d, n, m) if tau is None else ATA_FORMS[form](d, n, m, tau)).float()
