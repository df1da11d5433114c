"""tools/flower_app.py: the in-process federation of fed.py, run over Flower in one message per
client and round, gives every client the same final state (SHA-256 of its tensors) and the
same scores, losses, traffic and LoRA mixing; a client's private state never reaches the
server; a killed SuperNode is left out once it is gone, however slow the live ones are; a node
that Flower lost sight of (a paused one: a machine too busy to send heartbeats) gets its message
again once it is back, and the run ends as if it had never been away.

Under the Simulation Engine (Ray, ~20 s) and under the Deployment Engine on 127.0.0.1: a
SuperLink and three SuperNodes as separate processes (each message runs in a fresh ClientApp
process there, so these take a few minutes on 2 cores: they run in background threads from
the start of the session, see BACKGROUND)."""

import json
import os
import time

import pytest
import yaml

pytest.importorskip("flwr", reason="pip install -r requirements-flower.txt")

import pilot  # noqa: E402
from tools import flower_app, flower_local, runs  # noqa: E402
import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("round", "stage", "clients", "excluded", "losses", "comm", "lora_weights", "lora_distances", "gate",
        "after_local", "after_download")


def _config(tmp_path, embedded_dir, **fed_keys):
    raw = yaml.safe_load(open(os.path.join(ROOT, "config.yaml")))
    raw["run_dir"] = str(tmp_path / "run")
    raw["model"].update(cache_dir=os.path.dirname(embedded_dir), embedded_pretrain_steps=5, lora_r=4)
    raw["data"].update(clients_per_task=1, train_per_client=16, test_per_client=4, max_new_tokens=4)
    raw["fed"].update(dict(stage1_rounds=1, stage2_rounds=1, local_epochs=1, batch_size=4), **fed_keys)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _in_process(config):
    f = train.build(train.load_config(config, []))
    records = [f.run_round(r).to_json() for r in range(1, f.coord.total_rounds + 1)]
    return records, {c.name: flower_app.state_sha256(s) for c, s in zip(f.engine.clients, f.engine.states)}


def _flower_run(run_dir):
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    return log, json.load(open(os.path.join(run_dir, "results.json")))


def _warnings(run_log: str) -> str:
    """The server's warnings in a run's output (why a client was lost or sent again)."""
    return "\n".join(line for line in run_log.splitlines() if "warning:" in line) or "(no warnings)"


def _assert_same_run(reference, digests, log, results, run_log=""):
    assert [rec["lost"] for rec in log] == [ref["lost"] for ref in reference], _warnings(run_log)
    assert results["final_state_sha256"] == digests
    assert len(log) == len(reference)
    for ref, rec in zip(reference, log):
        assert {k: rec.get(k) for k in KEYS} == {k: ref.get(k) for k in KEYS}
        assert rec["engine"] == "flower"


ADAPTER = {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}


def _assert_only_shared_parts(up: list[dict]):
    """Every record a client sent: its reply's numbers, its task adapter (psi_t / h_0, by the
    Adapter's own names) and its LoRA factors; psi_s, psi_c, the router, the gate and the
    frozen experts (all `connector.*` in a client state) never appear."""
    assert up
    for content in up:
        assert set(content) <= {"hello", "init.task_adapter", "reply", "scores", "losses", "seconds",
                                "up.task_adapter", "up.lora", "final", "took.scores", "took.seconds"}
        assert set(content.get("up.task_adapter", ADAPTER)) == ADAPTER
        assert set(content.get("init.task_adapter", ADAPTER)) == ADAPTER
        assert all(pilot.is_lora(n) for n in content.get("up.lora", []))
        assert not any("connector" in n for names in content.values() for n in names)


def test_wire_records_round_trip_every_dtype_bit_for_bit():
    import torch
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
               "c": torch.tensor(2.5, dtype=torch.float16), "d": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    back = flower_app.from_record(flower_app.to_record(tensors))
    assert set(back) == set(tensors)
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
               for k, v in tensors.items())
    assert flower_app.state_sha256(back) == flower_app.state_sha256(tensors)
    assert flower_app.state_sha256({**tensors, "a": tensors["a"] + 1e-7}) != flower_app.state_sha256(tensors)


def test_a_node_may_set_only_its_data_and_model_paths():
    assert flower_app.node_overrides({"set": "data.manifest=/x.yaml model.llava=/m"}) == ["data.manifest=/x.yaml",
                                                                                           "model.llava=/m"]
    with pytest.raises(train.ConfigError, match="fed.lr_connector is the run's to set"):
        flower_app.node_overrides({"set": "fed.lr_connector=1"})
    with pytest.raises(train.ConfigError, match="run config 'rounds': unknown key"):
        flower_app.Settings.from_run_config({"rounds": 3})


class FakeGrid:
    """A SuperLink as GridNodes sees it. outcomes[node] lists what each message sent to that
    node meets, in order: "reply"; an int, an error reply with that Flower error code; "away",
    the node leaves the online nodes for the next 2 polls and never answers that message;
    "gone", it leaves for good."""

    def __init__(self, outcomes: dict[int, list]):
        self.outcomes = {n: list(o) for n, o in outcomes.items()}
        self.online, self.back_in = set(outcomes), {}
        self.messages, self.sent = {}, []

    def get_node_ids(self):
        for node, polls in list(self.back_in.items()):
            if polls == 0:
                self.online.add(node)
                del self.back_in[node]
            elif polls is not None:
                self.back_in[node] = polls - 1
        return sorted(self.online)

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            node, outcome = m.metadata.dst_node_id, self.outcomes[m.metadata.dst_node_id].pop(0)
            ids.append(f"{node}.{len(self.sent)}")
            self.sent.append(node)
            self.messages[ids[-1]] = outcome
            if outcome in ("away", "gone"):
                self.online.discard(node)
                self.back_in[node] = 2 if outcome == "away" else None
        return ids

    def pull_messages(self, ids):
        from types import SimpleNamespace
        replies = []
        for mid in ids:
            outcome = self.messages[mid]
            if outcome == "reply" or isinstance(outcome, int):
                error = SimpleNamespace(code=outcome, reason=f"error {outcome}") if isinstance(outcome, int) else None
                replies.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), error=error,
                                               has_error=lambda e=error: e is not None,
                                               content=flower_app.RecordDict({"answer": flower_app.ConfigRecord({"id": mid})})))
        return replies


@pytest.fixture
def in_a_run(monkeypatch):
    """What a ServerApp process knows of itself, which flwr.app.Message reads: its run, task
    and node (the SuperLink's, 0)."""
    from flwr.supercore.task_identity import TaskIdentity
    for name, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _exchange(outcomes, **kw):
    grid = FakeGrid({10 + k: o for k, o in outcomes.items()})
    gn = flower_app.GridNodes(grid, {k: 10 + k for k in outcomes}, ["t"], timeout=3600, poll=0, **kw)
    contents = {k: flower_app.RecordDict({"config": flower_app.ConfigRecord({"client": k})}) for k in outcomes}
    got = gn.exchange(contents, "train.local_round")
    return {k: c["answer"]["id"] for k, c in got.items()}, gn, grid


def test_a_node_flower_lost_sight_of_gets_the_same_message_again_once_it_is_back(capsys, in_a_run):
    # client 1's ClientApp stopped responding (Flower's error 8), client 2's node left the online
    # nodes for a while: both are sent the message again and answer it; client 0 is untouched
    got, gn, grid = _exchange({0: ["reply"], 1: [8, "reply"], 2: ["away", "reply"]})
    assert got == {0: "10.0", 1: "11.3", 2: "12.4"}          # the answers to the second sends
    assert grid.sent == [10, 11, 12, 11, 12] and gn.resent == {1, 2}
    err = capsys.readouterr().err
    assert "client 1 (train.local_round): error 8; sent again" in err
    assert "client 2 (train.local_round): its SuperNode left the online nodes; sent again" in err
    assert "lost" not in err


def test_an_error_the_clientapp_raised_a_node_that_stays_away_and_one_that_keeps_failing_are_lost(capsys, in_a_run):
    # error 2: the ClientApp raised (it would again); a node that does not come back within
    # rejoin-timeout; a node whose ClientApp stops responding every time, past `retries`
    got, gn, grid = _exchange({0: [2], 1: ["gone"], 2: [8, 8, 8], 3: ["reply"]}, rejoin_timeout=0, retries=2)
    assert got == {3: "13.3"}
    assert sorted(grid.sent) == [10, 11, 12, 12, 12, 13] and gn.resent == {2}
    err = capsys.readouterr().err
    assert "client 0 (train.local_round): error 2; lost" in err
    assert "client 1 (train.local_round): its SuperNode was not back online within rejoin-timeout = 0 s; lost" in err
    assert "client 2 (train.local_round): error 8, after 2 resends; lost" in err


def test_a_message_sent_again_is_answered_once(tmp_path, embedded_dir):
    # the real ClientApp, twice the same round-1 message (a resend): the second gets the first's
    # reply, bit for bit, and the node's state is not trained twice. Had the first reply been
    # lost with its context (Flower saves neither then), the resend computes the same reply.
    import copy
    from flwr.app import Context, Metadata
    from flwr.app.message.message import make_message
    config = _config(tmp_path, embedded_dir)
    app = flower_app.make_client_app(flower_app.Settings(config=config, clients=3))
    tasks = sorted({c.task for c in train.load_data(train.load_config(config, []))})

    def message():   # what GridNodes sends client 0 in round 1, as a SuperNode hands it over
        meta = Metadata(run_id=7, message_id="", src_node_id=0, dst_node_id=5, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=3600, message_type="train.local_round")
        conf = flower_app.ConfigRecord({"tasks": tasks, "handover": False, "client": 0, "round": 1, "stage": 1,
                                        "chosen": True})
        return make_message(metadata=meta, content=flower_app.RecordDict({"config": conf}))

    def digest(content):
        return {key: flower_app.state_sha256(flower_app.from_record(rec)) for key, rec in content.array_records.items()}

    context = Context(7, 5, {"partition-id": 0}, flower_app.RecordDict(), {})
    before = copy.deepcopy(context.state)
    first = app(message(), context)
    state = flower_app.state_sha256(flower_app.from_record(context.state["pilot.state"]))
    again = app(message(), context)
    assert digest(again.content) == digest(first.content) and "up.lora" in digest(first.content)
    assert again.content["scores"] == first.content["scores"]
    assert flower_app.state_sha256(flower_app.from_record(context.state["pilot.state"])) == state
    lost_reply = app(message(), Context(7, 5, {"partition-id": 0}, before, {}))
    assert digest(lost_reply.content) == digest(first.content)
    # without reply_once, the second message would train the trained state once more
    runtime = flower_app.NodeRuntimes().get(flower_app.Settings(config=config, clients=3), {"partition-id": 0})
    twice = flower_app.local_round_reply(runtime, context, message().content)
    assert digest(flower_app.RecordDict(twice)) != digest(first.content)


def test_simulation_equals_the_in_process_loop_and_private_state_stays_on_the_nodes(tmp_path, embedded_dir):
    config = _config(tmp_path, embedded_dir)
    reference, digests = _in_process(config)
    seen = []   # everything that reaches the server: (direction, client, {record: [names]})
    flower_local.simulate(flower_app.Settings(config=config, clients=3, overwrite=True),
                        tap=lambda d, k, content: seen.append((d, k, {key: sorted(rec.keys())
                                                                      for key, rec in content.items()})))
    log, results = _flower_run(tmp_path / "run")
    _assert_same_run(reference, digests, log, results)
    assert all(rec["lost"] == [] == rec["resent"] for rec in log)
    up = [content for d, _, content in seen if d == "up"]
    assert sum("up.lora" in c for c in up) == 3 * 2   # the tap saw every upload: 3 clients, 2 rounds
    _assert_only_shared_parts(up)


def _run_config(config, run_dir, **extra):
    items = {"config": config, "clients": 3, "run-dir": str(run_dir), "record-wire": True, **extra}
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def _localhost(tmp) -> "flower_local.Localhost":
    lh = flower_local.Localhost(3, str(tmp))
    lh.env["OMP_NUM_THREADS"] = "1"          # one torch thread per process: the suite shares the cores
    # the SuperExecs look for work every 1 s, not 0.25 s (FLOWER_ENV): ~1 s more per run, in the
    # background, for a fifth of the idle CPU the other tests would otherwise share
    lh.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "1"
    return lh


def _deployment_scenario(tmp, embedded_dir):
    """On its own Localhost: a 1-round run (each message is a fresh ClientApp process here,
    the costly part; the Simulation test runs the same ClientApp through the handover and
    stage 2). -> (config, run dir, `flwr run`'s return code, the end of its log)."""
    config, run_dir = _config(tmp, embedded_dir, stage2_rounds=0), tmp / "run"
    with _localhost(tmp) as lh:
        done = lh.run(_run_config(config, run_dir), timeout=900)
    return config, run_dir, done.returncode, open(os.path.join(lh.workdir, "flwr-run.log")).read()[-3000:]


def _wait_for(condition, proc, what: str, bound: float = 900) -> None:
    """Until condition() holds; fails if `flwr run` ended first. The bound only keeps a broken
    run from hanging the suite."""
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline and proc.poll() is None, what
        time.sleep(0.5)


def _killed_and_paused_scenario(tmp, embedded_dir):
    """On its own Localhost, a 1-round run. Once round 1's messages are out, SuperNode 1
    (client shape0) is paused (SIGSTOP: to Flower, a machine too busy to send heartbeats) and
    SuperNode 2 (count0) killed. Flower marks both offline about a minute after their last
    heartbeat; when the server says it will send client 1's message again, node 1 is resumed.
    It gets its message again and replies; node 2 stays away and is lost after rejoin-timeout
    (the default 120 s, spent waiting for node 2 in the background; node 1 needs only the line
    to reach the test and one heartbeat to be back, and has those 120 s for it). Every other
    wait is for an event (a file's content, a line of the server's). -> (config, run dir, the
    run's output)."""
    import re
    import subprocess
    config, run_dir = _config(tmp, embedded_dir, stage1_rounds=1, stage2_rounds=0), tmp / "run"
    out = tmp / "flwr-run.log"
    with _localhost(tmp) as lh, open(out, "w") as log:
        proc = subprocess.Popen([flower_local.flower_executable("flwr"), "run", flower_app.HERE, "localhost",
                                 "--run-config", _run_config(config, run_dir), "--stream"],
                                stdout=log, stderr=subprocess.STDOUT, env=lh.env)
        try:
            wire = run_dir / "wire.jsonl"
            _wait_for(lambda: wire.exists() and '"chosen"' in wire.read_text(), proc, "round 1 never started")
            lh.pause_node(1)
            lh.kill_node(2)
            # round 1's message, or the final one if node 1 answered round 1 before it was paused
            missed = re.compile(r"client 1 \(train\.\w+\): .*sent again")
            _wait_for(lambda: missed.search(out.read_text()), proc, "the server never missed paused node 1")
            lh.pause_node(1, pause=False)
            proc.wait(timeout=1200)
        finally:
            if proc.poll() is None:
                proc.kill()
    return config, run_dir, out.read_text()


def _in_process_without(config, gone: int):
    """The in-process run in which client `gone` is lost after round 1's training message: its
    reply is dropped, it gets no download. -> (records, {name: final-state digest} of the rest)."""
    f = train.build(train.load_config(config, []))

    class Without:   # the in-process engine, less client `gone`
        def local_round(self, *args):
            return {k: rep for k, rep in f.engine.local_round(*args).items() if k != gone}

        def deliver(self, r, downloads, handover):
            f.engine.deliver(r, {k: m for k, m in downloads.items() if k != gone}, handover)

        def taken(self):
            return f.engine.taken()

    records = [runs.round_record(f.coord.names, f.coord.client_tasks, *f.coord.communication_round(r, Without())).to_json()
               for r in range(1, f.coord.total_rounds + 1)]
    return records, {c.name: flower_app.state_sha256(s) for k, (c, s) in enumerate(zip(f.engine.clients, f.engine.states))
                     if k != gone}


# The two Localhost runs wait on other processes (Flower's polls and heartbeats, a process
# start per message), so conftest.py starts them in background threads when the session starts, if a
# selected test asks for them: their waiting overlaps the rest of the suite. Each test joins
# its own run.
BACKGROUND = {"deployment_run": _deployment_scenario, "killed_and_paused_run": _killed_and_paused_scenario}


@pytest.fixture
def deployment_run(background):
    return background["deployment_run"].join()


@pytest.fixture
def killed_and_paused_run(background):
    return background["killed_and_paused_run"].join()


def test_deployment_engine_on_localhost_equals_the_in_process_loop(deployment_run):
    config, run_dir, returncode, run_log = deployment_run
    assert returncode == 0, run_log
    reference, digests = _in_process(config)
    log, results = _flower_run(run_dir)
    _assert_same_run(reference, digests, log, results, run_log)
    assert all(rec["lost"] == [] for rec in log)
    wire = [json.loads(line) for line in open(run_dir / "wire.jsonl")]
    _assert_only_shared_parts([w["records"] for w in wire if w["direction"] == "up"])
    assert all(rec["wire_bytes"]["up"] > sum(sum(c["up"].values()) for c in rec["comm"].values()) for rec in log)


def test_a_killed_node_is_lost_and_a_paused_one_gets_its_message_again(killed_and_paused_run):
    config, run_dir, run_log = killed_and_paused_run
    log, results = _flower_run(run_dir)
    (rec,) = log
    # (a machine busy enough may make colour0 go quiet too: it would be sent again, as it should)
    assert rec["lost"] == ["count0"] and "shape0" in rec["resent"], _warnings(run_log)
    # the two that are left end bit for bit as in an in-process run without count0: the paused
    # node's round was applied once, and its pause changed nothing else
    reference, digests = _in_process_without(config, gone=2)
    _assert_same_run(reference, digests, log, results, run_log)
    assert set(rec["after_local"]) == set(rec["after_download"]) == set(rec["lora_weights"]) == {"colour0", "shape0"}


def test_a_node_that_missed_the_handover_catches_up_from_the_next_stage2_message(tmp_path, embedded_dir):
    # client 0's SuperNode misses the handover (round 1's download, which starts stage 2); the
    # next message it gets says stage 2 and carries a stage-2 download (every task's adapter):
    # take_carried builds its CT-MoA from that, and the round's training runs on it
    import torch
    import fed
    config = _config(tmp_path, embedded_dir, stage1_rounds=1, stage2_rounds=2)
    f = train.build(train.load_config(config, []))
    opened = f.coord.train_and_aggregate(1, f.engine)
    assert opened.handover
    missed = {k: m for k, m in opened.agg.downloads.items() if k != 0}
    f.engine.deliver(1, missed, True)                                          # the others enter stage 2
    stage2_msg = f.coord.server.aggregate({}, all_tasks=True).downloads[0]              # what a stage-2 round sends client 0
    content = flower_app.RecordDict({"config": flower_app.ConfigRecord({"tasks": f.coord.tasks, "handover": False,
                                                                        "stage": 2, "client": 0}),
                                     **flower_app.pack(stage2_msg, "down.")})
    state, stage, took = flower_app.take_carried(f.engine.nodes[0], content, f.engine.states[0], 1)
    assert stage == 2 and set(state) == f.engine.state_keys(2) and "took.scores" in took
    for task, adapter in fed.received_adapters(stage2_msg).items():
        prefix = fed.adapter_prefix(f.engine.clients[0].task, f.coord.tasks, task)
        assert all(torch.equal(state[prefix + k], v) for k, v in adapter.items())
    state, reply = f.engine.nodes[0].local_round(state, 2, 2, True)
    assert reply.upload is not None and reply.losses["steps"] > 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][0] != "Z"    # a zombie has ended; its reaper is not ours
    except FileNotFoundError:
        return False


def _group_members(pgids) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) in pgids:
                    out.add(int(entry))
            except ProcessLookupError:
                pass
    return out


def test_localhost_processes_die_with_their_parent_whatever_the_signal(tmp_path):
    # two processes, each holding a Localhost (a SuperLink and one SuperNode), are stopped the
    # way a job scheduler or `timeout` stops one (SIGTERM) and killed outright (SIGKILL), side
    # by side: every Flower process each started ends too. Waits for events, with generous
    # outer bounds only.
    import signal
    import subprocess
    import sys
    holders = {}
    for signame in ("SIGTERM", "SIGKILL"):
        code = ("import sys, time; sys.path.insert(0, %r); from tools import flower_local\n"
                "with flower_local.Localhost(1, %r) as lh:\n"
                "    print(' '.join(str(p.pid) for p in lh.procs), flush=True)\n"
                "    time.sleep(600)\n") % (ROOT, str(tmp_path / signame))
        (tmp_path / signame).mkdir()
        holders[signame] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        members = {}
        for signame, proc in holders.items():
            leaders = [int(x) for x in proc.stdout.readline().split()]
            assert len(leaders) == 2 and all(_alive(p) for p in leaders)
            deadline = time.monotonic() + 120
            while len(_group_members(set(leaders))) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)                                       # the SuperNode's SuperExec has started
            members[signame] = (set(leaders), _group_members(set(leaders)))
        for signame, proc in holders.items():
            proc.send_signal(getattr(signal, signame))
        for signame, proc in holders.items():
            proc.wait(timeout=120)
            leaders, started = members[signame]
            deadline = time.monotonic() + 120
            while any(_alive(p) for p in started | _group_members(leaders)):
                assert time.monotonic() < deadline, f"still running after {signame}: {sorted(p for p in started if _alive(p))}"
                time.sleep(0.2)
    finally:
        for proc in holders.values():
            if proc.poll() is None:
                proc.kill()
