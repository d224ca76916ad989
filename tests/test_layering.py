"""Imports run one way: Flower only where fedpriv talks to it, no cycle, no module importing a later stage.

The module graph is read from the source with ast (no import is executed): an edge for every
``import fedpriv...`` / ``from fedpriv... import`` outside ``if TYPE_CHECKING:`` blocks. The checks
that follow run on that graph, and each has a test that breaks the tree (in memory) and sees it fail.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedpriv"

# Where fedpriv talks to Flower: the apps, the strategy, the simulation and the deployment.
FLOWER_MODULES = {"client_app", "server_app", "strategy", "message_window", "simulation", "deployment"}
# The core stages know nothing of Flower, the apps or the reports.
CORE = {"config", "errors", "display", "devices", "data", "privacy", "training", "hospital", "protocol", "roster", "outputs", "faults",
        "experiment", "site", "models", "resnet", "scatnet", "report", "rundir", "aggregation", "update_checks"}
LATER_STAGES = {"client_app", "server_app", "strategy", "simulation", "cli"}

# The stages, in the order data flows through them (issue 21): data -> privacy -> training ->
# hospital -> (protocol, site) -> client app / strategy -> server app -> run directory -> reports.
# A module may import its own stage and earlier ones, never a later one. Where the real modules
# need a finer reading of that line, it is said here:
# - protocol (the status names, message keys and reply codecs) is the vocabulary hospital and server
#   share: it imports nothing but errors and comes first, with them. So does devices (what `device=`
#   means on this machine): the configuration, the sites and the entry points all resolve it.
# - The configuration checks its values against the accountants and the models, so it comes after
#   them; the core (data, privacy, training, hospital) never reads it. rundir (the run directory's
#   file names and its one JSON encoding) reads a run's config back, so it sits with the configuration,
#   before every stage that writes or reads a run directory.
# - The server app, like the simulation, the deployment and the CLIs, is where a run is put
#   together: it builds the strategy, records the run directory and writes the report, so it
#   comes with them, last. Nothing imports it.
# - deployment/node.py assembles a deployed hospital's site from its node config: the site stage.
# The first matching prefix names a module's stage.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("vocabulary", ("errors", "display", "devices", "protocol")),
    ("data and models", ("data", "models", "resnet", "scatnet")),
    ("privacy", ("privacy",)),
    ("training", ("training",)),
    ("hospital", ("hospital",)),
    ("configuration", ("config", "app_config", "rundir", "attacks.settings", "faults")),
    ("site", ("site", "experiment", "deployment.node")),
    ("client app and strategy", ("client_app", "roster", "aggregation", "update_checks", "message_window",
                                  "strategy")),
    ("run directory", ("outputs",)),
    ("reports", ("report", "attacks")),
    ("entry points", ("server_app", "simulation", "process_tree", "deployment", "cli")),
]


@dataclass(frozen=True)
class Import:
    """One import of a fedpriv module by another."""

    importer: str  # dotted module name, e.g. "fedpriv.client_app"
    imported: str  # the fedpriv module it names (the deepest one that exists)
    line: int
    in_function: bool
    commented: bool  # the import's source lines carry a comment (a reason)


def _module_name(relative: Path) -> str:
    parts = ["fedpriv", *relative.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _parsed(source: str) -> ast.Module:
    return ast.parse(source)


@functools.cache
def _import_statements(source: str) -> tuple[tuple[tuple[str, ...], int, bool, bool], ...]:
    """(names each import statement may mean, line, inside a function, carries a comment) of `source`.

    ``from a import b`` may mean the module ``a.b`` or the name ``b`` of ``a``: both are given.
    Statements under ``if TYPE_CHECKING:`` are left out. Cached: most tests change one file only.
    """
    tree = _parsed(source)
    lines = source.splitlines()
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    in_function = {id(node) for function in ast.walk(tree)
                   if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) for node in ast.walk(function)}
    statements = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = tuple(f"{node.module}.{alias.name}" for alias in node.names) + (node.module,)
        else:
            continue
        commented = any("#" in line for line in lines[node.lineno - 1:node.end_lineno])
        statements.append((names, node.lineno, id(node) in in_function, commented))
    return tuple(statements)


def _sources(changes: Mapping[str, str] | None = None) -> dict[Path, str]:
    """The package's sources by path relative to it; `changes` (relative path -> text) replace or add files."""
    sources = {path.relative_to(PACKAGE): path.read_text() for path in PACKAGE.rglob("*.py")}
    sources.update({Path(relative): text for relative, text in (changes or {}).items()})
    return sources


def fedpriv_imports(changes: Mapping[str, str] | None = None) -> list[Import]:
    """Every import of a fedpriv module, outside ``if TYPE_CHECKING:`` blocks (in the tree as `changes` leave it)."""
    modules = {_module_name(relative): source for relative, source in _sources(changes).items()}
    found = []
    for importer, source in sorted(modules.items()):
        for names, line, in_function, commented in _import_statements(source):
            # "from fedpriv import rundir" imports the module fedpriv.rundir; "from fedpriv.x import y"
            # where y is no module imports fedpriv.x (the deepest module a name lies in).
            resolved = set()
            for name in names:
                while name not in modules and "." in name:
                    name = name.rsplit(".", 1)[0]
                resolved.add(name)
            if any(name != "fedpriv" for name in resolved):
                resolved.discard("fedpriv")  # the package itself, named only as the parent of a module
            for name in sorted(resolved):
                if name in modules and name != importer and name.split(".")[0] == "fedpriv":
                    found.append(Import(importer, name, line, in_function, commented))
    return found


def cycles(imports: list[Import]) -> list[list[str]]:
    """The import cycles among module-level imports: strongly connected groups of two or more modules."""
    graph: dict[str, set[str]] = {}
    for edge in imports:
        if not edge.in_function:
            graph.setdefault(edge.importer, set()).add(edge.imported)
            graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def stage(module: str) -> int:
    """The index of `module`'s stage in STAGES (by its first matching prefix)."""
    name = module.split(".", 1)[1] if "." in module else ""
    for number, (_, prefixes) in enumerate(STAGES):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return number
    raise AssertionError(f"{module} belongs to no stage: add it to STAGES")


def wrong_way(imports: list[Import]) -> list[str]:
    """Imports of a later stage (deferred ones too: a deferred import is still a dependency)."""
    return [f"{edge.importer}:{edge.line} ({STAGES[stage(edge.importer)][0]}) imports {edge.imported} "
            f"({STAGES[stage(edge.imported)][0]})" for edge in imports if stage(edge.imported) > stage(edge.importer)]


def unexplained_deferrals(imports: list[Import]) -> list[str]:
    """Function-level imports of fedpriv's own modules without a comment saying why."""
    return [f"{edge.importer}:{edge.line} imports {edge.imported} inside a function"
            for edge in imports if edge.in_function and not edge.commented]


def _imports(source: str) -> set[str]:
    """Every module `source` imports at run time (TYPE_CHECKING blocks left out)."""
    tree = _parsed(source)
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _modules(changes: Mapping[str, str] | None = None):
    """(first part of its path, relative path, source) of every module."""
    for relative, source in sorted(_sources(changes).items()):
        yield relative.with_suffix("").parts[0], relative, source


def flower_importers(changes: Mapping[str, str] | None = None) -> set[str]:
    return {top for top, _, source in _modules(changes)
            if any(name == "flwr" or name.startswith("flwr.") for name in _imports(source))}


# ---------------------------------------------------------------------------- the checks


def test_only_the_flower_facing_modules_import_flower():
    importers = flower_importers()
    assert importers and importers <= FLOWER_MODULES, sorted(importers - FLOWER_MODULES)


def test_the_core_never_imports_the_apps_the_strategy_or_the_cli():
    wrong = sorted((str(relative), name) for top, relative, source in _modules() if top in CORE
                   for name in _imports(source) if name.split(".")[:2][-1] in LATER_STAGES
                   and name.startswith("fedpriv."))
    assert wrong == []


def test_the_run_directory_module_stands_on_the_config_and_the_errors_alone():
    """Every stage reads and writes the run directory through rundir, so it may import none of them
    (display, the one rule for showing an epsilon, depends on nothing)."""
    own = {name for name in _imports((PACKAGE / "rundir.py").read_text()) if name.startswith("fedpriv")}
    assert own <= {"fedpriv.errors", "fedpriv.config", "fedpriv.display"}, sorted(own)


def test_no_import_cycle_among_fedpriv_modules():
    assert cycles(fedpriv_imports()) == []


def test_no_module_imports_a_later_stage():
    assert wrong_way(fedpriv_imports()) == []


def test_every_deferred_import_of_fedpriv_says_why():
    """A fedpriv module imported inside a function carries a comment on its line: why it is deferred."""
    assert unexplained_deferrals(fedpriv_imports()) == []


# ------------------------------------------------- each check fails on a tree broken on purpose


def _appended(relative: str, text: str) -> dict[str, str]:
    """A change to the tree: `text` added at the end of the module at `relative` (nothing is written)."""
    return {relative: (PACKAGE / relative).read_text() + "\n" + text + "\n"}


def test_a_cycle_is_found():
    broken = _appended("errors.py", "from fedpriv.protocol import Status")  # protocol imports errors
    assert ["fedpriv.errors", "fedpriv.protocol"] in cycles(fedpriv_imports(broken))


def test_an_import_under_type_checking_is_no_cycle():
    harmless = _appended("errors.py", "from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from fedpriv.protocol import Status")
    assert cycles(fedpriv_imports(harmless)) == []


def test_a_wrong_way_import_is_found():
    broken = _appended("training.py", "from fedpriv.hospital import HospitalSettings")
    assert any(line.startswith("fedpriv.training:") and "imports fedpriv.hospital" in line
               for line in wrong_way(fedpriv_imports(broken)))
    deferred = _appended("hospital.py", "def later():\n    from fedpriv.strategy import PARALLEL  # with a reason")
    assert any(line.startswith("fedpriv.hospital:") and "imports fedpriv.strategy" in line
               for line in wrong_way(fedpriv_imports(deferred)))


def test_a_module_outside_every_stage_is_refused():
    with pytest.raises(AssertionError, match="newcomer belongs to no stage"):
        wrong_way(fedpriv_imports({"newcomer.py": "from fedpriv.errors import FedprivError\n"}))


def test_a_deferred_import_without_a_reason_is_found():
    bare = _appended("hospital.py", "def later():\n    from fedpriv.training import train_local\n")
    assert any(line.startswith("fedpriv.hospital:") for line in unexplained_deferrals(fedpriv_imports(bare)))
    said = _appended("site.py", "def later():\n    from fedpriv.training import train_local  # deferred: a reason")
    assert not any(line.startswith("fedpriv.site:") for line in unexplained_deferrals(fedpriv_imports(said)))


def test_a_flower_import_outside_the_flower_modules_is_found():
    assert "roster" in flower_importers(_appended("roster.py", "from flwr.app import Message")) - FLOWER_MODULES
