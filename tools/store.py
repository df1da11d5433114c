"""tools/store.py -- client states and a round's messages as safetensors files, not in memory.

At LLaVA-1.5-7B a client's state (LoRA r = 64 on every decoder linear, and the connector) is
0.8-1.3 GB of fp32 tensors; holding all K of them, and the round's K uploads and K personalised
downloads besides, is ~2 GB of host memory per client. Here each lives in a file:

    <run_dir>/states/client_<name>.safetensors     the client's current state (one in memory at a time)
    <run_dir>/states/round/...                     the round's uploads and downloads, rewritten each round

`StateFile` is a read-only {name: tensor} mapping over one file that reads a tensor when asked
(memory-mapped, then copied out, the map closed: no page stays mapped), keys in the order they
were written, so the server's key-by-key aggregation (pilot.pairwise_distances,
pilot.weighted_averages_into) touches one key of every client at a time. `StateWriter` writes a
file key by key as the aggregation produces it: the safetensors header (names, dtypes, shapes,
offsets) first, then each tensor's bytes, into a temp file renamed into place when complete.
`ClientStore` keeps the clients' states: load(k) and save(k, state), each save a new file (temp,
fsync, rename), so a round's checkpoint is a set of hard links to them (tools/runs.py), no
second copy of the bytes. `live()` counts the client states in memory (a test bounds it).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import weakref
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pilot

ORDER = "pilot.key_order"     # the safetensors metadata entry holding the keys in written order

# safetensors' dtype names (its format's spec), for the header StateWriter writes itself
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def fsync_rename(tmp: str, path: str) -> None:
    """Make tmp durable and move it to path atomically: readers see the old file or the new one."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def link_or_copy(src: str, dst: str) -> None:
    """A hard link (no second copy of the bytes); a copy where the file system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_state(path: str, state: Mapping[str, torch.Tensor]) -> None:
    """A whole state in one safetensors file (temp, fsync, rename), its key order recorded."""
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={ORDER: json.dumps(list(state))})
    fsync_rename(tmp, path)


class LoadedState(dict):
    """A client state in memory: a dict that the store can count while it is alive."""


class StateFile(Mapping):
    """{name: tensor} over one safetensors file, read a tensor at a time on access; the keys in
    the order they were written (ORDER), else the file's. `nbytes` from the header alone."""

    def __init__(self, path: str):
        self.path = path
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            self._keys = json.loads(meta[ORDER]) if ORDER in meta else list(f.keys())
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        self.nbytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
        self.spec = {k: (header[k]["dtype"], tuple(header[k]["shape"])) for k in self._keys}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.spec:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as f:   # mapped for this read only
            return f.get_tensor(key).clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def load(self) -> LoadedState:
        """Every tensor, in memory."""
        with safe_open(self.path, framework="pt") as f:
            return LoadedState((k, f.get_tensor(k).clone()) for k in self._keys)


class StateWriter:
    """A safetensors file written key by key: declare every (name, dtype, shape) first, then set
    each tensor in that order (w[name] = tensor); close() checks all came and renames it into
    place. The result loads with safetensors like any file save_file writes."""

    def __init__(self, path: str, spec: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path, self.tmp, self.order, self.next = path, path + ".tmp", list(spec), 0
        self._rows = 0   # rows of the current key written so far
        self.spec = {k: (dt, tuple(shape)) for k, (dt, shape) in spec.items()}
        header, offset = {}, 0
        for k, (dt, shape) in self.spec.items():
            size = torch.Size(shape).numel() * dt.itemsize
            header[k] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {ORDER: json.dumps(self.order)}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)                                   # the format aligns the data to 8 bytes
        self.fh = open(self.tmp, "wb")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.append(key, value, whole=True)

    def append(self, key: str, rows: torch.Tensor, whole: bool = False) -> None:
        """The next rows (along the first dimension) of `key`, in order; the key is complete once
        all its rows came. whole: `rows` is the whole tensor."""
        if self.next >= len(self.order) or key != self.order[self.next]:
            raise KeyError(f"{self.path}: {key!r} written out of order (expected {self.order[self.next:][:1]})")
        dt, shape = self.spec[key]
        done = self._rows
        want = shape if whole or not shape else (rows.shape[0],) + shape[1:]
        if rows.dtype != dt or tuple(rows.shape) != want or (shape and done + (want[0] if want else 0) > shape[0]):
            raise ValueError(f"{self.path}: {key} is {rows.dtype} {tuple(rows.shape)}, declared {dt} {shape}")
        self.fh.write(rows.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._rows = done + (want[0] if shape else 1)
        if self._rows == (shape[0] if shape else 1):
            self.next, self._rows = self.next + 1, 0

    def close(self) -> StateFile:
        if self.next != len(self.order):
            self.fh.close()
            raise ValueError(f"{self.path}: {len(self.order) - self.next} declared tensors were never written")
        self.fh.close()
        fsync_rename(self.tmp, self.path)
        return StateFile(self.path)


class Rows(Mapping):
    """Rows a:b of one tensor of a state, as a one-key state (read from a file: only those rows)."""

    def __init__(self, state: Mapping[str, torch.Tensor], key: str, a: int, b: int):
        self.state, self.key, self.a, self.b = state, key, a, b

    def __getitem__(self, key: str) -> torch.Tensor:
        if key != self.key:
            raise KeyError(key)
        if isinstance(self.state, StateFile):
            if not self.state.spec[key][1]:   # a scalar (the CT-MoA gate): read whole
                return self.state[key]
            with safe_open(self.state.path, framework="pt") as f:
                return f.get_slice(key)[self.a:self.b].clone()
        t = self.state[key]
        return t[self.a:self.b] if t.dim() else t

    def __iter__(self) -> Iterator[str]:
        return iter([self.key])

    def __len__(self) -> int:
        return 1


class _Into(dict):
    """Where pilot.weighted_averages_into puts one row block: appended to a file being written,
    or copied into a tensor allocated whole."""

    def __init__(self, target, a: int):
        super().__init__()
        self.target, self.a = target, a

    def __setitem__(self, key: str, rows: torch.Tensor) -> None:
        if isinstance(self.target, StateWriter):
            self.target.append(key, rows)
        elif rows.dim():
            self.target[key][self.a:self.a + rows.shape[0]] = rows
        else:
            self.target[key] = rows


def mix(states: list[Mapping[str, torch.Tensor]], W: torch.Tensor, outs: list, max_bytes: int = 2 ** 26) -> None:
    """pilot.weighted_averages_into, one key at a time in blocks of rows (its first dimension)
    small enough that the K tensors of a block take at most max_bytes: the memory of a mix no
    longer grows with K (a 4096 x 4096 adapter weight is 64 MiB a client). Each output element
    is the same K-term sum as the whole tensor's, so the result is the same to the bit (tested).
    outs[k]: a StateWriter, or a dict to fill (its tensors allocated here)."""
    spec = spec_of(states[0])
    for out in outs:
        if not isinstance(out, StateWriter):
            out.update({k: torch.empty(shape, dtype=dt) for k, (dt, shape) in spec.items()})
    for key, (dt, shape) in spec.items():
        rows = shape[0] if shape else 1
        row_bytes = max(1, torch.Size(shape[1:]).numel()) * 4 if shape else 4
        step = max(1, max_bytes // (len(states) * row_bytes))
        for a in range(0, rows, step):   # the one formula, pilot's, applied to each block
            b = min(rows, a + step)
            pilot.weighted_averages_into([Rows(s, key, a, b) for s in states], W, [_Into(o, a) for o in outs])


def spec_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of every tensor of a state, in its key order; a StateFile's from its header."""
    if isinstance(state, StateFile):
        names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        return {k: (names[dt], shape) for k, (dt, shape) in state.spec.items()}
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


class ClientStore:
    """The clients' states as files in `folder` (client_<name>.safetensors), one loaded at a time.
    `messages` is a sub-folder for a round's uploads and downloads (message_file, writer)."""

    def __init__(self, folder: str, names: list[str]):
        self.folder, self.names = folder, list(names)
        self.messages = os.path.join(folder, "round")
        os.makedirs(self.messages, exist_ok=True)
        self._live = 0          # client states loaded from here and still in memory
        self.peak_live = 0      # the most at once

    def path(self, k: int) -> str:
        return os.path.join(self.folder, f"client_{self.names[k]}.safetensors")

    def load(self, k: int) -> LoadedState:
        state = StateFile(self.path(k)).load()
        self._live += 1
        self.peak_live = max(self.peak_live, self._live)
        weakref.finalize(state, self._freed)
        return state

    def _freed(self) -> None:
        self._live -= 1

    def save(self, k: int, state: Mapping[str, torch.Tensor]) -> None:
        save_state(self.path(k), state)

    def adopt(self, k: int, path: str) -> None:
        """Make the file at `path` (a checkpoint's, on resume) client k's state: linked, not copied."""
        tmp = self.path(k) + ".tmp"
        link_or_copy(path, tmp)
        os.replace(tmp, self.path(k))

    def file(self, k: int) -> StateFile:
        return StateFile(self.path(k))

    def live(self) -> int:
        """How many client states loaded from this store are still in memory."""
        return self._live

    def message_file(self, name: str, tensors: Mapping[str, torch.Tensor]) -> StateFile:
        """One message group (a client's upload of LoRA, say) written to the round folder, read back lazily."""
        path = os.path.join(self.messages, f"{name}.safetensors")
        save_state(path, tensors)
        return StateFile(path)

    def gram(self, states: list, max_bytes: int = 2 ** 26) -> torch.Tensor:
        """fed.Server's Gram matrix of `states` (files or dicts): pilot.gram_matrix one key at a
        time in blocks of rows whose K float64 copies take at most max_bytes. A key that fits
        one block adds what pilot.gram_matrix adds, to the bit; a larger one (none in the tiny
        runs; LoRA's largest at 7B is 0.7M values) the same sum in another order, within
        float64 rounding."""
        K, gram = len(states), torch.zeros(len(states), len(states), dtype=torch.float64)
        for key, (dt, shape) in spec_of(states[0]).items():
            rows = shape[0] if shape else 1
            step = max(1, max_bytes // (K * 8 * max(1, torch.Size(shape[1:]).numel())))
            for a in range(0, rows, step):
                gram += pilot.gram_matrix([Rows(s, key, a, min(rows, a + step)) for s in states])
        return gram

    def mix(self, states: list, W: torch.Tensor, names: list[str] | None = None) -> list:
        """fed.Server's W-weighted sums of `states` (files or dicts) computed block by block
        (mix); row k written to the message file names[k] when names are given (a personalised
        LoRA per client), else returned as dicts (the task adapters, T of them)."""
        if names is None:
            outs = [dict() for _ in range(W.shape[0])]
            mix(states, W, outs)
            return outs
        outs = [self.writer(name, states[0]) for name in names]
        mix(states, W, outs)
        return [o.close() for o in outs]

    def writer(self, name: str, like: Mapping[str, torch.Tensor]) -> StateWriter:
        """A message file to fill key by key, with `like`'s names, dtypes, shapes and order
        (fed.Server.sink)."""
        return StateWriter(os.path.join(self.messages, f"{name}.safetensors"), spec_of(like))
