"""Shared fixtures: a tiny random LLaVA checkpoint saved with save_pretrained, built once per
test session (no downloads: everything comes from transformers configs)."""

import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one torch thread: the tiny models gain nothing from two, and the suite's background runs and
# subprocesses share the two cores (two threads each would fight over them in OpenMP's spin-waits)
torch.set_num_threads(1)

import model  # noqa: E402
from tools import embedded  # noqa: E402

TINY = dict(image_size=32, patch_size=8, vision_width=16, vision_layers=2, vision_heads=2,
            llm_width=32, llm_layers=2, llm_heads=2, llm_mlp=64)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A random tiny LLaVA checkpoint directory, loadable by path (a)."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration
    path = str(tmp_path_factory.mktemp("tiny_llava"))
    tok = embedded.embedded_tokenizer()
    cfg = embedded.tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                                  tok.eos_token_id, **TINY)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
    """The embedded base recipe at test size: a few pretraining steps only."""
    cfg = model.ModelConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), embedded_pretrain_steps=5)
    return embedded.embedded_checkpoint(cfg)


class Background:
    """fn(*args) in a daemon thread; join() returns what it returned or raises what it raised."""

    def __init__(self, fn, *args):
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.outcome["result"] = fn(*args)
        except BaseException as e:   # handed to the test that joins
            self.outcome["error"] = e

    def join(self, timeout: float = 1800):
        self.thread.join(timeout)    # an outer bound only: a broken run must not hang the suite
        assert not self.thread.is_alive(), "the background run did not end"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["result"]


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """Work that waits on other processes, started in background threads when the session starts, so that
    its waiting overlaps the rest of the suite. A test module lists it in BACKGROUND = {fixture
    name: fn(tmp_path, embedded_dir)}; one run starts for every such fixture that a selected
    test uses (none when none is selected). -> {fixture name: Background}."""
    started = {}
    for item in request.session.items:
        for name, fn in getattr(getattr(item, "module", None), "BACKGROUND", {}).items():
            if name in item.fixturenames and name not in started:
                started[name] = Background(fn, tmp_path_factory.mktemp(name), request.getfixturevalue("embedded_dir"))
    yield started
    for run in started.values():
        run.thread.join(timeout=1800)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Under CI (CI=true, as .ci/run runs) every optional extra is installed, so a skipped test
    is a failure: nothing is hidden there. Elsewhere a test of a missing extra skips, its
    reason naming the install line."""
    skipped = terminalreporter.stats.get("skipped", [])
    if os.environ.get("CI") == "true" and skipped:
        terminalreporter.write_line(f"CI: {len(skipped)} test(s) skipped; every optional extra must be installed "
                                    "(see .ci/run)", red=True)
        terminalreporter._session.exitstatus = 1
