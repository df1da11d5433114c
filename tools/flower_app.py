"""tools/flower_app.py -- the federation of fed.py on Flower: each client on its own SuperNode.

    pip install -r requirements-flower.txt
    python tools/flower_local.py --config config.yaml     # one machine: Flower's Simulation Engine
    # many machines (docs/flower.md): a SuperLink on the server, a SuperNode per client machine,
    # then `flwr run` from the project's root, whose pyproject.toml names this file's two apps
    flower-superlink --insecure
    flower-supernode --insecure --superlink SERVER:9092 --node-config 'partition-id=0'
    flwr run . CONNECTION --run-config 'clients=9' --stream

Nothing of the protocol is written here: the rounds are fed.Coordinator's, the server's
arithmetic fed.Server.aggregate's, a client's work fed.Client's, the log record
tools/runs.round_record's. This file carries their messages over Flower, ONE per client and
round (round r's download rides with round r+1's instruction):

  ServerApp (SuperLink side)                ClientApp (one per SuperNode, i.e. per client)
  query.hello   ---------------------------> build the model and this node's data; reply its
                                             name, task, training-set size, initial-state digest
  every round r:
  train.local_round {r, stage, chosen,
                     down.<group> of r-1} --> fed.Client.take (round r-1's download, scored
                                             after_download), then fed.Client.local_round
                <--------------------------- reply both scores, losses and the upload (up.<group>)
  fed.Server.aggregate(uploads) -> round r's downloads, kept for the next message
  train.finish  {down.<group> of the last} -> take it; reply the final state's SHA-256

What reaches the SuperLink: a client's task adapter and LoRA every round it trains, and
numbers. psi_s, psi_c, the router, the frozen experts and the data never leave the node; its
state lives in the node's Flower context between messages. Each message group {name: tensor}
is one ArrayRecord, tensor by tensor under its parameter name, as raw bytes with its dtype.
A node's `partition-id` is its client's index k (the in-process order); its data is the
config's, or its own through a node config `set="data.scenario=manifest data.manifest=..."`.

A node is lost when it is gone, not when it is slow (docs/flower.md): a client whose node goes
quiet mid-message is sent the same message again once the node is back online, and lost only
if it stays away `rejoin-timeout` seconds or after `retries` resends; a ClientApp answers each
message once (reply_once), so a resend never applies a round twice. A lost client is left out
of that round, and of later ones while its node is offline; the log names it under "lost".
Flower runs do not checkpoint: the client states are on the nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as e:   # flwr is an optional extra
    raise ImportError("tools/flower_app.py needs Flower: pip install -r requirements-flower.txt") from e

import torch

import fed as fed_mod
import model as model_mod
import train
from data import ConfigError, RunError
from tools import runs
from tools.store import ClientStore

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the app's folder: the project's root
NODE_KEYS = ("data.", "model.llava", "model.vision", "model.llm", "model.projector", "model.cache_dir",
             "model.device", "model.dtype")   # what a node may set for itself

# -----------------------------------------------------------------------------
# Settings: the run config of `flwr run` (pyproject.toml [tool.flwr.app.config]) or this
# file's command line, and what each node says of itself (its node config)


@dataclass
class Settings:
    config: str = "config.yaml"      # config.yaml of train.py (relative: to this folder)
    overrides: list[str] = field(default_factory=list)   # train.py's --set KEY=VALUE
    clients: int = 9                 # SuperNodes to wait for, one per client
    run_dir: str = ""                # the server's log.jsonl and results.json ("" = config's run_dir)
    timeout: float = 3600.0          # outer bound on one message's round trip, seconds, plus ...
    step_timeout: float = 60.0       # ... this many seconds per local training step it asks for
    join_timeout: float = 600.0      # seconds to wait for `clients` nodes to connect
    rejoin_timeout: float = 120.0    # seconds a node Flower lost sight of mid-message has to come back
    retries: int = 3                 # times one message is sent again to a node that came back
    record_wire: bool = False        # write wire.jsonl: every record name that reaches the server
    overwrite: bool = False          # replace the run that run_dir holds

    @classmethod
    def from_run_config(cls, rc) -> "Settings":
        s = cls()
        for key, value in rc.items():
            name = "overrides" if key == "set" else key.replace("-", "_")
            if name not in cls.__dataclass_fields__:
                known = ["set" if f == "overrides" else f.replace("_", "-") for f in cls.__dataclass_fields__]
                raise ConfigError(f"run config {key!r}: unknown key (known: {', '.join(known)})")
            setattr(s, name, shlex.split(value) if name == "overrides" else value)
        return s

    def load(self, node_overrides=()) -> train.Config:
        path = self.config if os.path.isabs(self.config) else os.path.join(HERE, self.config)
        return train.load_config(path, [*self.overrides, *node_overrides])


def node_overrides(node_config) -> list[str]:
    """The node config's `set` (KEY=VALUE ...), restricted to the keys a node may set."""
    items = shlex.split(str(node_config.get("set", "")))
    for item in items:
        if not item.split("=", 1)[0].startswith(NODE_KEYS):
            raise ConfigError(f"node config set: {item.split('=', 1)[0]} is the run's to set, not a node's "
                                    f"(a node may set {', '.join(NODE_KEYS)})")
    return items


# -----------------------------------------------------------------------------
# Wire: {name: tensor} <-> ArrayRecord, and a client state's digest


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensor by tensor under its parameter name, as raw bytes with dtype and shape: exact for
    every dtype (numpy, which Flower's own conversion uses, has no bfloat16)."""
    return ArrayRecord({name: Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype="torch.raw",
                                    data=t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                        for name, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: torch.frombuffer(bytearray(a.data), dtype=getattr(torch, a.dtype)).reshape(a.shape).clone()
            for name, a in record.items()}


def pack(msg: dict[str, dict[str, torch.Tensor]], prefix: str) -> dict[str, ArrayRecord]:
    """A fed.py message {group: {name: tensor}} as records named <prefix><group>."""
    return {prefix + group: to_record(tensors) for group, tensors in msg.items()}


def unpack(content: RecordDict, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    return {key[len(prefix):]: from_record(rec) for key, rec in content.array_records.items() if key.startswith(prefix)}


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a client state (names, dtypes, shapes, bytes): equal digests, equal states."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def serialized_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it for the wire (its object tree);
    the array bytes alone if this Flower version does not expose that tree."""
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
        return sum(len(o.deflate()) for o in get_all_nested_objects(content).values())
    except ImportError:   # pragma: no cover - a different Flower layout
        return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


# -----------------------------------------------------------------------------
# ClientApp: one client per SuperNode, its state in the node's context


@dataclass
class NodeRuntime:
    """What one node's ClientApp works with: its config, partition k, data, the model it shares
    with the other nodes of the same config (fed.Shared) and the initial state built with it,
    and its fed.Client per task list (node_client)."""
    cfg: train.Config
    k: int
    data: object                     # data.ClientData
    shared: fed_mod.Shared
    initial: dict[str, torch.Tensor]
    clients: dict = field(default_factory=dict)


class NodeRuntimes:
    """What a ClientApp process builds once and keeps for the messages it handles: per node,
    its config, data (checked before any weight loads), model and initial state; nodes with
    the same config share one model. The Simulation Engine keeps its worker processes, so this
    is built once per worker; the Deployment Engine (Flower 1.42) starts a process per message,
    so there it is built once per message: one base load per client and round."""

    def __init__(self):
        self.built: dict[tuple, NodeRuntime] = {}

    def get(self, settings: Settings, node_config) -> NodeRuntime:
        extra = node_overrides(node_config)
        k = int(node_config.get("partition-id", 0))
        key = (settings.config, tuple(settings.overrides), tuple(extra), k)
        if key not in self.built:
            cfg = settings.load(extra)
            clients = train.load_data(cfg)
            if len(clients) > 1 and not 0 <= k < len(clients):
                raise ConfigError(f"node config partition-id = {k}: the config's data has clients 0..{len(clients) - 1}")
            other = next((rt for kk, rt in self.built.items() if kk[:3] == key[:3]), None)   # same model, other node
            if other is None:
                shared = train.build_model(cfg)   # the model, its base and encoder
                initial = model_mod.client_state(shared.model)
            else:
                shared, initial = other.shared, other.initial
            data = clients[0] if len(clients) == 1 else clients[k]
            self.built[key] = NodeRuntime(cfg, k, data, shared, initial)
        return self.built[key]


def node_client(rt: NodeRuntime, tasks) -> fed_mod.Client:
    """The node's fed.Client for the run's tasks (the server's, in every message), built
    complete once per task list. The model may hold another node's CT-MoA now: fed.Shared
    keeps the stage-1 connector to put back."""
    key = tuple(tasks)
    if key not in rt.clients:
        rt.clients[key] = fed_mod.Client(rt.k, rt.data, key, rt.cfg.fed, rt.cfg.seed, rt.shared)
    return rt.clients[key]


def load_state(context: Context, rt: NodeRuntime):
    """(state, stage) from the node's context; the initial state before the first round."""
    if "pilot.state" not in context.state.array_records:
        return rt.initial, 1
    return from_record(context.state.array_records["pilot.state"]), int(context.state.config_records["pilot.stage"]["stage"])


def save_state(context: Context, state, stage: int) -> None:
    context.state.array_records["pilot.state"] = to_record(state)
    context.state.config_records["pilot.stage"] = ConfigRecord({"stage": stage})


def take_carried(client: fed_mod.Client, content: RecordDict, state, stage: int):
    """Apply the previous round's download that rides with this message, if any: -> (state,
    stage, {record: ...} of the `after_download` reply, empty if nothing was carried). A
    stage-1 node told to work in stage 2 missed the handover message: it catches up now,
    building its CT-MoA from this stage-2 download, which holds every task's adapter."""
    msg = unpack(content, "down.")
    if not msg:
        return state, stage, {}
    conf = content["config"]
    handover = bool(conf["handover"]) or (stage == 1 and int(conf.get("stage", stage)) == 2)
    state, stage, took = client.take(state, stage, msg, handover)
    return state, stage, {"took.scores": scores_record(took.scores),
                          "took.seconds": MetricRecord({"scoring": took.seconds_scoring})}


def scores_record(scores: dict[str, float] | None) -> MetricRecord:
    return MetricRecord(dict(scores or {}))


def hello_reply(rt: NodeRuntime) -> dict:
    """Who this node is: partition, client name, task, training-set size, initial-state digest,
    and the initial task adapter (every task's global adapter starts as it)."""
    info = {"partition": rt.k, "name": rt.data.name, "task": rt.data.task,
            "n_train": len(rt.data.train), "state_sha256": state_sha256(rt.initial)}
    init = {"task_adapter": fed_mod.adapter_tensors(rt.initial, fed_mod.OWN_ADAPTER)}
    return {"hello": ConfigRecord(info), **pack(init, "init.")}


def local_round_reply(rt: NodeRuntime, context: Context, content: RecordDict) -> dict:
    """Round r's one message: take round r-1's carried download (scored `after_download`),
    then fed.Client.local_round (train if chosen, score `after_local`, upload)."""
    conf = content["config"]
    client = node_client(rt, conf["tasks"])
    state, stage = load_state(context, rt)
    state, stage, took = take_carried(client, content, state, stage)
    state, reply = client.local_round(state, int(conf["round"]), int(conf["stage"]), bool(conf["chosen"]))
    save_state(context, state, int(conf["stage"]))
    out = {"reply": ConfigRecord({"excluded": reply.excluded, "uploaded": reply.upload is not None}),
           "scores": scores_record(reply.scores),
           "seconds": MetricRecord({"local": reply.seconds_local, "scoring": reply.seconds_scoring}),
           **pack(reply.upload or {}, "up."), **took}
    if reply.losses is not None:
        out["losses"] = MetricRecord({k: float(v) for k, v in reply.losses.items()})
    return out


def finish_reply(rt: NodeRuntime, context: Context, content: RecordDict) -> dict:
    """The run's last message: take the last round's download, reply the final state's digest
    (and keep the state in the node's out-dir, if it has one: it stays on its machine)."""
    client = node_client(rt, content["config"]["tasks"])
    state, stage = load_state(context, rt)
    state, stage, took = take_carried(client, content, state, stage)
    save_state(context, state, stage)
    out_dir = context.node_config.get("out-dir")
    if out_dir:
        from safetensors.torch import save_file
        os.makedirs(str(out_dir), exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(str(out_dir), f"client_{rt.data.name}.safetensors"))
    return {"final": ConfigRecord({"state_sha256": state_sha256(state), "stage": stage}), **took}


REPLY = "pilot.reply."   # the last reply, kept in the node's context under these record names


def reply_once(context: Context, key: str, compute) -> dict:
    """compute() -> the reply {record name: record}, at most once per message `key`: the reply
    is kept in the node's context beside the state it left there. Flower saves a context only
    when its ClientApp ends well, with the reply, so state and kept reply always agree. The
    server sends a message again when it lost sight of the node (GridNodes.exchange): if the
    first one was done, its reply is given again and the round is not applied twice; if it was
    not, the context is as before it and compute() runs as it would have. Costs one reply's
    size in the node's context (its upload: the LoRA factors and a task adapter)."""
    kept = context.state.config_records.get(REPLY + "key")
    if kept is not None and kept["key"] == key:
        return {name[len(REPLY):]: context.state[name] for name in list(context.state)
                if name.startswith(REPLY) and name != REPLY + "key"}
    reply = compute()
    for name in [n for n in context.state if n.startswith(REPLY)]:
        del context.state[name]
    for name, record in reply.items():
        context.state[REPLY + name] = record
    context.state[REPLY + "key"] = ConfigRecord({"key": key})
    return reply


def make_client_app(settings: Settings | None = None) -> ClientApp:
    """The ClientApp: three message types, each a function above; the two that change the
    client's state answer each message once (reply_once). `settings` None: read them from the
    run config (`flwr run`)."""
    app, runtimes = ClientApp(), NodeRuntimes()

    def handle(reply_fn):
        def handler(msg: Message, context: Context) -> Message:
            rt = runtimes.get(settings or Settings.from_run_config(context.run_config), context.node_config)
            if reply_fn is hello_reply:
                return Message(RecordDict(hello_reply(rt)), reply_to=msg)
            key = f"{msg.metadata.run_id}/{msg.metadata.message_type}/{msg.content['config'].get('round', 'final')}"
            return Message(RecordDict(reply_once(context, key, lambda: reply_fn(rt, context, msg.content))),
                           reply_to=msg)
        return handler

    app.query("hello")(handle(hello_reply))
    app.train("local_round")(handle(local_round_reply))
    app.train("finish")(handle(finish_reply))
    return app


# -----------------------------------------------------------------------------
# ServerApp: fed.Coordinator's rounds over GridNodes, one message per client and round


# Flower's error codes that say the node or its ClientApp went quiet (its heartbeats lapsed, the
# message or reply expired), not that the ClientApp raised: the message is sent again once the
# node is online. An exception in the ClientApp (codes 1, 2) would only raise again.
RESEND_ERRORS = {3: "message unavailable", 4: "reply unavailable", 5: "node unavailable", 8: "ClientApp crashed"}


class Exchange:
    """The bookkeeping of one GridNodes.exchange: which message ids are pending (and until
    when), which clients are away (and until when), how often each was sent again, and the
    replies so far."""

    def __init__(self, gn: "GridNodes", contents: dict[int, RecordDict], message_type: str, bound: float):
        self.gn, self.contents, self.message_type, self.bound = gn, contents, message_type, bound
        self.pending: dict[str, tuple[int, float]] = {}   # message id -> (client, deadline)
        self.away: dict[int, float] = {}                  # client -> when to stop waiting for its node
        self.resends: dict[int, int] = {}
        self.out: dict[int, RecordDict] = {}

    def send(self, ks: list[int]) -> None:
        gn = self.gn
        for k in ks:
            gn.wire["down"] += serialized_bytes(self.contents[k])
            if gn.tap:
                gn.tap("down", k, self.contents[k])
        msgs = [Message(self.contents[k], dst_node_id=gn.node_of[k], message_type=self.message_type) for k in ks]
        for mid, k in zip(gn.grid.push_messages(msgs), ks):
            if mid is not None:
                self.pending[mid] = (k, time.monotonic() + self.bound)
            else:
                self.lose(k, "the SuperLink refused the message")

    def lose(self, k: int, why: str) -> None:
        print(f"warning: client {k} ({self.message_type}): {why}; lost", file=sys.stderr, flush=True)

    def went_quiet(self, k: int, why: str) -> None:
        if self.resends.get(k, 0) >= self.gn.retries:
            return self.lose(k, f"{why}, after {self.gn.retries} resends")
        print(f"warning: client {k} ({self.message_type}): {why}; sent again once its node is online "
              f"(waiting up to {self.gn.rejoin_timeout:.0f} s)", file=sys.stderr, flush=True)
        self.away[k] = time.monotonic() + self.gn.rejoin_timeout

    def take_replies(self) -> None:
        gn = self.gn
        for rep in gn.grid.pull_messages(list(self.pending)):
            k = self.pending.pop(rep.metadata.reply_to_message_id, (None,))[0]
            if k is None:
                continue
            if rep.has_error():
                (self.went_quiet if rep.error.code in RESEND_ERRORS else self.lose)(k, rep.error.reason.rstrip("."))
                continue
            gn.wire["up"] += serialized_bytes(rep.content)
            if gn.tap:
                gn.tap("up", k, rep.content)
            self.out[k] = rep.content

    def check_nodes(self, online: set[int], now: float) -> None:
        """Pending clients whose node left go away; clients whose node is back are sent the
        message again; those away too long, or pending past their bound, are lost."""
        node_of = self.gn.node_of
        for mid, (k, deadline) in list(self.pending.items()):
            if node_of[k] not in online:
                del self.pending[mid]
                self.went_quiet(k, "its SuperNode left the online nodes")
            elif now > deadline:
                del self.pending[mid]
                self.lose(k, f"no reply in {self.bound:.0f} s")
        back = [k for k in self.away if node_of[k] in online]
        for k in back:
            del self.away[k]
            self.resends[k] = self.resends.get(k, 0) + 1
            self.gn.resent.add(k)
        self.send(back)
        for k, until in list(self.away.items()):
            if now > until:
                del self.away[k]
                self.lose(k, f"its SuperNode was not back online within rejoin-timeout = {self.gn.rejoin_timeout:.0f} s")


class GridNodes:
    """fed.py's `nodes` over a Flower Grid, in ONE message per client and round: round r's
    downloads (`carry`) ride with round r+1's training instruction, and the last round's with
    the final `finish` message; the replies to them (`took`) come back with it. Liveness is
    Flower's, with patience (exchange); an error the ClientApp raised loses the client at once.
    `tap(direction, k, content)` sees every message that leaves or reaches the server (tests
    record it); `wire` counts serialised bytes, `resent` names the clients sent a message again."""

    def __init__(self, grid: Grid, node_of: dict[int, int], tasks, timeout: float, tap=None, poll: float = 1.0,
                 steps: dict[int, int] | None = None, step_timeout: float = 0.0, rejoin_timeout: float = 120.0,
                 retries: int = 3, store=None):
        self.grid, self.node_of, self.tasks, self.timeout, self.tap = grid, dict(node_of), list(tasks), timeout, tap
        self.store = store                 # tools/store.ClientStore: uploads kept as files, as in process
        self.poll, self.steps, self.step_timeout = poll, dict(steps or {}), step_timeout
        self.rejoin_timeout, self.retries = rejoin_timeout, retries
        self.wire = {"up": 0, "down": 0}
        self.resent: set[int] = set()
        self.carry: dict[int, dict] = {}   # round r's downloads, sent with the next message
        self.handover = False              # the carried downloads start stage 2
        self.took: dict[int, dict] = {}    # replies to the carried downloads

    def exchange(self, contents: dict[int, RecordDict], message_type: str, steps: int = 0) -> dict[int, RecordDict]:
        """Send contents[k] to client k's node; -> {k: reply content} of every reply that came
        back without error. A node not online when the message goes out is not sent to.
        Gone or only slow? A machine too busy to send heartbeats for a minute looks to Flower
        like a dead one (it leaves the online list; its message gets one of RESEND_ERRORS). So
        a client whose node goes quiet mid-message waits (`away`) up to `rejoin_timeout` s for
        it to be online again, then gets the same message again, at most `retries` times: safe,
        as a ClientApp answers a message it has answered from its context (reply_once). One
        send's outer bound: `timeout` + `step_timeout` x the local steps asked for."""
        ex = Exchange(self, contents, message_type, self.timeout + self.step_timeout * steps)
        online = set(self.grid.get_node_ids())
        ex.send([k for k in contents if self.node_of.get(k) in online])
        while ex.pending or ex.away:
            ex.take_replies()
            ex.check_nodes(set(self.grid.get_node_ids()), time.monotonic())
            if ex.pending or ex.away:
                time.sleep(self.poll)
        return ex.out

    def config(self, **values) -> ConfigRecord:
        """A message's config; it names the client, as Flower stores contents by their hash
        and two messages of equal content in one push are refused."""
        return ConfigRecord({"tasks": self.tasks, "handover": self.handover, **values})

    def with_carry(self, k: int, **values) -> RecordDict:
        return RecordDict({"config": self.config(client=k, **values), **pack(self.carry.get(k, {}), "down.")})

    def collect_took(self, replies: dict[int, RecordDict]) -> None:
        self.took = {k: fed_mod.Taken(dict(content["took.scores"]), content["took.seconds"]["scoring"])
                     for k, content in replies.items() if "took.scores" in content.metric_records}

    # fed.Engine

    def local_round(self, r: int, stage: int, chosen, progress=None) -> dict[int, fed_mod.Reply]:
        contents = {k: self.with_carry(k, round=r, stage=stage, chosen=k in chosen) for k in self.node_of}
        got = self.exchange(contents, "train.local_round", max((self.steps.get(k, 0) for k in chosen), default=0))
        self.collect_took(got)
        return {k: fed_mod.Reply(scores=dict(content["scores"]),
                                 losses=dict(content["losses"]) if "losses" in content.metric_records else None,
                                 upload=self.keep(k, unpack(content, "up.")) if content["reply"]["uploaded"] else None,
                                 excluded=bool(content["reply"]["excluded"]), seconds_local=content["seconds"]["local"],
                                 seconds_scoring=content["seconds"]["scoring"])
                for k, content in got.items()}

    def keep(self, k: int, upload: dict) -> dict:
        """Client k's upload as files in the store (read key by key by the server's aggregation,
        which writes the personalised downloads there too), or as it came without a store."""
        if self.store is None:
            return upload
        return {g: self.store.message_file(f"up_{k}.{g}", t) for g, t in upload.items()}

    def deliver(self, r: int, downloads: dict[int, dict], handover: bool) -> None:
        """Keep round r's downloads for the next message; their replies come with it (`took`)."""
        self.carry, self.handover = {k: msg for k, msg in downloads.items() if msg}, handover

    def taken(self) -> dict[int, fed_mod.Taken]:
        """The replies to the carried downloads, once the next message (or finish) brought them."""
        return self.took

    def finish(self) -> dict[int, RecordDict]:
        """The final message: the last round's downloads, and every node's final-state digest."""
        got = self.exchange({k: self.with_carry(k) for k in self.node_of}, "train.finish")
        self.collect_took(got)
        return got


def join(grid: Grid, settings: Settings) -> list[int]:
    """Wait until `clients` SuperNodes are connected; -> their node ids."""
    deadline = time.monotonic() + settings.join_timeout
    while len(list(grid.get_node_ids())) < settings.clients:
        if time.monotonic() > deadline:
            raise RunError(f"run config clients = {settings.clients}: only {len(list(grid.get_node_ids()))} "
                                 f"SuperNodes connected within join-timeout = {settings.join_timeout} s")
        time.sleep(0.2)
    return sorted(grid.get_node_ids())


def greet(grid: Grid, settings: Settings, tap=None) -> tuple[dict[int, int], list, dict]:
    """hello to every node: -> ({k: node id}, each client's hello in k order, the initial task
    adapter). Refuses nodes that do not cover partitions 0..K-1 once each, or that built
    different initial states."""
    nodes = join(grid, settings)
    probe = GridNodes(grid, dict(enumerate(nodes)), [], settings.timeout, tap,
                      rejoin_timeout=settings.rejoin_timeout, retries=settings.retries)
    got = probe.exchange({i: RecordDict({"config": ConfigRecord({"node": i})}) for i in range(len(nodes))},
                         "query.hello")
    if len(got) < len(nodes):
        raise RunError(f"{len(nodes) - len(got)} SuperNode(s) did not answer hello: see their logs")
    info = {nodes[i]: c["hello"] for i, c in got.items()}
    parts = sorted(int(i["partition"]) for i in info.values())
    if parts != list(range(len(nodes))):
        raise ConfigError(f"node config partition-id: the nodes hold {parts}; each of 0..{len(nodes) - 1} "
                                "must be held by exactly one node")
    if len({i["state_sha256"] for i in info.values()}) != 1:
        raise ConfigError("the nodes built different initial states: every node must run the same config "
                                "and base model")
    node_of = {int(i["partition"]): node for node, i in info.items()}
    first = next(content for i, content in got.items() if nodes[i] == node_of[0])
    return node_of, [info[node_of[k]] for k in range(len(nodes))], unpack(first, "init.")["task_adapter"]


def wire_recorder(run_dir: str, names: list[str], tap=None):
    """A tap that appends the record names of every message to <run_dir>/wire.jsonl."""
    def record(direction, k, content):
        with open(os.path.join(run_dir, "wire.jsonl"), "a") as fh:
            names_of = {key: sorted(rec.keys()) for key, rec in content.items()}
            fh.write(json.dumps({"direction": direction, "client": names[k], "records": names_of}) + "\n")
        if tap:
            tap(direction, k, content)
    return record


def run_rounds(coord: fed_mod.Coordinator, gn: GridNodes, run_dir: str) -> tuple[list[runs.RoundRecord], dict]:
    """fed.Coordinator's rounds, one message per client each: round r's record is closed when
    round r+1's replies (or the final ones) bring back the replies to its downloads. A round's
    seconds run from its message out to the next round's; its "resent" names the clients whose
    round-r message (for the last round, also the final one) went out again. -> (records,
    final replies)."""
    records, opened, t0 = [], None, time.perf_counter()
    resent: dict[int, set[int]] = {}   # round -> the clients whose message of that round went out again

    def close(opened, t_open, t_next):
        record = runs.round_record(coord.names, coord.client_tasks, opened, gn.taken())
        record.engine, record.wire_bytes = "flower", dict(gn.wire)
        record.resent = [coord.names[k] for k in sorted(resent[opened.round])]
        runs.log_round(run_dir, record, t_open, seconds=t_next - t_open)
        print(runs.round_line(record, coord.total_rounds) + (f"; lost {record.lost}" if record.lost else ""),
              flush=True)
        records.append(record)

    for r in range(1, coord.total_rounds + 1):
        t_r = time.perf_counter()
        gn.wire, gn.resent = {"up": 0, "down": 0}, set()
        resent[r] = gn.resent
        current = coord.train_and_aggregate(r, gn)
        if opened is not None:
            close(opened, t0, t_r)
        gn.deliver(r, current.agg.downloads, current.handover)
        opened, t0 = current, t_r
    gn.resent = resent[opened.round]   # the final message's resends count with the last round's
    finals = gn.finish()
    close(opened, t0, time.perf_counter())
    return records, finals


def serve(grid: Grid, settings: Settings, tap=None) -> list[runs.RoundRecord]:
    """The ServerApp's work: hello, the rounds of fed.Coordinator, finish. Writes
    <run_dir>/log.jsonl (the in-process records, plus "lost" and "wire") and results.json."""
    cfg = settings.load()
    run_dir = settings.run_dir or cfg.run_dir
    lock = runs.claim_run_dir(run_dir, resume=False, overwrite=settings.overwrite)
    try:
        node_of, meta, initial = greet(grid, settings, tap)
        names = [m["name"] for m in meta]
        coord = fed_mod.Coordinator(cfg.fed, names, [m["task"] for m in meta], [int(m["n_train"]) for m in meta],
                                    cfg.seed, initial)
        # the round's uploads and personalised downloads in files, as the in-process engine keeps them
        store = ClientStore(os.path.join(run_dir, "states"), names)
        coord.server.store = store
        steps = {k: fed_mod.steps_per_round(int(m["n_train"]), cfg.fed)
                 for k, m in enumerate(meta)}   # the outer bound of a message scales with them
        gn = GridNodes(grid, node_of, coord.tasks, settings.timeout,
                       wire_recorder(run_dir, names, tap) if settings.record_wire else tap,
                       steps=steps, step_timeout=settings.step_timeout, rejoin_timeout=settings.rejoin_timeout,
                       retries=settings.retries, store=store)
        records, finals = run_rounds(coord, gn, run_dir)
        results = {"engine": "flower", "method": cfg.fed.method, "seed": cfg.seed, "headline": fed_mod.HEADLINE,
                   **{p: {"own": getattr(records[-1], p), "mean": records[-1].mean[p]} for p in fed_mod.EVAL_POINTS},
                   "final_state_sha256": {names[k]: reply["final"]["state_sha256"] for k, reply in sorted(finals.items())}}
        runs.write_atomic(os.path.join(run_dir, "results.json"), json.dumps(results, indent=1))
        return records
    finally:
        lock.close()


def make_server_app(settings: Settings | None = None, tap=None) -> ServerApp:
    """The ServerApp. `settings` None: read them from the run config (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, settings or Settings.from_run_config(context.run_config), tap)

    return app


# `flwr run` loads these two (pyproject.toml [tool.flwr.app.components])
server_app = make_server_app()
client_app = make_client_app()
