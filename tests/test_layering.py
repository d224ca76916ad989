"""Imports run one way: Flower only where fedpriv talks to it, and the core never imports a later stage."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedpriv"

# Where fedpriv talks to Flower: the apps, the strategy, the simulation and the deployment.
FLOWER_MODULES = {"client_app", "server_app", "strategy", "simulation", "deployment"}
# The core stages know nothing of Flower, the apps or the reports.
CORE = {"config", "errors", "data", "privacy", "training", "hospital", "protocol", "roster", "outputs", "faults",
        "experiment", "site", "models", "resnet", "scatnet", "report", "rundir"}
LATER_STAGES = {"client_app", "server_app", "strategy", "simulation", "cli"}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports at run time (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
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


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield parts[0], path


def test_only_the_flower_facing_modules_import_flower():
    importers = {top for top, path in _modules()
                 if any(name == "flwr" or name.startswith("flwr.") for name in _imports(path))}
    assert importers and importers <= FLOWER_MODULES, sorted(importers - FLOWER_MODULES)


def test_the_core_never_imports_the_apps_the_strategy_or_the_cli():
    wrong = sorted((str(path.relative_to(PACKAGE)), name) for top, path in _modules() if top in CORE
                   for name in _imports(path) if name.split(".")[:2][-1] in LATER_STAGES
                   and name.startswith("fedpriv."))
    assert wrong == []


def test_the_run_directory_module_stands_on_the_config_and_the_errors_alone():
    """Every stage reads and writes the run directory through rundir, so it may import none of them."""
    own = {name for name in _imports(PACKAGE / "rundir.py") if name.startswith("fedpriv")}
    assert own <= {"fedpriv.errors", "fedpriv.config"}, sorted(own)
