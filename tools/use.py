"""tools/use.py -- using what a run trained: `python train.py --ask` and `--score`.

Both load one client from the run's last complete checkpoint through the same path as a
resume (the run's base and connector structure, its client state with the key set checked), on
the device and dtype of the given config; every refusal (no run, no such client, no readable
checkpoint) comes before any weight loads. train.py hands both flags to this file; the core
never imports it.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import data as data_mod
import fed as fed_mod
import model as model_mod
import train
from tools import runs


def trained_checkpoint(cfg: train.Config, name: str) -> dict:
    """Where client `name` of the run in cfg.run_dir was left: the run's config (from run.json;
    device and dtype from `cfg`), the client's task and metric, the run's tasks, and its state
    in the last readable checkpoint round. No weights load here: every refusal comes first."""
    path = os.path.join(cfg.run_dir, "run.json")
    if not os.path.exists(path):
        raise train.ConfigError(f"run_dir {cfg.run_dir} holds no run (no run.json): train one first, or set run_dir")
    with open(path) as fh:
        saved = json.load(fh)
    run_cfg = train.from_dict(train.Config, saved["config"])
    run_cfg.model.device, run_cfg.model.dtype = cfg.model.device, cfg.model.dtype
    clients = {row[0]: row for row in saved["identity"]["clients"]}
    if name not in clients:
        raise train.ConfigError(f"client {name!r} is not in the run in {cfg.run_dir}; its clients: {', '.join(clients)}")
    root = os.path.join(cfg.run_dir, "ckpt")
    for d in reversed(runs._rounds(root)):
        try:
            with open(os.path.join(root, d, "meta.json")) as fh:
                meta = json.load(fh)
            state = runs._load_copy(os.path.join(root, d, f"client_{name}.safetensors"))
        except Exception as e:  # truncated or corrupted: the previous round, as a resume does
            print(f"warning: {root}/{d} is unreadable ({type(e).__name__}: {e}); trying the previous round", file=sys.stderr)
            continue
        return {"config": run_cfg, "task": clients[name][1], "metric": clients[name][-1], "state": state,
                "tasks": sorted({row[1] for row in clients.values()}), "round": meta["round"], "stage": meta["stage"]}
    raise train.ConfigError(f"run_dir {cfg.run_dir} holds no complete checkpoint (nothing readable under {root})")


def load_trained_client(cfg: train.Config, name: str, ckpt: dict) -> fed_mod.Client:
    """Client `name` as `ckpt` (trained_checkpoint) left it, the same path as a resume: build
    the run's model, give it the stage's connector structure, load the client state (key set
    checked)."""
    run_cfg = ckpt["config"]
    model, base, enc = train.build_model(run_cfg)
    client = fed_mod.Client(0, data_mod.ClientData(name, ckpt["task"], [], [], ckpt["metric"]), ckpt["tasks"],
                            run_cfg.fed, model, base, enc, run_cfg.seed, cfg.data.max_new_tokens)
    client.structure(ckpt["stage"])
    model_mod.load_client_state(model, ckpt["state"])
    return client


def ask(cfg: train.Config, name: str, image: str | None, prompt: str) -> str:
    """Client `name`'s greedy answer to `prompt` about the picture in `image` (None: a
    text-only question, as LLaVA-1.5's text-only records ask)."""
    ckpt = trained_checkpoint(cfg, name)
    if image is not None:
        try:
            data_mod.check_image_header(image)
        except Exception as e:
            raise data_mod.DataError(f"--image {image}: cannot read image: {e}") from None
    client = load_trained_client(cfg, name, ckpt)
    human = prompt if image is None else f"{data_mod.IMAGE}\n{prompt}"
    sample = data_mod.Sample("ask", image, [(human, "-")], f"--image {image}" if image else "--prompt")
    enc, model = client.enc, client.model
    dev = next(model.lm.parameters()).device
    model.eval()
    batch = {k: v.to(dev) for k, v in enc.collate_prompts([sample]).items()}
    with torch.no_grad(), model_mod.autocast(model):
        seq = model.generate(**batch, max_new_tokens=cfg.data.max_new_tokens, eos_token_id=enc.tokenizer.eos_token_id,
                             pad_token_id=enc.tokenizer.pad_token_id)[0]
    return enc.tokenizer.decode(seq, skip_special_tokens=True)


def score_file(cfg: train.Config, name: str, path: str, images: str | None, metric: str | None) -> dict:
    """Client `name` scored on a LLaVA JSON file (images relative to `images`, default the
    file's folder), with the client's metric unless `metric` names another."""
    ckpt = trained_checkpoint(cfg, name)
    samples = data_mod.load_llava_json(path, images or os.path.dirname(os.path.abspath(path)), progress=True)
    client = load_trained_client(cfg, name, ckpt)
    metric = metric or client.data.metric
    value = model_mod.evaluate(client.model, client.enc, samples, metric, cfg.fed.eval_batch_size,
                             cfg.data.max_new_tokens, progress=True)
    return {"client": name, "round": ckpt["round"], "file": path, "records": len(samples), "metric": metric, "score": value}
