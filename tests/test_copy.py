"""Every public component of pilot.py copies out whole: its source, plus the definitions its
docstring's `Copy with:` line names (and theirs, in turn), run in a fresh namespace that holds
only pilot.py's imports (torch, math, typing) and give, on a small input, the module's own
output bit for bit."""

import ast
import inspect
import math
import re

import pytest
import torch
import torch.nn as nn

import pilot

SOURCE = inspect.getsource(pilot)
TREE = ast.parse(SOURCE)
IMPORTS = "\n".join(ast.get_source_segment(SOURCE, node) for node in TREE.body
                    if isinstance(node, (ast.Import, ast.ImportFrom)))
PUBLIC = ["LoRALinear", "add_lora", "is_lora", "lora_state_dict", "set_dropout_generator", "merge_lora",
          "reset_linear", "Adapter", "ConnectorOutput", "PlainConnector", "prox_term", "difference_loss",
          "TaskClientConnector", "route", "balance_loss", "router_z_loss", "CTMoA", "Stage2Connector", "expert_tasks",
          "expert_slot", "stage2_from_stage1", "check_same_keys", "weighted_average", "weighted_averages",
          "weighted_averages_into", "task_average", "gram_matrix", "pairwise_distances", "nearest_others",
          "nearest_distance", "ata_spread", "ata_kernel", "ata_top_m", "ata"]


def _definition(name: str) -> str:
    """The source of a top-level def, class or assignment of pilot.py, decorators included."""
    for node in TREE.body:
        names = [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else \
                [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
        if name in names:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            return "\n".join(SOURCE.splitlines()[start - 1:node.end_lineno])
    raise KeyError(f"pilot.py defines no {name}")


def _copy_with(name: str) -> list[str]:
    """The names on a definition's `Copy with:` line, the end of its docstring ([] for
    'nothing else'); constants (tuples, dicts) have none."""
    obj = getattr(pilot, name)
    if isinstance(obj, (tuple, dict)):
        return []
    found = re.search(r"Copy with: (.*)$", " ".join((obj.__doc__ or "").split()))
    assert found, f"{name}: its docstring does not end with a 'Copy with:' line"
    listed = found.group(1).rstrip(".")
    if listed == "nothing else":
        return []
    return [re.sub(r"\s*\(.*\)", "", part).strip() for part in listed.split(",")]


def _closure(name: str) -> list[str]:
    """name and everything its Copy with lines name, transitively, in pilot.py's order."""
    want, todo = {name}, [name]
    while todo:
        for dep in _copy_with(todo.pop()):
            if dep not in want:
                want.add(dep)
                todo.append(dep)
    return [n for n in _closure_order() if n in want]


def copied(*names: str) -> dict:
    """A fresh namespace holding pilot.py's imports and the copies of `names` (their closures
    only, each definition once)."""
    wanted = {n for name in names for n in _closure(name)}
    order = [n for n in _closure_order() if n in wanted]
    code = IMPORTS + "\n\n" + "\n\n".join(_definition(n) for n in order) + "\n"
    namespace = {"__name__": "copied"}
    exec(compile(code, f"<copy of {', '.join(names)}>", "exec"), namespace)
    return namespace


def _closure_order() -> list[str]:
    order = []
    for node in TREE.body:
        if isinstance(node, ast.Assign):
            order += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            order.append(node.name)
    return order


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_component_says_what_to_copy_with_it(name):
    _closure(name)   # every listed name exists and every listed definition has its own line


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_lora_copies_out_whole():
    ns = type("m", (), copied("add_lora", "lora_state_dict", "set_dropout_generator", "merge_lora"))
    results = []
    for m in (pilot, ns):
        torch.manual_seed(0)
        block = nn.ModuleDict({"q_proj": nn.Linear(8, 6), "other": nn.Linear(8, 8)})
        names = m.add_lora(block, 2, 4.0, 0.5, ("q_proj",), _g(1))
        with torch.no_grad():
            block.q_proj.lora_B.copy_(torch.randn(6, 2, generator=_g(2)))
        m.set_dropout_generator(block, _g(3))
        out = block.q_proj.train()(torch.randn(5, 8, generator=_g(4)))
        state = m.lora_state_dict(block)
        results.append((names, out, state, m.merge_lora(block).q_proj.weight))
    assert _same(*results)


@pytest.mark.parametrize("name,build", [
    ("Adapter", lambda m: m.Adapter(6, 8, generator=_g())),
    ("PlainConnector", lambda m: m.PlainConnector(6, 8, _g())),
    ("TaskClientConnector", lambda m: m.TaskClientConnector(6, 8, False, _g())),
    ("CTMoA", lambda m: m.CTMoA(6, 8, 3, None, _g())),
    ("CTMoA", lambda m: m.CTMoA(6, 8, 3, 1, _g())),
    ("Stage2Connector", lambda m: m.Stage2Connector(6, 8, 3, None, True, 0.5, _g())),
    ("Stage2Connector", lambda m: m.Stage2Connector(6, 8, 3, 1, False, 1.0, _g())),
])
def test_connectors_copy_out_whole(name, build):
    ns = copied(name)
    copy_module, own = build(type("m", (), ns)), build(pilot)
    h = torch.randn(2, 4, 6, generator=_g(5))
    a, b = own(h), copy_module(h)
    assert _same(own.state_dict(), copy_module.state_dict())
    assert _same(tuple(a) if isinstance(a, tuple) else a, tuple(b) if isinstance(b, tuple) else b)


def test_difference_loss_and_stage2_from_stage1_copy_out_whole():
    x, y = torch.randn(3, 4, 5, generator=_g(1)), torch.randn(3, 4, 5, generator=_g(2))
    assert torch.equal(copied("difference_loss")["difference_loss"](x, y), pilot.difference_loss(x, y))
    ns = copied("stage2_from_stage1")
    adapters = {t: pilot.Adapter(6, 8, generator=_g(i)).state_dict() for i, t in enumerate(("b", "a", "c"))}
    h = torch.randn(2, 4, 6, generator=_g(7))
    outs = []
    for mod in (pilot, type("m", (), ns)):
        stage1 = mod.TaskClientConnector(6, 8, False, _g(8))
        moa = mod.stage2_from_stage1(stage1, adapters, "c", None, False, True, _g(9))
        outs.append((moa.state_dict(), tuple(moa(h))))
    assert _same(*outs)


def test_server_math_copies_out_whole():
    states = [{"x": torch.randn(3, 2, generator=_g(i)), "y": torch.randn(4, generator=_g(10 + i))} for i in range(4)]
    n = [3, 1, 2, 2]
    d = pilot.pairwise_distances(states)
    assert torch.equal(copied("pairwise_distances")["pairwise_distances"](states), d)
    for form in pilot.ATA_FORMS:
        ns = copied("ata")
        assert torch.equal(ns["ata"](d, n, form, 2), pilot.ata(d, n, form, 2))
    W = pilot.ata(d, n)
    assert torch.equal(W, pilot.ata(d, n, "spread", None, 0.25))   # the default form and its default tau
    assert _same(copied("weighted_averages")["weighted_averages"](states, W), pilot.weighted_averages(states, W))
    assert _same(copied("task_average")["task_average"](states, n, ["a", "b", "a", "b"]),
                 pilot.task_average(states, n, ["a", "b", "a", "b"]))
    assert torch.equal(copied("pairwise_distances")["pairwise_distances"](states), pilot.pairwise_distances(states))
    assert copied("expert_slot")["expert_slot"](2) == pilot.expert_slot(2) == "psi_t_other.1"
    assert math.isfinite(float(W.sum()))
