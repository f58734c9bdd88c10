"""Each family whose files carry their own model is one module implementing the declared
protocol (engine.families.Family); the engine reaches them only through it."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from engine.families import MODULES, Family, family

ENGINE = Path(__file__).resolve().parents[2] / "engine"
MEMBERS = [name for name in vars(Family) if not name.startswith("_")]
CONSTANTS = list(Family.__annotations__)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_family_module_implements_every_member_of_the_protocol(name):
    module = importlib.import_module(MODULES[name])
    assert family(name) is module and name == module.NAME
    for constant in CONSTANTS:
        assert isinstance(getattr(module, constant), str | tuple), constant
    for method in (m for m in MEMBERS if m not in CONSTANTS):
        want = [p for p in inspect.signature(getattr(Family, method)).parameters if p != "self"]
        got = list(inspect.signature(getattr(module, method)).parameters)
        assert got == want, f"{MODULES[name]}.{method}{tuple(got)}: the protocol says {want}"
    assert set(module.NOT_OFFERED).isdisjoint(module.OWN_FORMATS)


def test_no_engine_module_names_a_family_module_but_through_the_protocol():
    """Adding a family touches its own module and engine.families' table, nothing else."""
    family_modules = {m.rsplit(".", 1)[1] for m in MODULES.values()}
    reaching = []
    for path in ENGINE.glob("*.py"):
        if path.stem in family_modules or path.stem == "families":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "engine":
                named = {a.name for a in node.names} & family_modules
                if named:
                    reaching.append(f"{path.name}:{node.lineno} {sorted(named)}")
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").removeprefix("engine.") in family_modules
            ):
                reaching.append(f"{path.name}:{node.lineno} {node.module}")
    assert not reaching, reaching
