"""Client states and a round's messages in files (tools/store.py): the key-by-key writer and
reader against safetensors' own, the streamed aggregation equal to the in-memory one bit for
bit, and a round that holds one client state at a time whatever K is."""

import json

import pytest
import torch
from safetensors.torch import load_file

import fed
import pilot
import train
from test_fed import _cfg
from tools import store


def _state(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"lm.b.lora_B": torch.randn(5, 2, generator=g).to(dtype), "lm.a.lora_A": torch.randn(2, 3, generator=g).to(dtype),
            "lm.c.lora_A": torch.randn(2, 7, generator=g).to(dtype)}


def _files(tmp_path, states: list) -> list:
    """Each state saved as a file and read back lazily."""
    for k, s in enumerate(states):
        store.save_state(str(tmp_path / f"{k}.safetensors"), s)
    return [store.StateFile(str(tmp_path / f"{k}.safetensors")) for k in range(len(states))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_file_written_key_by_key_is_safetensors_own_and_keeps_the_order(tmp_path, dtype):
    state = _state(0, dtype)
    w = store.StateWriter(str(tmp_path / "s.safetensors"), store.spec_of(state))
    for k, v in state.items():
        w[k] = v
    back = w.close()
    plain = load_file(str(tmp_path / "s.safetensors"))            # safetensors reads it as its own
    assert set(plain) == set(state) and all(torch.equal(plain[k], state[k]) for k in state)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert back.nbytes == sum(v.numel() * v.element_size() for v in state.values())
    store.save_state(str(tmp_path / "t.safetensors"), state)      # save_file's path keeps the order too
    assert list(store.StateFile(str(tmp_path / "t.safetensors"))) == list(state)


def test_a_writer_refuses_keys_out_of_order_and_an_incomplete_file(tmp_path):
    state = _state(0)
    w = store.StateWriter(str(tmp_path / "s.safetensors"), store.spec_of(state))
    with pytest.raises(KeyError, match="out of order"):
        w["lm.a.lora_A"] = state["lm.a.lora_A"]
    w["lm.b.lora_B"] = state["lm.b.lora_B"]
    with pytest.raises(ValueError, match="2 declared tensors were never written"):
        w.close()
    assert not (tmp_path / "s.safetensors").exists()


def test_streamed_aggregation_equals_the_in_memory_one_bit_for_bit(tmp_path):
    states = [_state(k) for k in range(5)]
    files = _files(tmp_path, states)
    assert torch.equal(pilot.pairwise_distances(files), pilot.pairwise_distances(states))
    W = pilot.ata(pilot.pairwise_distances(states), [1, 2, 3, 4, 5])
    out = [store.StateWriter(str(tmp_path / f"out{k}.safetensors"), store.spec_of(files[0])) for k in range(5)]
    pilot.weighted_averages_into(files, W, out)
    streamed = [o.close() for o in out]
    for got, want in zip(streamed, pilot.weighted_averages(states, W)):
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("max_bytes", [8, 40, 2 ** 26])
def test_mixing_in_row_blocks_is_the_same_to_the_bit(tmp_path, max_bytes):
    """store.mix cuts each key into blocks of rows (one row at a time at max_bytes 8, a few at 40,
    whole tensors at 64 MiB): every element is the same K-term sum."""
    states = [_state(k) | {"connector.gate": torch.tensor(0.25 * k), "b": torch.randn(6)} for k in range(5)]
    files = _files(tmp_path, states)
    W = torch.softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    want = pilot.weighted_averages(states, W)
    writers = [store.StateWriter(str(tmp_path / f"w{k}.safetensors"), store.spec_of(files[0])) for k in range(3)]
    store.mix(files, W, writers, max_bytes=max_bytes)
    dicts = [dict() for _ in range(3)]
    store.mix(states, W, dicts, max_bytes=max_bytes)
    for got_file, got_dict, w in zip([o.close() for o in writers], dicts, want):
        assert all(torch.equal(got_file[k], w[k]) and torch.equal(got_dict[k], w[k]) for k in w)


def test_the_gram_matrix_in_blocks_is_pilots_to_the_bit_or_within_float64_rounding(tmp_path):
    states = [_state(k) for k in range(4)]
    files = _files(tmp_path, states)
    cs = store.ClientStore(str(tmp_path / "cs"), ["a"])
    want = pilot.gram_matrix(states)
    assert torch.equal(cs.gram(files), want)                          # every key in one block: the same sums
    torch.testing.assert_close(cs.gram(files, max_bytes=64), want, rtol=1e-12, atol=1e-12)   # a row at a time
    torch.testing.assert_close(pilot.pairwise_distances(files, cs.gram(files, max_bytes=64)),
                               pilot.pairwise_distances(states), rtol=1e-10, atol=1e-10)


def test_the_server_with_a_store_sends_what_it_sends_from_memory(tmp_path):
    n, tasks = [3, 1, 2, 4], ["a", "a", "b", "b"]
    g = torch.Generator().manual_seed(0)
    uploads = {k: {"lora": _state(k), "task_adapter": {"linear_1.weight": torch.randn(3, 2, generator=g)}}
               for k in range(4)}
    memory = fed.Server("pilot", tasks, n, None).aggregate(uploads, True)
    cs = store.ClientStore(str(tmp_path), ["c0", "c1", "c2", "c3"])
    files = {k: {gr: cs.message_file(f"up_{k}.{gr}", t) for gr, t in up.items()} for k, up in uploads.items()}
    server = fed.Server("pilot", tasks, n, None)
    server.store = cs
    streamed = server.aggregate(files, True)
    assert streamed.mix.ids == memory.mix.ids
    assert torch.equal(streamed.mix.W, memory.mix.W) and torch.equal(streamed.mix.d, memory.mix.d)
    for k in range(4):
        assert set(streamed.downloads[k]) == set(memory.downloads[k])
        assert isinstance(streamed.downloads[k]["lora"], store.StateFile)
        for group, tensors in memory.downloads[k].items():
            assert all(torch.equal(streamed.downloads[k][group][n], t) for n, t in tensors.items())


@pytest.mark.parametrize("clients_per_task", [1, 3])
def test_a_round_holds_one_client_state_at_a_time_whatever_k(tiny_llava_dir, clients_per_task):
    cfg = _cfg(tiny_llava_dir)
    cfg.data.clients_per_task = clients_per_task
    f = train.build(cfg)
    for r in (1, 2):                                # stage 1 with the handover, then stage 2
        f.run_round(r)
    f.engine.evaluate_cross()
    assert f.engine.store.peak_live == 1 and f.engine.store.live() == 0
    assert len(f.engine.clients) == 3 * clients_per_task


def test_a_run_folder_holds_the_states_and_each_checkpoint_links_them(tmp_path, embedded_dir):
    import os
    from test_train import _write_config
    config = _write_config(tmp_path, embedded_dir, stage1_rounds=1, stage2_rounds=1)
    train.main(["--config", config])
    run = tmp_path / "run"
    last = run / "ckpt" / "round_002"
    for name in json.load(open(run / "run.json"))["identity"]["clients"]:
        live, kept = run / "states" / f"client_{name[0]}.safetensors", last / f"client_{name[0]}.safetensors"
        assert os.path.samefile(live, kept)                      # one file: the checkpoint is a link
        assert not os.path.samefile(kept, run / "ckpt" / "round_001" / f"client_{name[0]}.safetensors")
