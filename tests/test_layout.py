"""The structure drawn from the imports (scripts/structure.py): no circles, so no import runs back
up a floor; the runtime stands alone; what says it depends on nothing does not."""
from __future__ import annotations

import importlib.util
import os

import pytest

from tests.helpers import ROOT

_spec = importlib.util.spec_from_file_location("structure", os.path.join(ROOT, "scripts", "structure.py"))
structure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(structure)   # type: ignore[union-attr]


@pytest.mark.parametrize("by_room", [True, False], ids=["rooms", "modules"])
def test_no_circles(by_room):
    edges = structure.graph(by_room)
    assert len(edges) > 10
    assert structure.circles(edges) == []


def test_the_runtime_imports_nothing_of_the_supervisor():
    found = structure.modules()
    for name, path in found.items():
        if name.startswith("runtime_python"):
            assert not {t for t in structure.imports(name, path, set(found))
                        if t.startswith("openedge_function")}, name


def test_the_supervisor_never_imports_the_runtimes_server():
    found = structure.modules()
    for name, path in found.items():
        if name.startswith("openedge_function"):
            imported = structure.imports(name, path, set(found))
            assert "runtime_python.server" not in imported, name
            assert "runtime_python.template" not in imported, name


@pytest.mark.parametrize("name", ["openedge_function.instances.lifecycle", "openedge_function.errors",
                                  "openedge_function.config.converters", "openedge_function.dataplane",
                                  "runtime_python.wire"])
def test_what_depends_on_nothing_imports_nothing_of_ours(name):
    found = structure.modules()
    assert structure.imports(name, found[name], set(found)) == set()


def test_the_floors_put_the_daemon_above_the_message_path():
    levels = structure.floors(structure.graph())
    assert levels["daemon"] > levels["rules"] > levels["pool"] > levels["worker"] > levels["instances/"]
    assert levels["errors"] == 0 and levels["runtime_python.wire"] == 0
