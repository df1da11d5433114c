"""tools/flower_local.py -- the Flower apps of tools/flower_app.py run on this one machine.

    python tools/flower_local.py --config config.yaml    # Simulation Engine: one virtual SuperNode per client

`simulate` runs the federation under Flower's Simulation Engine (Ray), in this process;
`Localhost` starts a SuperLink and N SuperNodes as separate processes on 127.0.0.1 and submits
the app with `flwr run`, as on real machines (docs/flower.md), so tests/test_flower.py and
benchmarks/bench_flower.py exercise Flower's Deployment Engine end to end. Every process started
here dies with its parent, whatever the signal. The core never imports this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run as a script: the core modules sit in the folder above
    sys.path.insert(0, ROOT)

import train  # noqa: E402
from tools.flower_app import HERE, Settings, make_client_app, make_server_app  # noqa: E402


# -----------------------------------------------------------------------------
# The Deployment Engine on one machine: a SuperLink and N SuperNodes on 127.0.0.1


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)   # unwinds through Localhost.__exit__, which stops the children


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_executable(name: str) -> str:
    """A Flower command (flower-superlink, flower-supernode, flwr) from beside this Python, so a
    virtual environment's Flower is found without activating it; else from PATH."""
    import shutil
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.access(here, os.X_OK) else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is neither beside {sys.executable} nor on PATH: "
                                "pip install -r requirements-flower.txt")
    return found


# The environment of every Flower process started here (and of docs/flower.md's node commands):
# no telemetry (an offline node waits up to 4 s a process for it), and a SuperExec that looks
# for new work every 0.25 s instead of every 1 s. Measured with 3 idle SuperNodes on 2 cores:
# 1, 5 and 9 CPU-seconds in 30 s at 1, 0.25 and 0.1 s, so smaller costs more than it saves.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM it when the process that started it dies, even by
    SIGKILL (Linux prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Localhost:
    """A SuperLink and `n` SuperNodes as separate processes on 127.0.0.1 (insecure, no TLS),
    each in its own process group; `run` submits this folder with `flwr run`. They are
    stopped on exit, on SIGTERM (which a `timeout` or a job scheduler sends: the handler turns
    it into an exit) and, if this process is killed outright, by the kernel (each child is
    told to die with its parent). What tests/test_flower.py and benchmarks/bench_flower.py
    use; on real machines, start the same commands by hand (README: docs/flower.md)."""

    def __init__(self, n: int, workdir: str, node_set: str = ""):
        self.n, self.workdir, self.node_set = n, workdir, node_set
        self.procs: list = []
        self.env = dict(os.environ, FLWR_HOME=os.path.join(workdir, "flwr-home"), **FLOWER_ENV)
        self.previous_sigterm = None

    def start(self, args: list[str], log: str):
        import subprocess
        return subprocess.Popen([flower_executable(args[0]), *args[1:]], stdout=open(os.path.join(self.workdir, log), "w"),
                                stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=self.workdir,
                                preexec_fn=_die_with_parent)

    def __enter__(self) -> "Localhost":
        import signal
        if threading_main():
            self.previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
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
            return subprocess.run([flower_executable("flwr"), "run", HERE, "localhost", "--run-config", run_config,
                                   "--stream"],
                                  stdout=log, stderr=subprocess.STDOUT, env=self.env, timeout=timeout, cwd=self.workdir)

    def kill_node(self, i: int) -> None:
        import signal
        os.killpg(self.nodes[i].pid, signal.SIGKILL)   # the SuperNode and the ClientApp it runs
        self.nodes[i].wait()

    def pause_node(self, i: int, pause: bool = True) -> None:
        """SIGSTOP (pause) or SIGCONT the SuperNode and its ClientApps: to Flower, a paused node
        is a machine too busy to send its heartbeats."""
        import signal
        os.killpg(self.nodes[i].pid, signal.SIGSTOP if pause else signal.SIGCONT)

    def __exit__(self, *exc) -> None:
        import signal
        if self.previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self.previous_sigterm)
            self.previous_sigterm = None
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)   # a paused process would see SIGTERM only once continued
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
