"""The run directory has one owner: its file names, one JSON encoding, and readers that give infinity back."""

from __future__ import annotations

import ast
import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedpriv import rundir
from fedpriv.app_config import compose_config
from fedpriv.cli.main import absolute_paths, resumed_config
from fedpriv.cli.report import main as report_main
from fedpriv.errors import RunFilesError
from fedpriv.outputs import RunRecorder, resume_checkpoint
from fedpriv.report.record_privacy import reported_spreads
from fedpriv.report.run_report import RunFiles, write_run_report
from fedpriv.report.sweep import collect_results
from fedpriv.roster import HospitalState, RoundRecord

PACKAGE = Path(rundir.__file__).parent
TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16", "model.width=4",
        "federation.ledger_scope=run"]


def _strict(text: str):
    """Parse as strict JSON (RFC 8259): no NaN or Infinity tokens."""
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------ the encoding


def test_infinity_is_the_string_inf_and_nan_is_null_in_strict_json():
    text = rundir.dumps({"epsilon": math.inf, "floor": -math.inf, "auc": math.nan, "rows": (1.5, math.inf)})
    assert _strict(text) == {"epsilon": "inf", "floor": "-inf", "auc": None, "rows": [1.5, "inf"]}
    assert rundir.loads(text) == {"epsilon": math.inf, "floor": -math.inf, "auc": None, "rows": [1.5, math.inf]}


def test_a_name_that_reads_inf_stays_a_name():
    data = {"hospitals": [{"hospital": "inf", "epsilon": "inf"}], "labels": {"label": "-inf"}}
    decoded = rundir.loads(rundir.dumps(data))
    assert decoded["hospitals"] == [{"hospital": "inf", "epsilon": math.inf}]
    assert decoded["labels"] == {"label": "-inf"}


def test_numbers_read_none_as_nan_and_inf_as_infinity():
    assert math.isnan(rundir.number(None))
    assert rundir.number("inf") == math.inf and rundir.number(2) == 2.0


def test_a_corrupt_json_file_is_one_clear_error(tmp_path):
    (tmp_path / rundir.RESULT).write_text('{"epsilon": ')
    with pytest.raises(RunFilesError, match=f"cannot read {re.escape(str(tmp_path / rundir.RESULT))}"):
        rundir.read_result(tmp_path)


# ------------------------------------------------------- a non-private run through every writer and reader


def _non_private_run(run_dir: Path) -> Path:
    cfg = absolute_paths(compose_config([*TINY, "privacy=none"]), run_dir)
    recorder = RunRecorder(run_dir, cfg, run_dir.name, "SYNTHETIC test images")
    hospitals = [HospitalState(node_id=i, name=f"hospital-{i}", num_examples=100, epsilon=math.inf, delta=1e-5)
                 for i in (1, 2)]
    reply = {"status": "trained", "epsilon": math.inf, "epsilon-median": math.inf, "records": 100}
    record = RoundRecord(1, {h.name: dict(reply) for h in hospitals}, [h.name for h in hospitals],
                         {"auc": 0.5, "accuracy": 0.5, "loss": math.nan})
    state = torch.nn.Linear(2, 2).state_dict()
    recorder.round_end(record, state, hospitals)
    recorder.finish(state, hospitals, "all rounds run")
    return run_dir


def test_a_non_private_epsilon_reads_as_infinity_through_every_writer_and_reader(tmp_path):
    run_dir = _non_private_run(tmp_path / "sweep" / "0")
    # On disk: strict JSON, the string "inf" (never null, never a number), in every file.
    raw_result = _strict((run_dir / rundir.RESULT).read_text())
    assert raw_result["epsilon_budget"] == "inf"
    assert {h["epsilon"] for h in raw_result["hospitals"]} == {"inf"}
    raw_metrics = _strict((run_dir / rundir.METRICS_JSON).read_text())
    assert {p["epsilon"] for p in raw_metrics["rounds"][0]["privacy"]} == {"inf"}
    with open(run_dir / rundir.METRICS_CSV) as handle:
        assert {row["epsilon"] for row in csv.DictReader(handle)} == {"inf"}

    result, metrics = rundir.read_result(run_dir), rundir.read_metrics(run_dir)
    assert result["epsilon_budget"] == math.inf
    assert [h["epsilon"] for h in result["hospitals"]] == [math.inf, math.inf]
    assert [h["budget_epsilon"] for h in result["hospitals"]] == [math.inf, math.inf]
    assert [p["epsilon"] for p in metrics["rounds"][0]["privacy"]] == [math.inf, math.inf]
    assert metrics["rounds"][0]["hospitals"]["hospital-1"]["epsilon-median"] == math.inf
    assert math.isnan(rundir.number(metrics["rounds"][0]["server"]["loss"]))

    files = RunFiles.load(run_dir)
    assert not files.private
    assert {s.maximum for s in reported_spreads(files.rounds, {h["hospital"]: h for h in result["hospitals"]})} == {
        math.inf}
    [row] = collect_results(tmp_path / "sweep")
    assert row["epsilon_budget"] == math.inf and row["epsilon_spent"] == [math.inf, math.inf]
    report = write_run_report(run_dir).markdown.read_text()
    assert "inf (NOT PRIVATE)" in report and "| hospital-1 | none |" in report

    rundir.write_audit(run_dir, {"membership": {"levels": [{"epsilon_spent": math.inf, "target_epsilon": 4.0}]}},
                       "# audit\n")
    assert _strict((run_dir / rundir.AUDIT_JSON).read_text())["membership"]["levels"][0]["epsilon_spent"] == "inf"
    assert rundir.read_audit(run_dir)["membership"]["levels"][0] == {"epsilon_spent": math.inf, "target_epsilon": 4.0}


# ------------------------------------------------------------ a run directory written before this encoding


def _old_run_dir(run_dir: Path) -> Path:
    """A non-private run as the previous fedpriv left it: config.yaml without model.activation, its JSON."""
    cfg = absolute_paths(compose_config([*TINY, "privacy=none"]), run_dir)
    saved = OmegaConf.to_container(OmegaConf.structured(cfg))
    del saved["model"]["activation"]
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(saved), run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    torch.save({"round": 1, "run_id": "old", "state_dict": {}}, run_dir / "checkpoints" / "round-001.pt")
    privacy = ('{"hospital": "hospital-1", "epsilon": "inf", "delta": 1e-05, "budget_epsilon": "inf", '
               '"locked": false, "epsilon_is_lower_bound": false}')
    (run_dir / "metrics.json").write_text(
        '{"run_id": "old", "dataset": "SYNTHETIC", "rounds": [{"round": 1, "seconds": 1.0, "order": ["hospital-1"], '
        '"server": {"auc": 0.5, "accuracy": 0.5, "loss": null}, "hospitals": {"hospital-1": {"status": "trained"}}, '
        f'"client_evaluation": {{}}, "privacy": [{privacy}]}}]}}')
    (run_dir / "result.json").write_text(
        '{"run_id": "old", "mode": "parallel", "private": false, "epsilon_budget": "inf", "rounds_planned": 1, '
        '"rounds_run": 1, "stop_reason": "all rounds run", "test": {"auc": 0.5, "accuracy": 0.5, "loss": null}, '
        '"hospitals": [{"hospital": "hospital-1", "records": 100, "epsilon": "inf", "delta": 1e-05, '
        '"budget_epsilon": "inf", "locked": false}], "dataset": "SYNTHETIC", "seed": 0}')
    # The old audit.json wrote every infinity as null.
    (run_dir / "audit.json").write_text(
        '{"ok": true, "levels": [{"label": "non-private", "target_epsilon": null}], "inversion": {"cases": '
        '[{"setting": "plain", "epsilon": null}]}, "membership": {"levels": [{"label": "non-private", '
        '"private": false, "target_epsilon": null, "epsilon_spent": null, "epsilon_lower_bound": 0.0, '
        '"guarantees": [{"epsilon": null, "delta": 1e-05}]}]}}')
    return run_dir


def test_an_old_run_directory_still_reads_as_not_private(tmp_path, capsys):
    run_dir = _old_run_dir(tmp_path / "old")
    assert rundir.read_result(run_dir)["hospitals"][0]["epsilon"] == math.inf
    assert rundir.read_config(run_dir).model.activation == "relu"  # old CNNs all used ReLU
    audit = rundir.read_audit(run_dir)
    assert audit["membership"]["levels"][0]["epsilon_spent"] == math.inf
    assert audit["membership"]["levels"][0]["guarantees"][0]["epsilon"] == math.inf
    assert audit["inversion"]["cases"][0]["epsilon"] == math.inf
    assert audit["membership"]["levels"][0]["epsilon_lower_bound"] == 0.0

    assert report_main([str(run_dir)]) == 0
    report = (run_dir / rundir.REPORT_MD).read_text()
    assert "NOT PRIVATE" in report and "| hospital-1 | none | 1e-05 | inf (NOT PRIVATE) | inf (NOT PRIVATE) | no |" in report
    capsys.readouterr()


def test_an_old_run_directory_can_still_be_resumed(tmp_path):
    run_dir = _old_run_dir(tmp_path / "old")
    resumed = resumed_config(run_dir, [f"resume={run_dir}"])
    assert not resumed.privacy.enabled and resumed.model.activation == "relu"
    assert resume_checkpoint(resumed) == rundir.checkpoint(run_dir, 1)


# --------------------------------------------------------------------------------- one owner of names


def _file_names() -> set[str]:
    """Every file name rundir defines (its constants with a suffix), Hydra's record and the audit's figures."""
    names = {value for key, value in vars(rundir).items()
             if key.isupper() and isinstance(value, str) and re.fullmatch(r"[\w-]+\.\w+", value)}
    names |= {rundir.HYDRA_RECORD.name, rundir.inversion_figure(1).removesuffix("1.png")}
    # superlink.log is also what the deployment rehearsal's coordinator calls its SuperLink's log.
    return names - {rundir.SUPERLINK_LOG}


# Folder names, checked where a path is joined (`run_dir / "checkpoints"`); "ledgers" is also the
# persistent ledger folder's name, and "figures" a key of audit.json.
FOLDERS = {rundir.CHECKPOINTS, rundir.FIGURES}
# Owned by the deployment work, which moves to rundir.read_summary() / rundir.finished() in its own change.
NOT_YET_MOVED: set[tuple[str, str]] = set()


def _joined(tree: ast.AST) -> set[int]:
    """The string constants that are joined onto a path with `/`."""
    return {id(side) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            for side in (node.left, node.right) if isinstance(side, ast.Constant)}


def _strings(tree: ast.AST):
    """Every string constant that is not a docstring, with its line and whether it is joined onto a path."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    joined = _joined(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value, id(node) in joined


def test_no_module_but_rundir_spells_a_run_directory_file_name():
    names = _file_names()
    assert {"result.json", "audit.json", "config.yaml", "metrics.json", "hydra.yaml", "inversion_batch"} <= names
    token = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(n) for n in sorted(names)) + r")(?![A-Za-z_-])")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = str(path.relative_to(PACKAGE))
        if path.name == "rundir.py" and path.parent == PACKAGE:
            continue
        for line, text, is_path in _strings(ast.parse(path.read_text())):
            hits = {match.group(1) for match in token.finditer(text)} | ({text} & FOLDERS if is_path else set())
            found += [f"{module}:{line}: {name}" for name in hits if (module, name) not in NOT_YET_MOVED]
    assert found == []

