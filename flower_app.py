"""flower_app.py -- the federation of fed.py on Flower: each client on its own SuperNode.

    pip install -r requirements-flower.txt
    # one machine, Flower's Simulation Engine (Ray), one virtual SuperNode per client:
    python flower_app.py --config config.yaml
    # many machines, Flower's Deployment Engine: a SuperLink on the server, a SuperNode on
    # each client machine, then `flwr run` from this folder (README: "More than one machine")
    flower-superlink --insecure
    flower-supernode --insecure --superlink SERVER:9092 --node-config 'partition-id=0'
    flwr run . CONNECTION --run-config 'clients=9' --stream

Nothing of the protocol is written here. The rounds are fed.Coordinator.round, the server's
arithmetic is fed.Server.aggregate, a client's work is fed.Client (local_train, make_upload,
apply_download); this file only carries their messages over Flower:

  ServerApp (SuperLink side)             ClientApp (one per SuperNode, i.e. per client)
  query.hello   ------------------------> build the model and this node's data; reply its
                                          name, task, training-set size, initial-state digest
  every round r, fed.Coordinator.round drives GridNodes:
  train.local_round {r, stage, chosen} -> fed.Client.local_round: train if chosen, score;
                <------------------------ reply scores, losses and the upload (up.<group>)
  fed.Server.aggregate(uploads)
  train.take {down.<group>} ------------> fed.Client.take: apply the download, score
  query.finish  ------------------------> reply the final state's SHA-256 (and save the state
                                          in the node's out-dir, if it has one)

Where a client's state lives: in the node's Flower context (`context.state`), which the
SuperNode keeps between messages; psi_s, psi_c, the router, the gate and the LoRA never travel
to the SuperLink. Each message group {name: tensor} is one Flower ArrayRecord, tensor by
tensor under its parameter name, as raw bytes with its dtype (bf16 included, bit for bit).

Which client a node is: its node config `partition-id` is the client's index k in the
federation (the order of the in-process run: data.load_clients). Its data is the config's
(synthetic scenarios: every node makes the same world and takes client k), or its own: a node
config `set="data.scenario=manifest data.manifest=/its/manifest.yaml"` (a manifest holding
that one client). A node may set only data.* and the model's paths, device and dtype keys.

A node that does not reply within `timeout` seconds (killed, unplugged) is left out of that
round, and of later ones while it is gone, as fed.py leaves out a non-finite update; the
round's log record names it under "lost". Flower runs do not checkpoint: the client states are
on the nodes.
"""

from __future__ import annotations

import argparse
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
    raise ImportError("flower_app.py needs Flower: pip install -r requirements-flower.txt") from e

import torch

import fed as fed_mod
import model as model_mod
import train

HERE = os.path.dirname(os.path.abspath(__file__))
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
    timeout: float = 3600.0          # seconds a round waits for replies before a node counts as lost
    join_timeout: float = 600.0      # seconds to wait for `clients` nodes to connect
    record_wire: bool = False        # write wire.jsonl: every record name that reaches the server
    overwrite: bool = False          # replace the run that run_dir holds

    @classmethod
    def from_run_config(cls, rc) -> "Settings":
        s = cls()
        for key, value in rc.items():
            name = "overrides" if key == "set" else key.replace("-", "_")
            if name not in cls.__dataclass_fields__:
                known = ["set" if f == "overrides" else f.replace("_", "-") for f in cls.__dataclass_fields__]
                raise train.ConfigError(f"run config {key!r}: unknown key (known: {', '.join(known)})")
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
            raise train.ConfigError(f"node config set: {item.split('=', 1)[0]} is the run's to set, not a node's "
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

# A ClientApp process builds the model once and keeps it for the messages it handles (the
# Simulation Engine keeps its workers; the Deployment Engine starts a process per message).
_BUILT: dict = {}


def node_runtime(settings: Settings, node_config) -> dict:
    """This node's config, data (checked before any weight loads), model and initial state."""
    extra = node_overrides(node_config)
    key = (settings.config, tuple(settings.overrides), tuple(extra), int(node_config.get("partition-id", 0)))
    if key not in _BUILT:
        cfg = settings.load(extra)
        clients = train.load_data(cfg)
        k = int(node_config.get("partition-id", 0))
        if len(clients) == 1:
            data = clients[0]
        elif 0 <= k < len(clients):
            data = clients[k]
        else:
            raise train.ConfigError(f"node config partition-id = {k}: the config's data has clients 0..{len(clients) - 1}")
        built = next((b for kk, b in _BUILT.items() if kk[:3] == key[:3]), None)   # same model, other node
        if built is None:
            model, base, enc = train.build_model(cfg)
            built = {"model": model, "base": base, "enc": enc, "initial": model_mod.client_state(model),
                     "stage1_connector": model.connector}
        _BUILT[key] = built | {"cfg": cfg, "k": k, "data": data, "client": None}
    return _BUILT[key]


def node_client(rt: dict, tasks) -> fed_mod.Client:
    if rt["client"] is None or rt["client"].tasks != list(tasks):
        cfg = rt["cfg"]
        rt["client"] = fed_mod.Client(rt["k"], rt["data"], tasks, cfg.fed, rt["model"], rt["base"], rt["enc"],
                                      cfg.seed, cfg.data.max_new_tokens)
        rt["client"].stage1_connector = rt["stage1_connector"]
    return rt["client"]


def load_state(context: Context, rt: dict):
    """(state, stage) from the node's context; the initial state before the first round."""
    if "pilot.state" not in context.state.array_records:
        return rt["initial"], 1
    return from_record(context.state.array_records["pilot.state"]), int(context.state.config_records["pilot.stage"]["stage"])


def save_state(context: Context, state, stage: int) -> None:
    context.state.array_records["pilot.state"] = to_record(state)
    context.state.config_records["pilot.stage"] = ConfigRecord({"stage": stage})


def scores_record(scores: dict[str, float] | None) -> MetricRecord:
    return MetricRecord(dict(scores or {}))


def make_client_app(settings: Settings | None = None) -> ClientApp:
    """The ClientApp. `settings` None: read them from the run config (`flwr run`)."""
    app = ClientApp()

    def runtime(context: Context) -> dict:
        return node_runtime(settings or Settings.from_run_config(context.run_config), context.node_config)

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        rt = runtime(context)
        state, _ = load_state(context, rt)
        info = {"partition": rt["k"], "name": rt["data"].name, "task": rt["data"].task,
                "n_train": len(rt["data"].train), "state_sha256": state_sha256(rt["initial"])}
        init = {"task_adapter": fed_mod.adapter_tensors(rt["initial"], fed_mod.OWN_ADAPTER)}
        return Message(RecordDict({"hello": ConfigRecord(info), **pack(init, "init.")}), reply_to=msg)

    @app.train("local_round")
    def local_round(msg: Message, context: Context) -> Message:
        rt = runtime(context)
        conf = msg.content["config"]
        state, stage = load_state(context, rt)
        state, reply = node_client(rt, conf["tasks"]).local_round(state, int(conf["round"]), int(conf["stage"]),
                                                                  bool(conf["chosen"]))
        save_state(context, state, stage)
        content = {"reply": ConfigRecord({"excluded": reply["excluded"], "uploaded": reply["upload"] is not None}),
                   "scores": scores_record(reply["scores"]),
                   "seconds": MetricRecord({"local": reply["seconds_local"], "scoring": reply["seconds_scoring"]}),
                   **pack(reply["upload"] or {}, "up.")}
        if reply["losses"] is not None:
            content["losses"] = MetricRecord({k: float(v) for k, v in reply["losses"].items()})
        return Message(RecordDict(content), reply_to=msg)

    @app.train("take")
    def take(msg: Message, context: Context) -> Message:
        rt = runtime(context)
        conf = msg.content["config"]
        state, stage = load_state(context, rt)
        state, stage, reply = node_client(rt, conf["tasks"]).take(state, stage, unpack(msg.content, "down."),
                                                                  bool(conf["enter_stage2"]))
        save_state(context, state, stage)
        return Message(RecordDict({"scores": scores_record(reply["scores"]),
                                   "seconds": MetricRecord({"scoring": reply["seconds_scoring"]})}), reply_to=msg)

    @app.query("finish")
    def finish(msg: Message, context: Context) -> Message:
        rt = runtime(context)
        state, stage = load_state(context, rt)
        out_dir = context.node_config.get("out-dir")
        if out_dir:   # the client's final state stays on its machine
            from safetensors.torch import save_file
            os.makedirs(str(out_dir), exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()},
                      os.path.join(str(out_dir), f"client_{rt['data'].name}.safetensors"))
        return Message(RecordDict({"final": ConfigRecord({"state_sha256": state_sha256(state), "stage": stage})}),
                       reply_to=msg)

    return app


# -----------------------------------------------------------------------------
# ServerApp: fed.Coordinator's rounds, its two calls a round carried by GridNodes


class GridNodes:
    """fed.py's `nodes` over a Flower Grid: one message per client per call, sent together;
    replies decoded back into fed.py's plain dicts. `tap(direction, node, content)` sees every
    message that leaves or reaches the server (tests record it); `wire` counts serialised bytes."""

    def __init__(self, grid: Grid, node_of: dict[int, int], tasks, timeout: float, tap=None):
        self.grid, self.node_of, self.tasks, self.timeout, self.tap = grid, dict(node_of), list(tasks), timeout, tap
        self.wire = {"up": 0, "down": 0}

    def exchange(self, contents: dict[int, RecordDict], message_type: str) -> dict[int, RecordDict]:
        """Send contents[k] to client k's node; return {k: reply content} of the replies that
        came back in time without error. A node that is gone is not sent to."""
        alive = set(self.grid.get_node_ids())
        k_of = {node: k for k, node in self.node_of.items()}
        msgs = []
        for k, content in contents.items():
            if self.node_of.get(k) in alive:
                self.wire["down"] += serialized_bytes(content)
                if self.tap:
                    self.tap("down", k, content)
                msgs.append(Message(content, dst_node_id=self.node_of[k], message_type=message_type))
        out = {}
        for rep in self.grid.send_and_receive(msgs, timeout=self.timeout):
            k = k_of.get(rep.metadata.src_node_id)
            if k is None or rep.has_error():
                if k is not None:
                    print(f"warning: client {k} ({message_type}): {rep.error.reason}", file=sys.stderr)
                continue
            self.wire["up"] += serialized_bytes(rep.content)
            if self.tap:
                self.tap("up", k, rep.content)
            out[k] = rep.content
        return out

    def config(self, **values) -> ConfigRecord:
        """A message's config; it names the client, as Flower stores contents by their hash
        and two messages of equal content in one push are refused."""
        return ConfigRecord({"tasks": self.tasks, **values})

    def local_round(self, r: int, stage: int, chosen, progress=None) -> dict[int, dict]:
        contents = {k: RecordDict({"config": self.config(client=k, round=r, stage=stage, chosen=k in chosen)})
                    for k in self.node_of}
        replies = {}
        for k, c in self.exchange(contents, "train.local_round").items():
            flags = c["reply"]
            replies[k] = {"scores": dict(c["scores"]), "excluded": bool(flags["excluded"]),
                          "upload": unpack(c, "up.") if flags["uploaded"] else None,
                          "losses": dict(c["losses"]) if "losses" in c.metric_records else None,
                          "seconds_local": c["seconds"]["local"], "seconds_scoring": c["seconds"]["scoring"]}
        return replies

    def deliver(self, r: int, downloads: dict[int, dict], enter_stage2: bool) -> dict[int, dict]:
        contents = {k: RecordDict({"config": self.config(client=k, round=r, enter_stage2=enter_stage2),
                                   **pack(msg, "down.")})
                    for k, msg in downloads.items() if msg}
        return {k: {"scores": dict(c["scores"]), "seconds_scoring": c["seconds"]["scoring"]}
                for k, c in self.exchange(contents, "train.take").items()}


def join(grid: Grid, settings: Settings) -> list[int]:
    """Wait until `clients` SuperNodes are connected; -> their node ids."""
    deadline = time.monotonic() + settings.join_timeout
    while len(list(grid.get_node_ids())) < settings.clients:
        if time.monotonic() > deadline:
            raise train.RunError(f"run config clients = {settings.clients}: only {len(list(grid.get_node_ids()))} "
                                 f"SuperNodes connected within join-timeout = {settings.join_timeout} s")
        time.sleep(0.2)
    return sorted(grid.get_node_ids())


def serve(grid: Grid, settings: Settings, tap=None) -> list[dict]:
    """The ServerApp's work: join, hello, the rounds of fed.Coordinator, finish. Writes
    <run_dir>/log.jsonl (the in-process records, plus "lost" and "wire") and results.json."""
    cfg = settings.load()
    run_dir = settings.run_dir or cfg.run_dir
    lock = train.claim_run_dir(run_dir, resume=False, overwrite=settings.overwrite)
    try:
        nodes = join(grid, settings)
        probe = GridNodes(grid, dict(enumerate(nodes)), [], settings.timeout, tap)
        got = probe.exchange({i: RecordDict({"config": ConfigRecord({"node": i})}) for i in range(len(nodes))},
                             "query.hello")
        if len(got) < len(nodes):
            raise train.RunError(f"{len(nodes) - len(got)} SuperNode(s) did not answer hello: see their logs")
        hellos = {nodes[i]: c for i, c in got.items()}
        info = {node: h["hello"] for node, h in hellos.items()}
        parts = sorted(int(i["partition"]) for i in info.values())
        if parts != list(range(len(nodes))):
            raise train.ConfigError(f"node config partition-id: the nodes hold {parts}; each of 0..{len(nodes) - 1} "
                                    "must be held by exactly one node")
        if len({i["state_sha256"] for i in info.values()}) != 1:
            raise train.ConfigError("the nodes built different initial states: every node must run the same config "
                                    "and base model")
        node_of = {int(i["partition"]): node for node, i in info.items()}
        meta = [info[node_of[k]] for k in range(len(nodes))]
        initial = unpack(hellos[node_of[0]], "init.")["task_adapter"]
        coord = fed_mod.Coordinator(cfg.fed, [m["name"] for m in meta], [m["task"] for m in meta],
                                    [int(m["n_train"]) for m in meta], cfg.seed, initial)
        wire_log = open(os.path.join(run_dir, "wire.jsonl"), "a") if settings.record_wire else None

        def recording_tap(direction, k, content):
            if wire_log:
                names = {key: sorted(rec.keys()) for key, rec in content.items()}
                wire_log.write(json.dumps({"direction": direction, "client": meta[k]["name"], "records": names}) + "\n")
                wire_log.flush()
            if tap:
                tap(direction, k, content)

        gn = GridNodes(grid, node_of, coord.tasks, settings.timeout, recording_tap)
        records = []
        for r in range(1, coord.total_rounds + 1):
            t0 = time.perf_counter()
            gn.wire = {"up": 0, "down": 0}
            gn.node_of = {k: n for k, n in node_of.items() if n in set(grid.get_node_ids())}
            record = coord.round(r, gn)
            record["engine"] = "flower"
            record["wire_bytes"] = dict(gn.wire)
            train.log_round(run_dir, record, t0)
            print(f"round {r} (stage {record['stage']}): mean after_local {record['mean']['after_local']:.3f}, "
                  f"after_download {record['mean']['after_download']:.3f}"
                  + (f"; lost {record['lost']}" if record["lost"] else ""), flush=True)
            records.append(record)
        finals = gn.exchange({k: RecordDict({"config": gn.config(client=k)}) for k in gn.node_of}, "query.finish")
        results = {"engine": "flower", "method": cfg.fed.method, "seed": cfg.seed, "headline": train.HEADLINE,
                   **{p: {"own": records[-1][p], "mean": records[-1]["mean"][p]} for p in fed_mod.EVAL_POINTS},
                   "final_state_sha256": {meta[k]["name"]: c["final"]["state_sha256"] for k, c in sorted(finals.items())}}
        train.write_atomic(os.path.join(run_dir, "results.json"), json.dumps(results, indent=1))
        if wire_log:
            wire_log.close()
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


# -----------------------------------------------------------------------------
# The Deployment Engine on one machine: a SuperLink and N SuperNodes on 127.0.0.1


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Localhost:
    """A SuperLink and `n` SuperNodes as separate processes on 127.0.0.1 (insecure, no TLS),
    each in its own process group, stopped on exit; `run` submits this folder with `flwr run`.
    What tests/test_flower.py and benchmarks/bench_flower.py use; on real machines, start
    the same commands by hand (README: "More than one machine")."""

    def __init__(self, n: int, workdir: str, node_set: str = ""):
        self.n, self.workdir, self.node_set = n, workdir, node_set
        self.procs: list = []
        self.env = dict(os.environ, FLWR_HOME=os.path.join(workdir, "flwr-home"))

    def start(self, args: list[str], log: str):
        import subprocess
        return subprocess.Popen(args, stdout=open(os.path.join(self.workdir, log), "w"), stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True, cwd=self.workdir)

    def __enter__(self) -> "Localhost":
        os.makedirs(self.env["FLWR_HOME"], exist_ok=True)
        self.port = free_port()
        with open(os.path.join(self.env["FLWR_HOME"], "config.toml"), "w") as fh:
            fh.write(f'[superlink]\ndefault = "localhost"\n\n[superlink.localhost]\n'
                     f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        # a database file: the in-memory one is not safe under concurrent pushes (flwr 1.42)
        self.superlink = self.start(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                     "--database", os.path.join(self.workdir, "superlink.db")], "superlink.log")
        self.nodes = [self.start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                  "--host", "127.0.0.1", "--port", str(free_port()),
                                  "--node-config", f"partition-id={i} {self.node_set}".strip()], f"supernode{i}.log")
                      for i in range(self.n)]
        self.procs = [self.superlink, *self.nodes]
        import socket
        deadline = time.monotonic() + 120
        while True:   # `flwr run` fails at once if the SuperLink is not listening yet
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.superlink.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"the SuperLink did not start: see {self.workdir}/superlink.log")
                time.sleep(0.2)

    def run(self, run_config: str, timeout: float):
        """`flwr run . localhost --run-config ... --stream`, waited for (its output in flwr-run.log)."""
        import subprocess
        with open(os.path.join(self.workdir, "flwr-run.log"), "w") as log:
            return subprocess.run(["flwr", "run", HERE, "localhost", "--run-config", run_config, "--stream"],
                                  stdout=log, stderr=subprocess.STDOUT, env=self.env, timeout=timeout, cwd=self.workdir)

    def kill_node(self, i: int) -> None:
        import signal
        os.killpg(self.nodes[i].pid, signal.SIGKILL)   # the SuperNode and the ClientApp it runs
        self.nodes[i].wait()

    def __exit__(self, *exc) -> None:
        import signal
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=10)
                except (ProcessLookupError, OSError):
                    pass
                except Exception:   # did not stop in time
                    os.killpg(p.pid, signal.SIGKILL)


# -----------------------------------------------------------------------------
# Simulation from the command line


def simulate(settings: Settings, tap=None, cpus_per_client: float = 1.0) -> None:
    """Run the federation under Flower's Simulation Engine: one virtual SuperNode per client."""
    from flwr.simulation import run_simulation
    run_simulation(make_server_app(settings, tap), make_client_app(settings), num_supernodes=settings.clients,
                   backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Pilot on Flower's Simulation Engine (one virtual SuperNode per client)")
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--clients", type=int, help="SuperNodes, one per client (default: the config's clients)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    cfg = train.load_config(args.config, args.set)
    clients = args.clients or len(train.load_data(cfg))
    simulate(Settings(config=os.path.abspath(args.config), overrides=args.set, clients=clients, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
