"""The C files of csrc/ form layers: no file calls a file that calls it back, directly or through
others (the call graph read from the objects with nm, tests/c_layers.py), and no header includes
itself through others. The checker is shown to fail on a cyclic pair of files."""
from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from . import c_layers as L


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("c_layers")
    commands = L.find_compile_commands()
    if commands is None or not L.covers(commands):
        commands = L.configure(tmp / "cmake")
    return L.file_graph(L.objects(commands, tmp))


def test_no_call_cycle_between_csrc_files(graph):
    assert set(graph) == {p.name for p in L.CSRC.glob("*.c")}
    cycles = [L.describe_cycle(graph, L.a_cycle(graph, c)) for c in L.strongly_connected(graph)]
    assert not cycles, "call cycles between files of csrc/:\n" + "\n".join(cycles)


def test_the_leaf_calls_nothing_and_the_backend_is_on_top(graph):
    """ripple_base.c (errors, counters, clock) depends on no other file; nothing depends on the
    backend, the entry point of hosts."""
    assert graph["ripple_base.c"] == {}
    assert not any("ripple_backend.c" in deps for deps in graph.values())


def test_no_include_cycle_in_csrc():
    inc = L.include_graph()
    as_graph = {f: {g: set() for g in deps} for f, deps in inc.items()}
    cycles = [" -> ".join(L.a_cycle(as_graph, c)) for c in L.strongly_connected(as_graph)]
    assert not cycles, "include cycles in csrc/:\n" + "\n".join(cycles)


def test_numberings_are_declared_in_ripple_h_only():
    """The enums Python reads through the binding (modes, cache policies, activity rules, ...) are
    declared once, in the public header."""
    names = re.findall(r"^\s*(RIPPLE_[A-Z0-9_]+)\s*=", (L.CSRC / "ripple.h").read_text(), flags=re.M)
    assert {"RIPPLE_MODE_AUTO", "RIPPLE_CACHE_PINNED", "RIPPLE_RULE_MAGNITUDE", "RIPPLE_RULE_GATE"} <= set(names)
    for p in L.CSRC.iterdir():
        if p.name != "ripple.h" and p.suffix in (".c", ".h"):
            text = p.read_text()
            again = [n for n in names if re.search(rf"(#define\s+{n}\b|\b{n}\s*=[^=])", text)]
            assert not again, f"{p.name} declares {again} again"


def _compile(tmp: Path, sources: dict) -> dict:
    objs = {}
    for name, code in sources.items():
        src = tmp / name
        src.write_text(textwrap.dedent(code))
        objs[name] = tmp / (name + ".o")
        subprocess.run(["cc", "-c", "-O2", "-fPIC", str(src), "-o", str(objs[name])], check=True)
    return objs


def test_the_checker_finds_a_cycle(tmp_path):
    objs = _compile(tmp_path, {
        "a.c": "int b_two(void); int a_one(void) { return 1; } int a_main(void) { return b_two(); }",
        "b.c": "int a_one(void); int b_two(void) { return a_one() + 1; }",
        "c.c": "int a_one(void); int c_three(void) { return a_one(); }",
    })
    graph = L.file_graph(objs)
    assert graph == {"a.c": {"b.c": {"b_two"}}, "b.c": {"a.c": {"a_one"}}, "c.c": {"a.c": {"a_one"}}}
    comps = L.strongly_connected(graph)
    assert comps == [["a.c", "b.c"]]
    assert L.describe_cycle(graph, L.a_cycle(graph, comps[0])) == \
        "a.c -> b.c -> a.c\n  a.c -> b.c: b_two\n  b.c -> a.c: a_one"


def test_the_checker_passes_layers_and_orders_them(tmp_path):
    objs = _compile(tmp_path, {
        "a.c": "int a_one(void) { return 1; }",
        "b.c": "int a_one(void); int b_two(void) { return a_one() + 1; }",
        "c.c": "int a_one(void); int b_two(void); int c_three(void) { return a_one() + b_two(); }",
    })
    graph = L.file_graph(objs)
    assert L.strongly_connected(graph) == []
    assert L.layers(graph) == [["a.c"], ["b.c"], ["c.c"]]


def test_the_checker_finds_a_longer_cycle(tmp_path):
    objs = _compile(tmp_path, {
        "a.c": "int b_two(void); int a_one(void) { return b_two(); }",
        "b.c": "int c_three(void); int b_two(void) { return c_three(); }",
        "c.c": "int a_one(void); int c_three(void) { return a_one(); }",
    })
    graph = L.file_graph(objs)
    comps = L.strongly_connected(graph)
    assert comps == [["a.c", "b.c", "c.c"]]
    assert L.a_cycle(graph, comps[0]) == ["a.c", "b.c", "c.c", "a.c"]


def test_default_storage_model_is_declared_in_c():
    """The default device's cost model comes from the library (ripple_storage_default_model), with
    the values of storage.DEFAULT."""
    from ripple_gguf import binding
    from ripple_gguf.runtime import storage

    assert binding.storage_default_model() == \
        (storage.DEFAULT.latency_s, storage.DEFAULT.bandwidth_bps, storage.DEFAULT.parallelism)
