"""notebooks/walkthrough.ipynb: committed with the outputs of a full-mode run that match today's code, and it runs.

Two kinds of check:

- The committed notebook holds the outputs of a full-mode run (PneumoniaMNIST), every code cell
  executed in order without error, and they are fresh: its metadata records (``notebooks/execute.py``)
  a digest of the code cells and the fingerprint of a small fixed computation through the stages
  behind the notebook's numbers. A cell edited since, or code whose results differ from that
  fingerprint, fails here with the command that re-runs the notebook. These tests take seconds.
- The notebook executed in its small mode (FEDPRIV_NOTEBOOK_SMALL=1: synthetic data, 2 hospitals,
  tiny model and attack settings) with nbclient, in a python3 kernel of this interpreter, with a
  temporary working directory so that every output lands there. Any failing cell fails the test;
  the outputs it leaves (printed text and the files its commands wrote) are then checked step by step.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from fedpriv.privacy import read_ledger

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "walkthrough.ipynb"
CELL_TIMEOUT_S = 900  # one cell runs at most two federations; generous for a loaded 2-core machine
RERUN = "FEDPRIV_DATA_DIR=$PWD/../shared/data .venv/bin/python notebooks/execute.py"


def _execute_module():
    """notebooks/execute.py, which records what produced the saved outputs (not a package: loaded by path)."""
    spec = importlib.util.spec_from_file_location("walkthrough_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def committed():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    return notebook


def test_the_committed_notebook_holds_the_outputs_of_a_full_mode_run(committed):
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert code and committed.metadata.kernelspec.name == "python3"
    assert "FEDPRIV_NOTEBOOK_SMALL" in code[0].source  # the small switch is read in the first code cell
    # Every code cell ran, in order, in one session, and none failed.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert all(cell.outputs for cell in code), "a code cell without output: the notebook was not run whole"
    assert not [output for cell in code for output in cell.outputs if output.output_type == "error"]
    record = committed.metadata.get("fedpriv", {})
    assert record.get("mode") == "full", f"the saved outputs are not from a full-mode run; run {RERUN}"
    text = _text(committed)
    assert "full mode: PneumoniaMNIST" in text and "SMALL mode" not in text and "SYNTHETIC" not in text
    assert not re.search(r"/\S+/notebooks/outputs/", text)  # paths are shown relative to the notebook
    assert "| hospital-3 |" in text and "round 1: trained" in text and "Sweep: privacy against utility" in text
    assert _images(committed) >= 10


def test_the_saved_outputs_come_from_todays_cells(committed):
    execute = _execute_module()
    assert committed.metadata.fedpriv.cells == execute.cells_digest(committed), (
        f"a code cell changed after the notebook was run: its saved outputs are stale. Run {RERUN}")


@pytest.mark.slow  # trains a tiny model for a few seconds
def test_the_saved_outputs_match_what_todays_code_computes(committed):
    """The fingerprint (data, split, accountant, one DP-SGD round, test metrics, the shown epsilon) is unchanged."""
    saved = json.loads(json.dumps(committed.metadata.fedpriv.fingerprint))
    now = _execute_module().fingerprint()
    changed = sorted(key for key in {*saved, *now} if saved.get(key) != now.get(key))
    assert not changed, (f"the code now computes other results ({', '.join(changed)}: saved {[saved.get(k) for k in changed]}, "
                         f"now {[now.get(k) for k in changed]}), so the notebook's saved outputs are stale. Run {RERUN}")


def test_a_notebook_edited_after_its_run_is_caught(committed):
    execute = _execute_module()
    edited = nbformat.from_dict(json.loads(json.dumps(committed)))
    next(cell for cell in edited.cells if cell.cell_type == "code").source += "\n# edited"
    assert execute.cells_digest(edited) != committed.metadata.fedpriv.cells
    markdown = nbformat.from_dict(json.loads(json.dumps(committed)))
    next(cell for cell in markdown.cells if cell.cell_type == "markdown").source += " (edited)"
    assert execute.cells_digest(markdown) == committed.metadata.fedpriv.cells  # prose does not change outputs


def _text(notebook) -> str:
    """Everything the executed cells printed or displayed as text or Markdown."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                parts.append(output.data.get("text/markdown", ""))
    return "\n".join(parts)


def _images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed in small mode, and the folder of outputs it wrote."""
    workdir = tmp_path_factory.mktemp("walkthrough")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDPRIV_NOTEBOOK_SMALL", "1")  # the kernel inherits this environment
        for cell in notebook.cells:  # start from a clean notebook, as a reader who re-runs it would
            if cell.cell_type == "code":
                cell.update(outputs=[], execution_count=None)
        client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S, startup_timeout=180,
                                resources={"metadata": {"path": str(workdir)}})
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    [out] = list((workdir / "outputs" / "walkthrough").iterdir())
    return notebook, out


@pytest.mark.slow
@pytest.mark.processes  # its kernel runs `fedpriv` (SuperLink, Ray) and the other CLIs
def test_small_mode_uses_synthetic_data_and_draws_every_plot(executed):
    notebook, _ = executed
    text = _text(notebook)
    assert "SMALL mode: synthetic data" in text and "SYNTHETIC" in text
    assert "| hospital-1 |" in text and "| hospital-2 |" in text  # the partition table
    # X-rays, class balance, epsilon curves, ledger rounds, federation curves, sweep, 2 audit figures,
    # reliability diagram, predictions.
    assert _images(notebook) >= 10


@pytest.mark.slow
@pytest.mark.processes  # its kernel runs `fedpriv` (SuperLink, Ray) and the other CLIs
def test_one_hospital_trains_until_its_ledger_refuses(executed):
    notebook, out = executed
    text = _text(notebook)
    assert "round 1: trained" in text and "round 2: trained" in text
    assert re.search(r"round \d+: refused +epsilon", text) and "nothing charged" in text  # the refusal
    assert "spend what remains: trained" in text
    assert "another run: locked" in text  # then every record is exhausted: a new run is refused too
    assert "LOCKED" in text  # `fedpriv-ledger show`
    assert "ok: " in text and "chain and witness intact" in text  # `fedpriv-ledger verify`
    with read_ledger(out / "one-hospital" / "ledger.db") as ledger:
        status = ledger.status()
        assert status.locked and 0 < status.epsilon_spent <= status.budget_epsilon == 3.0
        assert len(ledger.events()) >= 3


@pytest.mark.slow
@pytest.mark.processes  # its kernel runs `fedpriv` (SuperLink, Ray) and the other CLIs
def test_federations_run_in_both_modes_within_each_budget(executed):
    _, out = executed
    for mode in ("parallel", "sequential"):
        run_dir = out / f"federation-{mode}"
        result = json.loads((run_dir / "result.json").read_text())
        assert result["mode"] == mode and result["rounds_run"] == 2
        assert [h["hospital"] for h in result["hospitals"]] == ["hospital-1", "hospital-2"]
        assert all(0 < h["epsilon"] <= h["budget_epsilon"] == 3.0 for h in result["hospitals"])
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert (run_dir / "figures" / "reliability.png").is_file()


@pytest.mark.slow
@pytest.mark.processes  # its kernel runs `fedpriv` (SuperLink, Ray) and the other CLIs
def test_the_sweep_has_one_row_per_epsilon(executed):
    notebook, out = executed
    with open(out / "sweep" / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(float(row["epsilon_budget"]) for row in rows) == [1.0, 8.0]
    assert {row["mode"] for row in rows} == {"parallel"}
    for row in rows:
        assert 0 < float(row["epsilon_spent_max"]) <= float(row["epsilon_budget"])
        assert 0 <= float(row["test_auc"]) <= 1
    assert (out / "sweep" / "privacy_utility.png").is_file()
    assert "Sweep: privacy against utility" in _text(notebook)


@pytest.mark.slow
@pytest.mark.processes  # its kernel runs `fedpriv` (SuperLink, Ray) and the other CLIs
def test_the_audit_attacks_with_and_without_dp_and_stays_under_the_bound(executed):
    notebook, out = executed
    audit = json.loads((out / "audit" / "audit.json").read_text())
    assert audit["ok"] is True and audit["violations"] == []
    labels = [level["label"] for level in audit["membership"]["levels"]]
    assert labels[0] == "non-private" and len(labels) == 2
    settings = {case["setting"] for case in audit["inversion"]["cases"]}
    assert "non-private" in settings and any(s.startswith("DP") for s in settings)
    assert (out / "audit" / "membership_roc.png").is_file() and list((out / "audit").glob("inversion_batch*.png"))
    text = _text(notebook)
    assert audit["verdict"] in text and "#### Summary" in text


@pytest.mark.slow
@pytest.mark.processes  # its kernel runs `fedpriv` (SuperLink, Ray) and the other CLIs
def test_predictions_come_with_a_calibrated_confidence(executed):
    notebook, out = executed
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    assert all(row["predicted_class"] in ("normal", "opacity") and 0.5 <= float(row["probability"]) <= 1
               for row in rows)
    text = _text(notebook)
    assert "temperature" in text and "test ECE" in text
    assert "image(s) predicted" in text
