"""tools/sizing.py -- `python train.py --dry-run`: a run's sizes without its weights.

Parameter counts by group, the bytes a client sends and receives per round, a plan of peak
GPU memory for one local step, per stage, and (where the data can be read) the work of the run
in optimiser steps and generated answers, round by round, all built on the meta device from the configured
checkpoint's config (no weights, no download; LLaVA-1.5-7B's built-in shape where the config is
not available offline). benchmarks/bench_memory_plan.py checks the plan against measured steps
(docs/cost.md). The core never imports this file; train.py hands `--dry-run` to it,
with the configured base's loader (model.Loader).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import fed
import model
import pilot


def size_report(cfg: model.ModelConfig, source: model.Loader, method: str, num_tasks: int, batch_size: int,
                seq_len: int) -> dict:
    """Parameter counts by group, bytes a client sends and receives per round, and an estimate
    of peak GPU memory for one local step, per stage, built on the meta device: one formula per
    memory term (benchmarks/bench_memory_plan.py checks the sum against measured steps). One
    function, so that the whole plan, term by term, reads in one place."""
    from transformers import LlavaForConditionalGeneration
    config, origin = model.meta_config(cfg, source)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    total_base = sum(p.numel() for p in llava.parameters())
    proj = sum(p.numel() for p in llava.model.multi_modal_projector.parameters())
    lm = llava.model.language_model
    with torch.device("meta"):
        lora = sum(p.numel() for n, p in _lora_on_meta(lm, cfg).items())
    cv, c, tc = config.vision_config.hidden_size, config.text_config.hidden_size, config.text_config
    adapter = cv * c + c + c * c + c               # Linear(C_v, C) + Linear(C, C)
    wbytes = model.DTYPES[cfg.dtype].itemsize
    stages = {}
    pilot_method = fed.METHODS[method].shares == "pilot"
    if pilot_method:
        T = num_tasks
        stages["pilot stage 1"] = dict(lora=lora, psi_t=adapter, psi_s=adapter)
        stages["pilot stage 2"] = dict(lora=lora, psi_t=adapter, psi_t_other_frozen=(T - 1) * adapter,
                                       psi_c=(T - 1) * adapter, router=cv * T, psi_s_frozen=adapter)
    else:
        stages[f"{method} (plain LLaVA)"] = dict(lora=lora, projector=adapter)
    out = {"source": origin, "base_parameters": total_base, "projector_parameters": proj, "stages": {}}
    L, B, layers = seq_len, batch_size, tc.num_hidden_layers
    for name, groups in stages.items():
        trainable = sum(v for k, v in groups.items() if not k.endswith("_frozen"))
        client_side = sum(groups.values())
        if pilot_method:
            up = 4 * (groups["lora"] + groups["psi_t"])
            down = 4 * (groups["lora"] + (num_tasks if "2" in name else 1) * adapter)
        else:
            up = down = 0 if fed.METHODS[method].shares == "nothing" else 4 * (groups["lora"] + groups["projector"])
        frozen = total_base - proj                   # the projector's weights become the connector's
        # activations (Korthikanti et al. 2022, bf16, flash/SDPA attention: 34 s b h bytes per layer);
        # with checkpointing only each layer's input is kept, plus one layer being recomputed
        # (34 counts 16-bit activations; a float32 base keeps float32 ones, twice the bytes)
        per_layer = 34 * L * B * c * wbytes // 2
        acts = (layers * 2 * L * B * c * wbytes + per_layer) if cfg.gradient_checkpointing else layers * per_layer
        logits = L * B * tc.vocab_size * (wbytes + 4 + 4)   # logits in the base dtype, fp32 upcast for the loss, its grad
        mem = {"frozen_weights": frozen * wbytes, "client_weights_fp32": client_side * 4,
               "gradients_fp32": trainable * 4, "adamw_state_fp32": trainable * 8,
               "activations": acts, "logits": logits}
        mem["total"] = sum(mem.values())
        out["stages"][name] = {"parameters": {"total": frozen + client_side, "trainable": trainable, **groups},
                               "bytes_up_per_round": up, "bytes_down_per_round": down, "memory_bytes": mem}
    return out


def size_report_text(cfg: model.ModelConfig, source: model.Loader, method: str, num_tasks: int, batch_size: int,
                     seq_len: int) -> str:
    """size_report as the text `train.py --dry-run` prints."""
    rep = size_report(cfg, source, method, num_tasks, batch_size, seq_len)
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"  # noqa: E731
    lines = [f"model: {rep['source']}; base parameters {rep['base_parameters']:,}",
             f"assumed: {num_tasks} tasks, micro-batch {batch_size}, sequence {seq_len} tokens, "
             f"dtype {cfg.dtype}, gradient checkpointing {cfg.gradient_checkpointing}"]
    for name, st in rep["stages"].items():
        lines.append(f"\n{name}")
        lines += [f"  {k:>20}: {v:,}" for k, v in st["parameters"].items()]
        lines.append(f"  per client per round: sends {gib(st['bytes_up_per_round'])}, "
                     f"receives {gib(st['bytes_down_per_round'])}")
        lines += [f"  memory {k:>20}: {gib(v)}" for k, v in st["memory_bytes"].items()]
    return "\n".join(lines)


def _lora_on_meta(lm: nn.Module, cfg: model.ModelConfig) -> dict[str, torch.Tensor]:
    pilot.add_lora(lm, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.lora_targets)
    return pilot.lora_state_dict(lm)


def host_report_text(rep: dict, clients) -> str:
    """Host memory and disk of the client states (fp32, as the run keeps them): each client's
    state is a file in <run_dir>/states and one is in memory at a time; a round's uploads and
    personalised downloads are files too (tools/store.py), and each checkpoint links the states
    (no second copy; the last two rounds are kept, so up to two older sets of files)."""
    K = len(clients)
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    lines = [f"\nclient states ({K} clients, fp32; in <run_dir>/states, one in host memory at a time)"]
    for name, st in rep["stages"].items():
        state = st["memory_bytes"]["client_weights_fp32"]
        messages = st["bytes_up_per_round"] + 4 * st["parameters"]["lora"]   # upload + personalised LoRA
        lines.append(f"  {name}: {gb(state)} a client in memory; on disk {gb(K * state)} of states, "
                     f"{gb(K * messages)} of a round's messages, up to {gb(3 * K * state + K * messages)} with "
                     "the two checkpoints kept")
    return "\n".join(lines)


def work_report_text(fed_cfg: fed.FedConfig, max_new_tokens: int, clients) -> str:
    """The work of the whole run, from the clients' record counts (no picture is read): optimiser
    steps of local training and answers generated in scoring, per round and in all, so that a
    user multiplies by their GPU's seconds per step and per answer (docs/real-run.md). Scoring
    is every client, every round, at both points (after_local, after_download), on
    fed.eval_max_samples of its test (and validation) split; at the end each client answers the
    other tasks' test subsets and, when rounds scored a subset, its whole test split once more."""
    K = len(clients)
    taking_part = max(1, round(fed_cfg.client_fraction * K))
    rounds = fed_cfg.stage1_rounds + fed_cfg.stage2_rounds
    cap = lambda n: n if fed_cfg.eval_max_samples is None else min(n, fed_cfg.eval_max_samples)  # noqa: E731
    steps = sorted(fed.steps_per_round(len(c.train), fed_cfg) for c in clients)
    per_round_steps = sum(steps[-taking_part:])                      # an upper bound when sampling
    answers = sum(2 * (cap(len(c.test)) + cap(len(c.val))) for c in clients)
    final = sum(cap(len(o.test)) for c in clients for o in clients if o.task != c.task)
    if fed_cfg.eval_max_samples is not None:
        final += sum(len(c.test) for c in clients)
    n_train = sum(len(c.train) for c in clients)
    lines = [f"\nwork ({K} clients, {n_train:,} training records; {taking_part} take part in a round)",
             f"  local training per round: {per_round_steps:,} optimiser steps of {fed_cfg.batch_size} x "
             f"{fed_cfg.grad_accum} samples (a client: {steps[0]:,}-{steps[-1]:,})" + (" at most" if taking_part < K else ""),
             f"  scoring per round: {answers:,} answers of at most {max_new_tokens} tokens "
             f"({answers * max_new_tokens:,} generated tokens at most)",
             f"  whole run, {rounds} rounds: {rounds * per_round_steps:,} optimiser steps, "
             f"{rounds * answers + final:,} answers ({final:,} of them in the final scoring), "
             f"{(rounds * answers + final) * max_new_tokens:,} generated tokens at most"]
    return "\n".join(lines)
