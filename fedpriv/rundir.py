"""The run directory: the name of every file in it, its one JSON encoding, and its readers and writers.

A run directory (Hydra's output folder of one ``fedpriv`` job, or ``run-dir`` of a ``flwr run``)::

    config.yaml              the resolved configuration, written before the first round
    partition.md, .json      each hospital's share of the data (the fedpriv CLI)
    checkpoints/round-NNN.pt the global model after each round (``resume=`` continues from the last)
    metrics.json, .csv       per round: server test metrics, hospital replies, privacy per hospital
    model.pt, result.json, summary.md   when the run ends
    calibration.json, subgroups.json    the final model's calibration and subgroup metrics
    report.html, report.md, figures/    the run report (``fedpriv-report``)
    ledgers/                 throw-away ledgers (``federation.ledger_scope=run``)
    superlink.log            the simulation's SuperLink log
    .hydra/hydra.yaml        Hydra's record of the job (its config group choices)

``fedpriv-audit`` writes ``audit.json``, ``audit.md``, ``inversion_batchN.png`` and
``membership_roc.png`` into its own run directory. A sweep (Hydra multirun) directory holds one run
directory per job, Hydra's ``multirun.yaml`` and the sweep report: ``sweep.md``, ``sweep.csv`` and
``privacy_utility.png``.

JSON has no infinity and no NaN, and a non-private run's epsilon is infinity. Every JSON file here is
written by :func:`write_json`: infinity as the string ``"inf"`` (``"-inf"``), NaN as ``null``. Every
reader (:func:`read_json`) turns ``"inf"`` back into ``float('inf')``, so a non-private epsilon reads
as infinity everywhere, never as null or a number. ``null`` stays ``None`` (unknown or absent);
:func:`number` reads a numeric field as a float, ``None`` as NaN. Text under the keys that hold names
(:data:`NAME_KEYS`) stays text even when it reads "inf". Files written before this encoding are
read too: their infinities were already ``"inf"``, except ``audit.json``, which wrote ``null``
(:func:`read_audit` reads those epsilons as infinity).
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpriv.display import format_epsilon, number  # noqa: F401 - the run files' readers take them from here
from fedpriv.errors import RunFilesError

# OmegaConf (and fedpriv.config, which loads it) are imported by the config readers and writers only:
# the simulation's watchdog imports this module for a file name and must start in milliseconds.
if TYPE_CHECKING:
    from omegaconf import DictConfig

    from fedpriv.config import FedprivConfig

# --- names ----------------------------------------------------------------------------------------

CONFIG = "config.yaml"
PARTITION_MD, PARTITION_JSON = "partition.md", "partition.json"
CHECKPOINTS = "checkpoints"
METRICS_JSON, METRICS_CSV = "metrics.json", "metrics.csv"
MODEL = "model.pt"
RESULT = "result.json"
SUMMARY = "summary.md"
CALIBRATION, SUBGROUPS = "calibration.json", "subgroups.json"
REPORT_HTML, REPORT_MD, FIGURES = "report.html", "report.md", "figures"
AUDIT_JSON, AUDIT_MD = "audit.json", "audit.md"
MEMBERSHIP_ROC = "membership_roc.png"
LEDGERS = "ledgers"
SUPERLINK_LOG = "superlink.log"
HYDRA_RECORD = Path(".hydra") / "hydra.yaml"
# A sweep directory (Hydra multirun): Hydra's record, and the sweep report over its runs.
MULTIRUN_RECORD = "multirun.yaml"
SWEEP_MD, SWEEP_CSV, SWEEP_PLOT = "sweep.md", "sweep.csv", "privacy_utility.png"

#: What the run report's file list shows, in order.
LISTED_FILES = (CONFIG, METRICS_JSON, METRICS_CSV, RESULT, SUMMARY, PARTITION_MD, PARTITION_JSON, MODEL,
                CALIBRATION, SUBGROUPS, AUDIT_MD)
LISTED_FOLDERS = (CHECKPOINTS, LEDGERS)


def checkpoint(run_dir: str | Path, server_round: int) -> Path:
    """Where the global model after `server_round` is saved."""
    return Path(run_dir) / CHECKPOINTS / f"round-{server_round:03d}.pt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of the last saved round, or None when there is none."""
    checkpoints = sorted((Path(run_dir) / CHECKPOINTS).glob("round-*.pt"))
    return checkpoints[-1] if checkpoints else None


def inversion_figure(batch_size: int) -> str:
    """The audit's reconstruction grid for one batch size."""
    return f"inversion_batch{batch_size}.png"


# --- the JSON encoding ------------------------------------------------------------------------------

INFINITY, MINUS_INFINITY = "inf", "-inf"
_INFINITIES = {INFINITY: math.inf, MINUS_INFINITY: -math.inf, "Infinity": math.inf, "-Infinity": -math.inf}
#: Keys whose values are names (of hospitals, subgroups, audit levels, classes): never decoded.
NAME_KEYS = frozenset({"hospital", "group", "label", "attribute", "run_id", "class_names", "name"})


def encode(value: Any) -> Any:
    """`value` as strict JSON data: infinity as "inf"/"-inf", NaN as None (tuples become lists)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, int):  # numpy's integers
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, int | float):  # numpy's float32
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (INFINITY if value > 0 else MINUS_INFINITY)
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encode(item) for item in value]
    return value


def decode(value: Any, key: str | None = None) -> Any:
    """JSON data as :func:`encode` wrote it, with "inf"/"-inf" back as floats (names left as text)."""
    if key in NAME_KEYS:
        return value
    if isinstance(value, str):
        return _INFINITIES.get(value, value)
    if isinstance(value, dict):
        return {name: decode(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [decode(item, key) for item in value]
    return value


MIXED_UNITS = "mixed"  # the run's hospitals protect different units (result.json's privacy_unit)


def per_unit(unit: str) -> str:
    """How an epsilon's unit reads: "per patient", "per image", or for hospitals whose units differ, a
    pointer to each hospital's own."""
    return "per record: each hospital's own unit" if unit == MIXED_UNITS else f"per {unit}"


def dumps(value: Any) -> str:
    """The text of a run directory's JSON file (strict JSON, one encoding)."""
    return json.dumps(encode(value), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def loads(text: str) -> Any:
    """The data of a run directory's JSON file, infinities decoded."""
    return decode(json.loads(text))


def write_json(path: str | Path, value: Any) -> Path:
    """Write `value` to `path` whole, then rename: a process killed mid-write leaves the old file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(dumps(value), encoding="utf-8")
    os.replace(partial, path)
    return path


def read_json(path: str | Path) -> Any:
    """A JSON file of a run directory, decoded; :class:`RunFilesError` if it is unreadable."""
    try:
        return loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunFilesError(f"cannot read {path}: {exc}") from exc


def read_optional_json(path: str | Path) -> Any | None:
    """:func:`read_json`, or None when the file does not exist."""
    return read_json(path) if Path(path).is_file() else None


# --- the resolved configuration ---------------------------------------------------------------------


def write_config(run_dir: str | Path, config: FedprivConfig) -> Path:
    """Save the resolved configuration as config.yaml (before anything else of the run)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG
    OmegaConf.save(OmegaConf.structured(config), path)
    return path


def read_config_yaml(run_dir: str | Path) -> DictConfig:
    """config.yaml as saved, upgraded to today's keys; raises whatever OmegaConf raises for a bad file."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(Path(run_dir) / CONFIG)
    if "activation" not in (raw.get("model") or {}):
        # Written before the activation was configurable: those CNNs all used ReLU. Activations
        # have no weights, so the wrong one would load silently and predict nonsense.
        OmegaConf.update(raw, "model.activation", "relu", force_add=True)
    return raw


def read_config(run_dir: str | Path) -> FedprivConfig:
    """The run's resolved configuration, typed; :class:`RunFilesError` if it is missing or unreadable."""
    from fedpriv.config import to_config  # loads OmegaConf and Hydra's store: deferred, as the note at the imports says

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunFilesError(f"{path} not found: is {run_dir} a fedpriv run directory?")
    try:
        return to_config(read_config_yaml(run_dir))
    except Exception as exc:  # OmegaConf raises many types for a bad or outdated file; say which file
        raise RunFilesError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def read_config_text(run_dir: str | Path) -> str:
    """config.yaml as written (for the report's full listing)."""
    return (Path(run_dir) / CONFIG).read_text()


def read_hydra_choices(run_dir: str | Path) -> dict[str, object]:
    """The config group options Hydra composed the run with ({} when Hydra's record is missing)."""
    from omegaconf import OmegaConf

    try:
        choices = OmegaConf.load(Path(run_dir) / HYDRA_RECORD).hydra.runtime.choices
        return {str(group): option for group, option in choices.items()}
    except Exception:  # not started by the fedpriv CLI (e.g. `flwr run`), or unreadable: none known
        return {}


# --- what the run writes as it goes ---------------------------------------------------------------


def write_partition(run_dir: str | Path, markdown: str, rows: list[dict[str, Any]]) -> None:
    """The partition summary: Markdown for people, JSON for the report."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PARTITION_MD).write_text(markdown)
    write_json(run_dir / PARTITION_JSON, rows)


METRICS_CSV_COLUMNS = ("round", "hospital", "status", "epsilon", "budget_epsilon", "locked", "test_auc",
                       "test_accuracy", "test_sensitivity", "test_specificity", "test_loss")


def write_metrics(run_dir: str | Path, run_id: str, dataset: str, rounds: list[dict[str, Any]]) -> None:
    """metrics.json (every round's record) and metrics.csv (one row per round and hospital)."""
    run_dir = Path(run_dir)
    write_json(run_dir / METRICS_JSON, {"run_id": run_id, "dataset": dataset, "rounds": rounds})
    with open(run_dir / METRICS_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(METRICS_CSV_COLUMNS)
        for row in rounds:
            server = row["server"]
            for privacy in row["privacy"]:
                detail = row["hospitals"].get(privacy["hospital"], {})
                writer.writerow([row["round"], privacy["hospital"], detail.get("status", "not asked"),
                                 _cell(privacy["epsilon"]), _cell(privacy["budget_epsilon"]), privacy["locked"],
                                 *(_cell(server.get(key, "")) for key in
                                   ("auc", "accuracy", "sensitivity", "specificity", "loss"))])


def _cell(value: Any) -> Any:
    """A CSV cell in the JSON files' encoding: "inf" for infinity, empty for NaN."""
    encoded = encode(value)
    return "" if encoded is None else encoded


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """metrics.json, or None before the first round has finished."""
    return read_optional_json(Path(run_dir) / METRICS_JSON)


def write_result(run_dir: str | Path, result: dict[str, Any], summary: str) -> None:
    """result.json (what the run did, per hospital) and summary.md, when the run ends."""
    run_dir = Path(run_dir)
    write_json(run_dir / RESULT, result)
    (run_dir / SUMMARY).write_text(summary)


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """result.json, or None when the run has not finished."""
    return read_optional_json(Path(run_dir) / RESULT)


def finished(run_dir: str | Path) -> bool:
    """Whether the run ended and wrote its summary."""
    return (Path(run_dir) / SUMMARY).is_file()


def read_summary(run_dir: str | Path) -> str:
    return (Path(run_dir) / SUMMARY).read_text()


def read_partition(run_dir: str | Path) -> list[dict[str, Any]] | None:
    return read_optional_json(Path(run_dir) / PARTITION_JSON)


def result_files(sweep_dir: str | Path) -> Iterator[Path]:
    """The result.json of every finished run below a sweep directory, in path order."""
    yield from sorted(Path(sweep_dir).rglob(RESULT))


# --- the audit --------------------------------------------------------------------------------------

# Before this encoding, audit.json wrote every infinity as null; these keys held an epsilon.
_AUDIT_EPSILON_KEYS = frozenset({"epsilon", "epsilon_spent", "target_epsilon"})


def write_audit(run_dir: str | Path, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """audit.json (every number) and audit.md (for people); returns their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    md_path = run_dir / AUDIT_MD
    md_path.write_text(markdown, encoding="utf-8")
    return write_json(run_dir / AUDIT_JSON, data), md_path


def read_audit(run_dir: str | Path) -> dict[str, Any]:
    """audit.json, decoded; an epsilon that an older audit.json wrote as null reads as infinity."""
    return _null_epsilon_is_infinity(read_json(Path(run_dir) / AUDIT_JSON))


def _null_epsilon_is_infinity(value: Any, key: str | None = None) -> Any:
    if value is None and key in _AUDIT_EPSILON_KEYS:
        return math.inf
    if isinstance(value, dict):
        return {name: _null_epsilon_is_infinity(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [_null_epsilon_is_infinity(item) for item in value]
    return value
