"""Smoke test of benchmarks/: each script runs at its smallest setting and prints one JSON
line whose correctness figures hold (timings are reported, never asserted)."""

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["ctmoa", "difference_loss", "ata", "memory", "step", "round_overhead", "data", "base_load", "clients"]


def _run(name):
    out = subprocess.run([sys.executable, os.path.join("benchmarks", f"bench_{name}.py"), "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def smoke_runs():
    """Every script's smoke run, two at a time, one torch thread each (their start-up, imports
    and a tiny base build, is mostly one core's work); each test waits for its own."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(_run, name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_smoke(name, smoke_runs):
    res = smoke_runs[name].result(timeout=1200)
    if name == "ctmoa":
        assert res["top_k=3"]["max_abs_diff"] < 1e-5 and res["top_k=1"]["max_abs_diff"] < 1e-5
    if name == "difference_loss":
        assert all(row["rel_diff"] < 1e-4 for row in res["rows"])
    if name == "ata":
        assert res["rows"][0]["K"] == 3
    if name == "memory":
        assert [row["K"] for row in res["rows"]] == [1, 3]
    if name == "step":
        assert set(res["tiny"]) >= {"plain", "pilot_stage1", "pilot_stage2"} and res["tiny"]["image_tokens"] == 16
    if name == "round_overhead":
        assert 0 <= res["overhead_fraction"] < 1 and [r["stage"] for r in res["rows"]] == [1, 2]
    if name == "data":
        assert [row["records"] for row in res["rows"]] == [200] and res["rows"][0]["pictures_per_s_0_workers"] > 0
    if name == "clients":   # the server's round at K = 3 from files and in memory, each in its own process
        assert [(r["K"], r["mode"]) for r in res["rows"]] == [(3, "streamed"), (3, "memory")]
        assert all(r["bytes_read_gb"] >= 0 and r["peak_rss_mb"] > 0 for r in res["rows"])
    if name == "base_load":
        assert len(res["runs"]) == 1 and res["safetensors_bytes"] > 0 and res["runs"][0]["load_s"] > 0


def test_every_mutant_breaks_a_line_the_code_holds_once():
    # benchmarks/mutants.py edits one line of a copy of the code; a line that moved or changed
    # would leave the mutant unapplied, so each must be found exactly once where it says
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import mutants
    finally:
        sys.path.pop(0)
    for name, _, path, old, new, _ in mutants.MUTANTS:
        text = open(os.path.join(ROOT, path)).read()
        assert text.count(old) == 1, (name, path)
        assert old != new and text.replace(old, new) != text
