"""The run report, built from finished tiny federations run in process (as tests/test_federation.py does)."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from inprocess_grid import InProcessGrid
from PIL import Image

from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, compose_config, config_to_json
from fedpriv.cli.report import main as report_main
from fedpriv.config import to_config
from fedpriv.data import load_dataset
from fedpriv.errors import DataError
from fedpriv.experiment import prepare_experiment
from fedpriv.privacy.chain import ChainKey, key_path_for
from fedpriv.privacy.ledger import read_ledger
from fedpriv.report import figures
from fedpriv.report.run_report import write_run_report
from fedpriv.rundir import format_epsilon
from fedpriv.server_app import run_federation
from fedpriv.site import simulation_ledger_path

TINY = ["federation=iid", "train.batch_size=16", "train.local_epochs=1", "model.width=4"]
PNG = b"\x89PNG\r\n\x1a\n"


def federate(folder: Path, name: str, *overrides: str) -> tuple[Path, object]:
    cfg = compose_config([*TINY, f"federation.ledger_dir={folder / 'ledgers'}", *overrides])
    run_dir = folder / name
    grid = InProcessGrid(cfg.federation.num_hospitals, {CONFIG_KEY: config_to_json(cfg), RUN_DIR_KEY: str(run_dir)})
    run_federation(grid, cfg, run_dir, run_id=name)
    return run_dir, cfg


class Page(HTMLParser):
    """The visible text, image sources and tags of an HTML page."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self.images: list[dict[str, str]] = []
        self.tags: list[str] = []
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.chunks).split())


@pytest.fixture(scope="module")
def private_run(tmp_path_factory) -> Path:
    # sigma 1 (RDP) costs epsilon 5.6, 7.4, 8.8 after rounds 1-3, so alpha refuses from round 2 and beta in round 3.
    run_dir, _ = federate(tmp_path_factory.mktemp("private"), "private", "dataset=synthetic",
                          "dataset.num_samples=240", "strategy.num_rounds=3", "strategy.client_evaluate=true",
                          "privacy.noise_multiplier=1.0", "privacy.accountant=rdp",
                          "federation.hospitals=[{name: alpha, epsilon: 6.0}, {name: beta, epsilon: 8.0}, "
                          "{name: gamma, epsilon: 10.0}]")
    write_run_report(run_dir)
    return run_dir


@pytest.mark.slow
def test_the_report_shows_the_runs_key_figures(private_run):
    result = json.loads((private_run / "result.json").read_text())
    page = Page(private_run / "report.html")
    text = page.text
    assert f"test ROC-AUC {result['test']['auc']:.4f}" in text
    for hospital in result["hospitals"]:
        assert format_epsilon(hospital["epsilon"], hospital["budget_epsilon"]) in text
        assert re.search(rf"{hospital['hospital']} {hospital['budget_epsilon']:g} ", text)
    # The server's fixed sigma stops fitting alpha's budget in round 2 and beta's in round 3: each
    # refuses from then on, charging nothing, and the report says when and why.
    assert re.search(r"alpha 2 2 5\.606 request refused, nothing charged", text)
    assert re.search(r"beta 3 1 7\.377 request refused, nothing charged", text)
    assert "NOT PRIVATE" not in text
    temperature = json.loads((private_run / "calibration.json").read_text())["temperature"]
    assert f"T = {temperature:.3f}" in text and "never on a hospital's private data" in text
    assert "15 equal-width bins" in text
    assert "NOT covered by the differential-privacy guarantee" in text  # per-hospital metrics
    for hospital in ("alpha", "beta", "gamma"):
        assert re.search(rf"{hospital} \d+ (\d\.\d{{4}}|n/a) \d\.\d{{4}}", text)  # images, AUC, accuracy
    assert "Subgroup fairness NOT assessed" in text and "could NOT be assessed" in text
    assert "SYNTHETIC data" in text


def test_the_html_is_self_contained_with_embedded_plots(private_run):
    page = Page(private_run / "report.html")
    ids = {"learning_curves", "privacy", "record_epsilon", "reliability", "hospitals"}
    assert len(page.images) == len(ids)
    for image in page.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        assert base64.b64decode(image["src"][len(prefix):]).startswith(PNG)
    assert not {"script", "link", "iframe"} & set(page.tags)
    html = (private_run / "report.html").read_text()
    assert all(f'id="{name}"' in html for name in ids)


def test_the_markdown_links_figures_that_exist(private_run):
    markdown = (private_run / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(f"figures/{n}.png" for n in ("learning_curves", "privacy", "record_epsilon",
                                                                "reliability", "hospitals"))
    assert all((private_run / link).read_bytes().startswith(PNG) for link in links)
    assert "| alpha |" in markdown


def _ledger_spreads(run_dir: Path) -> tuple[Path, dict[str, object]]:
    """The run's simulated ledger and each hospital's status in it (its records, its budget)."""
    from omegaconf import OmegaConf

    cfg = to_config(OmegaConf.load(run_dir / "config.yaml"))
    experiment = prepare_experiment(cfg)
    path = simulation_ledger_path(cfg, run_dir)
    with read_ledger(path) as ledger:
        return path, {h.name: ledger.status(experiment.hospital_data(h.index).ids(), budget=h.epsilon)
                      for h in experiment.hospitals}


def test_the_report_plots_each_hospitals_per_record_epsilon_from_its_ledger(private_run):
    path, statuses = _ledger_spreads(private_run)
    witness = ChainKey.load(key_path_for(path)).witness_path
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (path, witness)}
    text = Page(write_run_report(private_run).html).text
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in (path, witness)} == before  # read-only
    assert f"read (read-only) from the simulated hospitals' ledger {path}" in text
    for name, status in statuses.items():
        assert status.records == 51
        shown = [format_epsilon(e, status.budget_epsilon)
                 for e in (status.epsilon_min, status.epsilon_median, status.epsilon_spent)]
        assert (f"{name} {status.records} {status.budget_epsilon:g} {' '.join(shown)} {status.exhausted} of "
                f"{status.records}") in text
    assert "Per-record epsilon is not plotted" not in text
    assert 'id="record_epsilon"' in (private_run / "report.html").read_text()


def test_without_the_ledger_the_report_shows_what_the_hospitals_reported(private_run, tmp_path, monkeypatch):
    run = shutil.copytree(private_run, tmp_path / "copy")
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(tmp_path / "no-keys"))  # the ledger's key is not where it was
    text = Page(write_run_report(run).html).text
    assert re.search(r"Per-record epsilon is not plotted: the ledger \S+ cannot be read \(.*its key was not found",
                     text)
    assert "`fedpriv-ledger show LEDGER` on the machine that holds it" in text
    result = {h["hospital"]: h for h in json.loads((run / "result.json").read_text())["hospitals"]}
    # alpha and beta last reported in round 3 (refusing), at the epsilon they had reached; nobody exhausted.
    for name, budget in (("alpha", 6), ("beta", 8), ("gamma", 10)):
        spent = format_epsilon(result[name]["epsilon"], budget)
        assert f"{name} 51 {budget} not reported {spent} {spent} 0 of 51 round 3" in text
    assert 'id="record_epsilon"' not in (run / "report.html").read_text()

    # A deployment: the server holds no ledger at all (the hospitals keep theirs).
    elsewhere = tmp_path / "coordinator-ledgers"
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(private_run.parent / "ledgers"), str(elsewhere)))
    text = Page(write_run_report(run).html).text
    assert (f"Per-record epsilon is not plotted: the server holds no ledger for this run (none at "
            f"{elsewhere / 'simulated-synthetic.db'}): the hospitals keep their ledgers on their own machines") in text
    assert "alpha 51 6 not reported" in text and not elsewhere.exists()  # the report created nothing


def test_the_per_record_plot_draws_finite_records_and_names_infinite_ones():
    mixed = figures.record_epsilon([("a", np.array([1.0, 2.0, np.inf]), 3.0), ("b", np.array([np.inf]), 3.0)])
    assert mixed is not None and mixed.startswith(PNG)
    assert figures.record_epsilon([("a", np.array([np.inf, np.inf]), 3.0)]) is None  # nothing finite to draw


def _break_data_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise DataError("dataset file moved")

    monkeypatch.setattr("fedpriv.data.load_dataset", refuse)


def test_fedpriv_report_rebuilds_from_the_files_without_touching_the_data(private_run, tmp_path, monkeypatch,
                                                                          capsys):
    run = shutil.copytree(private_run, tmp_path / "copy")
    (run / "report.html").unlink()
    _break_data_loading(monkeypatch)  # calibration.json and subgroups.json exist: no data needed
    assert report_main([str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "report.html"), str(run / "report.md")]
    text = Page(run / "report.html").text
    assert "Calibration was not computed" not in text
    # Naming each hospital's records in the ledger needs the data: without it, the reported figures.
    assert "needs the data (record ids are content ids), and it cannot be loaded (dataset file moved)" in text
    assert re.search(r"alpha 51 6 not reported 5\.606 5\.606 0 of 51 round 3", text)

    (run / "calibration.json").unlink()  # now it must load the data, which fails: still a report
    assert report_main([str(run)]) == 0
    assert "dataset file moved" in capsys.readouterr().err
    assert "Calibration was not computed: dataset file moved" in Page(run / "report.html").text


def test_fedpriv_report_recomputes_on_request_and_refuses_a_non_run(private_run, tmp_path, capsys):
    run = shutil.copytree(private_run, tmp_path / "copy")
    saved = json.loads((run / "calibration.json").read_text())
    (run / "calibration.json").write_text(json.dumps({**saved, "temperature": 99.0}))
    assert report_main([str(run), "--recompute"]) == 0
    assert json.loads((run / "calibration.json").read_text())["temperature"] == pytest.approx(saved["temperature"])
    assert report_main([str(tmp_path / "not-a-run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedpriv-report: error:")


def test_a_sweeps_privacy_utility_plot_is_embedded(private_run, tmp_path):
    sweep = tmp_path / "sweep"
    run = shutil.copytree(private_run, sweep / "0")
    Image.new("RGB", (20, 10), "white").save(sweep / "privacy_utility.png")
    write_run_report(run)
    html = (run / "report.html").read_text()
    assert 'id="privacy_utility"' in html
    assert "(../privacy_utility.png)" in (run / "report.md").read_text()


def test_a_run_stopped_before_its_first_round_still_gets_a_report(private_run, tmp_path):
    run = shutil.copytree(private_run, tmp_path / "copy")
    (run / "metrics.json").unlink()  # no round finished: the recorder never wrote it
    result = json.loads((run / "result.json").read_text())
    result.update(rounds_run=0, test={}, stop_reason="stopped before round 1: no hospital can train")
    for hospital in result["hospitals"]:
        hospital["locked"] = True
    (run / "result.json").write_text(json.dumps(result))
    text = Page(write_run_report(run).html).text
    assert "No round finished, so there are no learning curves" in text
    assert "Locked before this run's first round (budgets spent by earlier runs): alpha, beta, gamma" in text
    assert "Per-hospital metrics are NOT available: no round finished" in text
    assert "0 of 3: stopped before round 1" in text


def image_folder(root: Path) -> Path:
    """Two classes of 40 tiny PNGs each, with sex and site attributes in a CSV."""
    rng = np.random.default_rng(0)
    rows = []
    for label, name in enumerate(("normal", "pneumonia")):
        (root / name).mkdir(parents=True)
        for index in range(40):
            pixels = rng.integers(0, 120, (28, 28)) + 100 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")
            rows.append({"path": f"{name}/{index}.png", "sex": "FM"[index % 2], "site": "AB"[index % 4 < 2]})
    with (root / "attributes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "sex", "site"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_a_non_private_run_with_attributes(tmp_path):
    folder = image_folder(tmp_path / "images")
    run_dir, cfg = federate(tmp_path, "plain", "privacy=none", "dataset=imagefolder", f"dataset.path={folder}",
                            f"dataset.attributes_csv={folder / 'attributes.csv'}", "strategy.num_rounds=1",
                            "train.batch_size=8", "strategy.client_evaluate=false")
    write_run_report(run_dir, dataset=load_dataset(cfg.dataset, cfg.seed))  # as the ServerApp would call it
    html = (run_dir / "report.html").read_text()
    assert html.index('class="banner danger">NOT PRIVATE: epsilon = infinity') < html.index("<h2>Summary</h2>")
    text = Page(run_dir / "report.html").text
    assert "epsilon spent (max over hospitals) inf (NOT PRIVATE)" in text
    # Every record the ledger charged non-privately is at infinity: said so, not plotted.
    assert "No plot: every record of every hospital has epsilon = infinity (not private" in text
    assert re.search(r"hospital-1 \d+ \S+ infinity \(not private\) infinity \(not private\) infinity "
                     r"\(not private\) (\d+) of \1", text)
    assert 'id="record_epsilon"' not in html
    assert "Per-hospital metrics are NOT available: hospital-side evaluation is off" in text
    subgroups = json.loads((run_dir / "subgroups.json").read_text())
    by_name = {a["attribute"]: a for a in subgroups["attributes"]}
    assert sorted(by_name) == ["sex", "site"]
    assert sum(g["count"] for g in by_name["sex"]["groups"]) == 16  # the whole test split
    assert "Attribute: sex" in text and "Attribute: site" in text
    eo = by_name["sex"]["equal_opportunity_difference"]
    assert f"Equal-opportunity difference {eo:.4f}" in text
