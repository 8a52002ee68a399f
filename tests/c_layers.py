"""The call graph between the C files of csrc/, read from their object files: file A depends on file
B when A's object leaves undefined a symbol B's object defines (a function called or a variable
used). tests/test_c_layers.py asserts the graph is acyclic; ``python tests/c_layers.py`` prints it.

The objects come from the build's compile_commands.json (CMake writes it next to the build:
``build/temp.*/cmake``), so they are compiled with exactly the library's include directories,
definitions and options: reused when newer than every file of csrc/, else compiled again into a
temporary directory.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

Graph = Dict[str, Dict[str, Set[str]]]  # file -> {file it depends on: the symbols it takes from it}


def find_compile_commands(root: Path = ROOT) -> Optional[Path]:
    """The newest compile_commands.json of a build of this tree, None when it was never built here."""
    found = sorted((root / "build").glob("temp.*/cmake/compile_commands.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def configure(build_dir: Path, root: Path = ROOT) -> Path:
    """A CMake configure of the tree into build_dir (no compile): its compile_commands.json."""
    subprocess.run(["cmake", "-S", str(root), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True, text=True)
    return build_dir / "compile_commands.json"


def covers(commands: Path, csrc: Path = CSRC) -> bool:
    """Whether the compile commands compile every C file of csrc/ (a build configured before a file
    was added does not)."""
    listed = {Path(e["file"]).name for e in json.loads(commands.read_text())}
    return {p.name for p in csrc.glob("*.c")} <= listed


def _output_arg(args: List[str]) -> int:
    return args.index("-o") + 1


def objects(commands: Path, out_dir: Path, csrc: Path = CSRC) -> Dict[str, Path]:
    """{source file name: its object} for every file of csrc/ in the compile commands."""
    entries = [e for e in json.loads(commands.read_text()) if Path(e["file"]).resolve().parent == csrc.resolve()]
    newest = max(p.stat().st_mtime for p in csrc.iterdir())
    out: Dict[str, Path] = {}
    todo = []
    for e in entries:
        args = shlex.split(e["command"]) if "command" in e else list(e["arguments"])
        name = Path(e["file"]).name
        built = Path(e["directory"]) / args[_output_arg(args)]
        if built.exists() and built.stat().st_mtime >= newest:
            out[name] = built
            continue
        obj = out_dir / (name + ".o")
        args[_output_arg(args)] = str(obj)
        todo.append((args, e["directory"]))
        out[name] = obj

    def run(job):
        args, cwd = job
        r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr}")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(run, todo))
    return out


def symbols(obj: Path) -> Tuple[Set[str], Set[str]]:
    """(global symbols the object defines, symbols it leaves undefined)."""
    r = subprocess.run(["nm", "-P", str(obj)], capture_output=True, text=True, check=True)
    defined, undefined = set(), set()
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name, kind = parts[0], parts[1]
        if kind in ("U", "w", "v"):
            undefined.add(name)
        elif kind.isupper():  # global: T text, D data, B bss, R read-only, C common, ...
            defined.add(name)
    return defined, undefined


def file_graph(objs: Dict[str, Path]) -> Graph:
    syms = {name: symbols(obj) for name, obj in objs.items()}
    owner: Dict[str, str] = {}
    for name, (defined, _) in syms.items():
        for s in defined:
            if s in owner:
                raise ValueError(f"{s} is defined by both {owner[s]} and {name}")
            owner[s] = name
    graph: Graph = {name: {} for name in objs}
    for name, (_, undefined) in syms.items():
        for s in undefined:
            if s in owner and owner[s] != name:
                graph[name].setdefault(owner[s], set()).add(s)
    return graph


def strongly_connected(graph: Graph) -> List[List[str]]:
    """Tarjan's strongly connected components with more than one file: each holds a cycle."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(1000, 4 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def a_cycle(graph: Graph, component: Iterable[str]) -> List[str]:
    """One cycle through the first file of a strongly connected component: [a, b, ..., a]."""
    comp = set(component)
    start = min(comp)
    parent: Dict[str, Optional[str]] = {start: None}
    queue = deque([start])
    while queue:  # breadth first within the component, back to start: a shortest cycle
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if w in comp and w not in parent:
                parent[w] = v
                queue.append(w)
    raise ValueError(f"no cycle through {start}")


def describe_cycle(graph: Graph, cycle: List[str]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        lines.append(f"  {a} -> {b}: {', '.join(sorted(graph[a][b]))}")
    return "\n".join(lines)


def layers(graph: Graph) -> List[List[str]]:
    """The files by level (an acyclic graph): level 0 depends on no other file, level n on files
    of levels below n only."""
    level: Dict[str, int] = {}

    def depth(v: str) -> int:
        if v not in level:
            level[v] = -1
            level[v] = 1 + max((depth(w) for w in graph[v]), default=-1)
        return level[v]

    for v in graph:
        depth(v)
    out: List[List[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for v, n in sorted(level.items()):
        out[n].append(v)
    return out


def include_graph(csrc: Path = CSRC) -> Dict[str, Set[str]]:
    """file -> the files of csrc/ it includes with #include "..."."""
    out: Dict[str, Set[str]] = {}
    for p in sorted(csrc.iterdir()):
        if p.suffix in (".c", ".h"):
            out[p.name] = {line.split('"')[1] for line in p.read_text().splitlines()
                           if line.startswith("#include \"") and (csrc / line.split('"')[1]).exists()}
    return out


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        commands = find_compile_commands()
        if commands is None or not covers(commands):
            commands = configure(Path(tmp) / "cmake")
        graph = file_graph(objects(commands, Path(tmp)))
    for comp in strongly_connected(graph):
        print("cycle: " + describe_cycle(graph, a_cycle(graph, comp)))
    if strongly_connected(graph):
        return 1
    for n, files in enumerate(layers(graph)):
        print(f"level {n}:")
        for f in files:
            print(f"  {f:24} -> {', '.join(sorted(graph[f])) or '(nothing)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
