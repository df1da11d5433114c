"""tools/engine.py -- fed.Engine in one process: every client in turn on one shared model.

train.py hands fed.Coordinator this engine (tools/flower_app.GridNodes is the other one). It
holds the K fed.Clients of the run, all on one fed.Shared model, and their states as files in
a tools/store.ClientStore (<run_dir>/states), one state in memory at a time: a client's state
is read before its call and written back after it. Each upload becomes message files the
server reads one tensor at a time, so the host memory of a round does not grow with K
(docs/cost.md).

Besides the two calls of fed.Engine it gives the run what it needs of the clients: their
states (for tests and checkpoints: `states`, `state_keys`), a client's score, the scores on the
other tasks, and the connector structure of a stage (set_stage, when stage 2 starts or a run
resumes in it).
"""

from __future__ import annotations

import typing
from typing import Sequence

import data as data_mod
import fed
import model as model_mod
import pilot
from tools.store import ClientStore


class States(typing.Sequence):
    """The clients' states as a sequence, each read from (and written to) its file in the store
    when indexed: `engine.states[k]` loads client k's state, `engine.states[k] = state` saves it."""

    def __init__(self, store: ClientStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store.names)

    def __getitem__(self, k: int) -> dict:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return self.store.load(k % len(self))

    def __setitem__(self, k: int, state: dict) -> None:
        self.store.save(k % len(self), state)


class InProcess:
    """fed.Engine in this process. [choice] Every client starts from the same initial state
    (the shared model's, as if broadcast by the server), written to its file here."""

    def __init__(self, clients: Sequence[data_mod.ClientData], cfg: fed.FedConfig, seed: int, shared: fed.Shared,
                 store: ClientStore):
        self.clients, self.cfg, self.seed, self.shared, self.store = list(clients), cfg, seed, shared, store
        self.tasks = sorted({c.task for c in self.clients})
        initial = model_mod.client_state(shared.model)
        for k in range(len(self.clients)):
            store.save(k, initial)
        self.initial_keys = frozenset(initial)
        self.initial_adapter = fed.adapter_tensors(initial, fed.OWN_ADAPTER)   # every task's global adapter starts as it
        self.nodes = [fed.Client(k, c, self.tasks, cfg, seed, shared) for k, c in enumerate(self.clients)]
        self.stage = 1
        self._taken: dict[int, fed.Taken] = {}

    # fed.Engine: each client in turn, its state read from and written back to its file

    def local_round(self, r: int, stage: int, chosen: Sequence[int], progress=None) -> dict[int, fed.Reply]:
        replies = {}
        for k, node in enumerate(self.nodes):
            state, reply = node.local_round(self.store.load(k), r, stage, k in chosen, progress)
            self.store.save(k, state)
            del state
            if reply.upload:   # the upload as files the server reads one tensor at a time
                reply = reply._replace(upload={g: self.store.message_file(f"up_{k}.{g}", t)
                                               for g, t in reply.upload.items()})
            replies[k] = reply
        return replies

    def deliver(self, r: int, downloads: dict[int, fed.Message], handover: bool) -> None:
        self._taken = {}
        for k, msg in downloads.items():
            if msg:
                state, _, self._taken[k] = self.nodes[k].take(self.store.load(k), self.stage, msg, handover)
                self.store.save(k, state)
                del state
        if handover:
            self.set_stage(2)

    def taken(self) -> dict[int, fed.Taken]:
        return self._taken

    # what the run needs of its clients: states, scores, the connector structure

    @property
    def states(self) -> States:
        return States(self.store)

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

    def score(self, k: int, full: bool = False) -> dict[str, float]:
        """Client k's current state scored on its own splits (fed.Client.score)."""
        return self.nodes[k].score(self.store.load(k), self.stage, full)

    def evaluate_cross(self) -> dict[str, dict[str, float]]:
        """Each client on every other task's test splits (what it learned from other tasks).
        Answers are judged against the other clients' phrasing, so this is a lower bound."""
        out, model, enc = {}, self.shared.model, self.shared.enc
        for k, client in enumerate(self.clients):
            self.nodes[k].structure(self.stage)
            model_mod.load_client_state(model, self.store.load(k))
            out[client.name] = {}
            for task in self.tasks:
                if task == client.task:
                    continue
                others = [o for o in self.clients if o.task == task]
                samples = [s for o in others for s in fed.eval_subset(o.test, self.cfg.eval_max_samples, self.seed,
                                                                      o.name, "test")]
                out[client.name][task] = model_mod.evaluate(model, enc, samples, others[0].metric,
                                                            self.cfg.eval_batch_size, self.shared.max_new_tokens)
        return out
