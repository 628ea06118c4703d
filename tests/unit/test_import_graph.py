"""The library's import graph follows the layers of docs/architecture.md (issue 13 items 2 and 8).

Every module of ``src/distckpt`` has a place in :data:`ORDER`; a module may
import (at the top or inside a function) only modules placed before it, so
the graph has no cycle. The pure layer does no I/O and no collectives. Every
module imports alone, in an interpreter that has imported no distckpt module yet.

A new module: give it a place in :data:`ORDER` and a paragraph in docs/architecture.md.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "distckpt"

#: The layers, bottom first. Within a layer, a module may import the ones listed before it.
LAYERS: dict[str, tuple[str, ...]] = {
    "pure": (
        "version", "errors", "logs", "names", "gcpause", "boundedjson", "hashing", "topology", "patterns", "layout",
        "components", "dtensor", "codec.dtypes", "codec.encoded", "codec.skeletontext",
        "codec.encoder", "codec.headerscan", "codec.header", "codec.decoder",
        "codec.targets", "codec", "digests", "jsontext", "fileentry", "manifest", "statecheck", "report", "rng",
        "progress",
        "planreports", "planning",
    ),
    "transport": ("waiting", "wire", "torchcomm", "transport", "collectives"),
    "storage": (
        "storage.posix", "storage.writer", "storage.reader", "storage.directories", "storage.inspection",
        "storage", "locks", "folder", "series",
    ),
    "reading": ("reading", "legacy", "verification", "comparison"),
    "phases": ("validation", "hostwalk", "hostcopy", "snapshots", "saving", "handle", "asyncsave", "loading"),
    "facade": ("arguments", "coordinator"),
}
#: Placed ahead of the work merging in the same round (issues 12, 14, 15); drop a name from this set
#: once its module is on main.
MERGING: set[str] = set()
#: Above everything: the package's public face, the test kit, the command line. These may import
#: any module below them (and, within each prefix, each other without cycles).
TOP = ("distckpt", "distckpt.__main__")
TOP_PACKAGES = ("distckpt.testing", "distckpt.cli")
ORDER = [f"distckpt.{m}" for layer in LAYERS.values() for m in layer]
PURE = {f"distckpt.{m}" for m in LAYERS["pure"]}  # (those present are checked)
#: What the pure layer never imports or calls: file-system and process I/O, collectives.
FORBIDDEN_IMPORTS = {"shutil", "fcntl", "socket", "ctypes", "torch.distributed"}
FORBIDDEN_CALLS = {
    "open", "os.open", "os.read", "os.write", "os.listdir", "os.scandir", "os.stat", "os.lstat",
    "os.fstat", "os.rename", "os.replace", "os.unlink", "os.remove", "os.mkdir", "os.makedirs",
    "os.rmdir", "os.fsync", "os.path.exists", "os.path.lexists", "os.path.isdir", "os.path.isfile",
    "os.path.islink", "os.path.getsize",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The distckpt modules ``name`` imports, anywhere in its code (``from . import x`` of a
    non-module attribute counts as importing the package that holds it)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "distckpt")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "distckpt":
                target = str(node.module)
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    found.discard(name)
    return {m for m in found if m in MODULES}


def _place(name: str) -> int | None:
    return ORDER.index(name) if name in ORDER else None


def _top(name: str) -> bool:
    return name in TOP or any(name == p or name.startswith(p + ".") for p in TOP_PACKAGES)


def test_every_module_has_a_place_in_the_layers() -> None:
    unplaced = [m for m in MODULES if _place(m) is None and not _top(m)]
    assert not unplaced, f"give these modules a layer in {__name__}.LAYERS and docs/architecture.md: {unplaced}"
    assert not [m for m in ORDER if m not in MODULES and m not in MERGING], "LAYERS names modules that do not exist"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_the_layers_below_it(name: str) -> None:
    place = _place(name)
    upward = []
    for target in sorted(_imports(name)):
        if place is None:  # top: anything placed, or its own kind
            if _place(target) is None and not _top(target):
                upward.append(target)
        elif _place(target) is None or _place(target) >= place:  # type: ignore[operator]
            upward.append(target)
    assert not upward, f"{name} imports {upward}, which are not below it (docs/architecture.md)"


def test_the_import_graph_has_no_cycle() -> None:
    graph = {m: _imports(m) - {"distckpt"} for m in MODULES}  # every module implicitly loads the package
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


@pytest.mark.parametrize("name", sorted(PURE & set(MODULES)))
def test_a_pure_module_does_no_io_and_no_collectives(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in FORBIDDEN_IMPORTS]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module in FORBIDDEN_IMPORTS:
            found.append(str(node.module))
        elif isinstance(node, ast.Call) and _dotted(node.func) in FORBIDDEN_CALLS:
            found.append(f"{_dotted(node.func)}() at line {node.lineno}")
    assert not found, f"{name} is in the pure layer but uses {found}"


_CHILD = textwrap.dedent("""
    import importlib, json, os, sys
    import numpy, torch, xxhash  # third-party start-up once; no distckpt module is loaded yet
    assert not [m for m in sys.modules if m.split(".")[0] == "distckpt"]
    results = {}
    for name in json.loads(sys.argv[1]):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a child that has imported no distckpt module imports this one alone
            os.close(read)
            try:
                importlib.import_module(name)
                if name == "distckpt.manifest":
                    sys.modules["distckpt.manifest"]._bound()  # load/save reach the disk
                message = "ok"
            except BaseException as exc:
                message = f"{type(exc).__name__}: {exc}"
            os.write(write, message.encode()[:4000])
            os._exit(0)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 4096):
            chunks.append(chunk)
        os.close(read)
        os.waitpid(pid, 0)
        results[name] = b"".join(chunks).decode() or "child died"
    print(json.dumps(results))
""")


@pytest.mark.timeout(240)
def test_every_module_imports_alone_in_an_interpreter_that_has_loaded_no_distckpt_module() -> None:
    names = sorted(m for m in MODULES if m != "distckpt.__main__")  # __main__ runs the CLI
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(names)], capture_output=True, text=True,
                          timeout=200, cwd=SRC.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {name: outcome for name, outcome in results.items() if outcome != "ok"}
    assert not failed, failed
    assert sorted(results) == names


#: File-system calls and modules that only ``storage`` uses (issue 13 item 6).
FILE_SYSTEM_CALLS = FORBIDDEN_CALLS | {"os.fdopen", "os.pread", "os.pwrite", "os.readv", "os.writev",
                                       "os.set_blocking", "os.dup2", "os.chmod", "os.utime", "os.path.getmtime"}
FILE_SYSTEM_MODULES = {"shutil", "fcntl", "ctypes"}
#: The file-system layer: the storage package and its modules.
STORAGE = {m for m in MODULES if m == "distckpt.storage" or m.startswith("distckpt.storage.")}
#: distckpt.testing's kit reads checkpoints with plain ``open`` on purpose: it checks the library independently.
OUTSIDE_THE_LIBRARY = ("distckpt.testing",)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m not in STORAGE
                                        and not m.startswith(OUTSIDE_THE_LIBRARY)))
def test_only_storage_touches_the_file_system(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in FILE_SYSTEM_MODULES]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module in FILE_SYSTEM_MODULES:
            found.append(str(node.module))
        elif isinstance(node, ast.Call) and (_dotted(node.func) in FILE_SYSTEM_CALLS
                                             or _dotted(node.func).split(".")[0] in FILE_SYSTEM_MODULES):
            found.append(f"{_dotted(node.func)}() at line {node.lineno}")
    assert not found, f"{name} touches the file system itself ({found}); add a function to storage instead"
