"""tools/use.py -- using what a run trained: `python train.py --ask` and `--score`.

train.py's use_trained hands both flags here in three steps: trained_checkpoint reads where
the client was left (no weights; every refusal first: no run, no such client, no readable
checkpoint), then train.py builds the run's model from the run's own config (on the device and
dtype of the config given now) and trained_client loads the client into it through the same
path as a resume (the stage's connector structure, the client state with its key set
checked); ask answers one question. The core never imports this file, nor does it import
train.py: it is handed a parsed config and a built model.
"""

from __future__ import annotations

import json
import os
import sys
from typing import NamedTuple

import torch

import data as data_mod
import fed as fed_mod
import model as model_mod
from data import ConfigError
from tools import runs


class Checkpoint(NamedTuple):
    """Where one client of a run was left: the run's config (as run.json holds it), the
    client's task and metric, the run's tasks, its state in the last readable round."""
    config: dict
    task: str
    metric: str
    tasks: list[str]
    state: dict[str, torch.Tensor]
    round: int
    stage: int


def trained_checkpoint(run_dir: str, name: str) -> Checkpoint:
    """Client `name` of the run in run_dir, as its last readable checkpoint round holds it. No
    weights load here: every refusal comes first."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        raise ConfigError(f"run_dir {run_dir} holds no run (no run.json): train one first, or set run_dir")
    with open(path) as fh:
        saved = json.load(fh)
    clients = {row[0]: row for row in saved["identity"]["clients"]}
    if name not in clients:
        raise ConfigError(f"client {name!r} is not in the run in {run_dir}; its clients: {', '.join(clients)}")
    root = os.path.join(run_dir, "ckpt")
    for d in reversed(runs.round_dirs(root)):
        try:
            with open(os.path.join(root, d, "meta.json")) as fh:
                meta = json.load(fh)
            state = runs.load_copy(os.path.join(root, d, f"client_{name}.safetensors"))
        except Exception as e:  # truncated or corrupted: the previous round, as a resume does
            print(f"warning: {root}/{d} is unreadable ({type(e).__name__}: {e}); trying the previous round", file=sys.stderr)
            continue
        return Checkpoint(saved["config"], clients[name][1], clients[name][-1], sorted({row[1] for row in clients.values()}),
                          state, meta["round"], meta["stage"])
    raise ConfigError(f"run_dir {run_dir} holds no complete checkpoint (nothing readable under {root})")


def check_image(image: str) -> None:
    """--image: its header read before any weight loads."""
    try:
        data_mod.check_image_header(image)
    except Exception as e:
        raise data_mod.DataError(f"--image {image}: cannot read image: {e}") from None


def read_records(path: str, images: str | None) -> list[data_mod.Sample]:
    """--score's LLaVA JSON file (images relative to `images`, default the file's folder)."""
    return data_mod.load_llava_json(path, images or os.path.dirname(os.path.abspath(path)), progress=True)


def trained_client(ckpt: Checkpoint, name: str, fed_cfg: fed_mod.FedConfig, seed: int,
                   shared: fed_mod.Shared) -> fed_mod.Client:
    """Client `name` as `ckpt` left it, on the run's model (`shared`, built from the run's
    config): the stage's connector structure, then the client state (key set checked)."""
    data = data_mod.ClientData(name, ckpt.task, [], [], ckpt.metric)
    client = fed_mod.Client(0, data, ckpt.tasks, fed_cfg, seed, shared)
    client.structure(ckpt.stage)
    model_mod.load_client_state(shared.model, ckpt.state)
    return client


def ask(client: fed_mod.Client, image: str | None, prompt: str) -> str:
    """The client's greedy answer to `prompt` about the picture in `image` (None: a text-only
    question, as LLaVA-1.5's text-only records ask)."""
    human = prompt if image is None else f"{data_mod.IMAGE}\n{prompt}"
    sample = data_mod.Sample("ask", image, [(human, "-")], f"--image {image}" if image else "--prompt")
    enc, model = client.enc, client.model
    dev = next(model.lm.parameters()).device
    model.eval()
    batch = {k: v.to(dev) for k, v in enc.collate_prompts([sample]).items()}
    with torch.no_grad(), model_mod.autocast(model):
        seq = model.generate(**batch, max_new_tokens=client.shared.max_new_tokens, eos_token_id=enc.tokenizer.eos_token_id,
                             pad_token_id=enc.tokenizer.pad_token_id)[0]
    return enc.tokenizer.decode(seq, skip_special_tokens=True)
