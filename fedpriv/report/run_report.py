"""The run report: ``report.html`` (self-contained) and ``report.md`` (with ``figures/*.png``) in a run directory.

It is built from the run's files (config.yaml, metrics.json, result.json, partition.json,
calibration.json, subgroups.json), so ``fedpriv-report RUN_DIR`` can rebuild it at any time. The
per-record epsilon of simulated hospitals is read (read-only) from their ledger, which needs the
data to name each hospital's records; without either, the report shows what the hospitals reported.
The one step that needs the model and the data, calibration plus subgroup metrics, runs only when
calibration.json or subgroups.json is missing (or ``recompute=True``). The ServerApp passes the
dataset it already holds, so the report costs two forward passes (validation and test split)
and a one-dimensional fit.

A section that cannot be produced (e.g. the data is no longer where config.yaml says) becomes a
visible warning in the report; the rest is still written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv import rundir
from fedpriv.config import FedprivConfig
from fedpriv.data import MedicalImageDataset
from fedpriv.errors import FedprivError
from fedpriv.privacy.ledger import SPENT_FRACTION
from fedpriv.protocol import Status
from fedpriv.report import figures
from fedpriv.report.calibration import CalibrationReport
from fedpriv.report.document import (
    Banner,
    Block,
    Code,
    Figure,
    Heading,
    Paragraph,
    Table,
    save_figures,
    to_html,
    to_markdown,
)
from fedpriv.report.evaluation import evaluate_final_model, read_evaluation
from fedpriv.report.fairness import (
    PRIVATE_NOTE,
    AttributeFairness,
    HospitalFairness,
    MetricGap,
    SubgroupFairness,
    hospital_fairness,
)
from fedpriv.report.record_privacy import LedgerSpreads, RecordSpread, ledger_spreads, reported_spreads
from fedpriv.rundir import MIXED_UNITS, format_epsilon, number, per_unit

log = logging.getLogger(__name__)

MAX_ROUND_COLUMNS = 12
SMALL_GROUP = 30
LABELS = {"auc": "AUC", "tpr": "TPR", "tnr": "TNR", "selection_rate": "selection rate"}
NOT_PRIVATE = ("NOT PRIVATE: epsilon = infinity. This run trained without differential privacy "
               "(privacy=none); nothing bounds what the model reveals about any patient.")

Evaluation = tuple[CalibrationReport, SubgroupFairness]


@dataclass
class RunFiles:
    """What a run directory holds (files that are absent are None)."""

    run_dir: Path
    config: FedprivConfig
    config_text: str
    metrics: dict[str, Any] | None
    result: dict[str, Any] | None
    partition: list[dict[str, Any]] | None

    @classmethod
    def load(cls, run_dir: str | Path) -> RunFiles:
        run_dir = Path(run_dir)
        config = rundir.read_config(run_dir)
        return cls(run_dir, config, rundir.read_config_text(run_dir), rundir.read_metrics(run_dir),
                   rundir.read_result(run_dir), rundir.read_partition(run_dir))

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return (self.metrics or {}).get("rounds") or []

    @property
    def private(self) -> bool:
        return bool(self.result["private"]) if self.result else self.config.privacy.enabled

    @property
    def run_id(self) -> str:
        return str((self.result or self.metrics or {}).get("run_id") or self.run_dir.name)

    @property
    def dataset(self) -> str:
        return str((self.result or self.metrics or {}).get("dataset") or self.config.dataset.name)

    @property
    def synthetic(self) -> bool:
        """Whether the run trained on generated images (its data description starts with SYNTHETIC)."""
        return self.dataset.startswith("SYNTHETIC")

    @property
    def test_metrics(self) -> dict[str, Any]:
        if self.result:
            return self.result.get("test") or {}
        return self.rounds[-1]["server"] if self.rounds else {}


@dataclass
class WrittenReport:
    """Where the report went, and what it could not include (also shown in the report itself)."""

    html: Path
    markdown: Path
    warnings: list[str]


def write_run_report(run_dir: str | Path, *, dataset: MedicalImageDataset | None = None,
                     recompute: bool = False) -> WrittenReport:
    """Write report.html, report.md and figures/ into ``run_dir``.

    Calibration and subgroup metrics are read from calibration.json / subgroups.json when both
    exist; otherwise (or with ``recompute``) they are computed from model.pt and the data, which
    is ``dataset`` if given, else loaded as config.yaml describes. Raises :class:`RunFilesError`
    only when ``run_dir`` holds no readable config.yaml or a corrupt JSON file.
    """
    files = RunFiles.load(run_dir)
    evaluation, problem = _evaluation(files, dataset, recompute)
    warnings = [f"calibration and subgroup metrics not computed: {problem}"] if problem else []
    blocks = build_report(files, evaluation, problem, warnings, dataset=dataset)
    title = f"fedpriv run report: {files.run_id}"
    save_figures(blocks, files.run_dir / rundir.FIGURES)
    written = WrittenReport(files.run_dir / rundir.REPORT_HTML, files.run_dir / rundir.REPORT_MD, warnings)
    written.markdown.write_text(to_markdown(title, blocks, rundir.FIGURES), encoding="utf-8")
    written.html.write_text(to_html(title, blocks), encoding="utf-8")
    log.info("run report written to %s and %s", written.html, written.markdown)
    return written


def _evaluation(files: RunFiles, dataset: MedicalImageDataset | None, recompute: bool) -> tuple[Evaluation | None, str]:
    """Saved calibration/subgroup results, or freshly computed ones, or (None, why not)."""
    if not recompute and (saved := read_evaluation(files.run_dir)) is not None:
        return saved, ""
    try:
        return evaluate_final_model(files.run_dir, dataset), ""
    except (FedprivError, OSError, ValueError, RuntimeError) as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
        log.warning("calibration and subgroup metrics not computed: %s", problem)
        return None, problem


def build_report(files: RunFiles, evaluation: Evaluation | None, problem: str = "",
                 warnings: list[str] | None = None, dataset: MedicalImageDataset | None = None) -> list[Block]:
    """Every section of the report, in reading order; sections that fail are noted in ``warnings``.

    ``dataset`` (else loaded as config.yaml says) names the simulated hospitals' records in their ledger.
    """
    calibration, subgroups = evaluation if evaluation else (None, None)
    hospitals = hospital_fairness(files.metrics, client_evaluate=files.config.strategy.client_evaluate)
    sections: list[tuple[str, Callable[[], list[Block]]]] = [
        ("Summary", lambda: _summary(files, calibration, hospitals)),
        ("Configuration", lambda: _configuration(files)),
        ("Data and partition", lambda: _data(files)),
        ("Learning curves", lambda: _learning(files)),
        ("Privacy spent per hospital", lambda: _privacy(files)),
        ("Per-record epsilon per hospital", lambda: _record_privacy(files, dataset)),
        ("Calibration", lambda: _calibration(calibration, problem, files.synthetic)),
        ("Fairness across hospitals", lambda: _hospitals(hospitals, files.synthetic)),
        ("Fairness across subgroups", lambda: _subgroups(subgroups, problem)),
        ("Sweep", lambda: _sweep(files)),
        ("Files", lambda: _files(files)),
    ]
    blocks: list[Block] = []
    for title, section in sections:
        blocks += _guarded(title, section, warnings if warnings is not None else [])
    return blocks


def _guarded(title: str, section: Callable[[], list[Block]], warnings: list[str]) -> list[Block]:
    try:
        return section()
    except Exception as exc:  # one broken section must not cost the rest of the report
        log.exception("report section %r failed", title)
        warnings.append(f"section {title!r} could not be produced: {type(exc).__name__}: {exc}")
        return [Heading(title), Banner(f"This section could not be produced: {type(exc).__name__}: {exc}", "warning")]


# ------------------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 4) -> str:
    """A metric for a table: NaN/None as "n/a", infinity as "inf"."""
    figure = number(value)
    if math.isnan(figure):
        return "n/a"
    return ("inf" if figure > 0 else "-inf") if math.isinf(figure) else f"{figure:.{digits}f}"


def fmt_epsilon(value: Any, budget: Any = None) -> str:
    """An epsilon by the one rule (:func:`fedpriv.rundir.format_epsilon`), or "inf (NOT PRIVATE)"."""
    figure = number(value)
    if math.isnan(figure):
        return "n/a"
    return "inf (NOT PRIVATE)" if math.isinf(figure) else format_epsilon(figure, budget)


def fmt_budget(value: Any) -> str:
    figure = number(value)
    return "none" if math.isinf(figure) else f"{figure:g}"


# --------------------------------------------------------------------------------------- sections


def _summary(files: RunFiles, calibration: CalibrationReport | None, hospitals: HospitalFairness) -> list[Block]:
    blocks: list[Block] = []
    if not files.private:
        blocks.append(Banner(NOT_PRIVATE))
    if files.synthetic:
        blocks.append(Banner("SYNTHETIC data (generated images, not patients): these results say nothing "
                             "clinical.", "warning"))
    if files.result is not None and files.result.get("rounds_trained") == 0:
        blocks.append(Banner("UNTRAINED MODEL: no hospital trained in any round (each refused or was locked), so "
                             "the model is the initial one. No test metric is reported as a result, and its "
                             "calibration and per-round figures describe an untrained model.", "warning"))
    if files.result is None:
        blocks.append(Banner(f"This run has not finished (no {rundir.RESULT}): figures are from the last "
                             "finished round.", "warning"))
    if files.private and _throwaway_ledger(files):
        blocks.append(Banner(THROWAWAY_LEDGER, "warning"))
    test = files.test_metrics
    rows = [[f"test {name}", fmt(test.get(key))] for name, key in
            (("ROC-AUC", "auc"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
             ("specificity", "specificity"), ("loss", "loss"))]
    rows.append(["epsilon spent (max over hospitals)", _max_epsilon(files)])
    if calibration:
        rows += _calibration_rows(calibration)
    for gap in hospitals.gaps:
        if gap.metric == "auc":
            rows.append(["hospital AUC gap (best - worst, private validation)", fmt(gap.gap)])
    rows.append(["rounds run", _rounds_line(files)])
    return [*blocks, Heading("Summary"), Paragraph(_privacy_line(files)), Table(["figure", "value"], rows)]


def _calibration_rows(calibration: CalibrationReport) -> list[list[str]]:
    """The summary's calibration rows: the ECE with the temperature applied, and which T was chosen and why."""
    edge = " (AT THE EDGE of its search range)" if calibration.at_bound else ""
    if calibration.applied:
        return [[f"test ECE ({calibration.n_bins} bins), before -> after temperature scaling",
                 f"{fmt(calibration.before.ece)} -> {fmt(calibration.after.ece)}"],
                ["temperature applied (fitted on the public validation split)",
                 f"{fmt(calibration.temperature, 3)}{edge}: {calibration.decision}"]]
    return [[f"test ECE ({calibration.n_bins} bins), no temperature scaling", fmt(calibration.before.ece)],
            ["temperature applied", f"1 (the fitted T = {fmt(calibration.fitted_temperature, 3)}{edge} was "
                                    f"{calibration.decision})"]]


def _max_epsilon(files: RunFiles) -> str:
    hospitals = (files.result or {}).get("hospitals") or (files.rounds[-1]["privacy"] if files.rounds else [])
    spent = [number(h["epsilon"]) for h in hospitals]
    if not spent:
        return "n/a"
    if not files.private or any(math.isinf(e) for e in spent):
        return "inf (NOT PRIVATE)"
    budgets = {fmt_budget(h["budget_epsilon"]) for h in hospitals}
    largest = max(hospitals, key=lambda h: number(h["epsilon"]))
    return (f"{format_epsilon(largest['epsilon'], largest['budget_epsilon'])} {per_unit(_unit(files))} "
            f"(budgets: {', '.join(sorted(budgets))})")


def _unit(files: RunFiles) -> str:
    """What a record is, as the hospitals reported it (result.json), else as the run config asked."""
    return (files.result or {}).get("privacy_unit") or files.config.privacy.unit


def _rounds_line(files: RunFiles) -> str:
    planned = files.config.strategy.num_rounds
    if files.result:
        return f"{files.result['rounds_run']} of {planned}: {files.result['stop_reason']}"
    return f"{len(files.rounds)} of {planned} (run not finished)"


def _privacy_line(files: RunFiles) -> str:
    cfg = files.config
    if not files.private:
        return "Privacy: NONE. Epsilon = infinity for every hospital."
    result = files.result or {}
    # The accountant and the noise seeding are what the hospitals reported, not what the run asked.
    used = sorted(set((result.get("accountants") or {}).values())) or [cfg.privacy.accountant]
    unit = _unit(files)
    if unit == "patient":
        kind = "patient-level (epsilon, delta)-DP, all of a patient's images as one record: user-level DP-SGD"
    elif unit == MIXED_UNITS:
        per_patient = [h["hospital"] for h in result.get("hospitals", []) if h.get("unit") == "patient"]
        kind = (f"patient-level (user-level DP-SGD) at {', '.join(per_patient)}; record-level, one image as one "
                "record, at the others")
    else:
        kind = ("record-level (epsilon, delta)-DP, one image as one record; a patient with k images is protected "
                "only at about k x epsilon")
    line = (f"Privacy: DP-SGD at every hospital ({kind}), "
            f"default budget epsilon {cfg.privacy.epsilon:g} {per_unit(unit)} at delta {cfg.privacy.delta:g}, "
            "accountant "
            f"{', '.join(used)} (as the hospitals report), clipping norm {cfg.privacy.max_grad_norm:g}, noise "
            f"multiplier {cfg.privacy.noise_multiplier}.")
    if used != [cfg.privacy.accountant]:
        line += f" The run config asked for accountant {cfg.privacy.accountant}; the hospitals' ledgers use theirs."
    if result.get("noise_seeded"):
        line += (" WARNING: hospitals seeded their DP noise from a noise seed; whoever knows it can regenerate "
                 "the noise.")
    return line


def _configuration(files: RunFiles) -> list[Block]:
    cfg = files.config
    rows = [
        ["dataset", f"{cfg.dataset.name} ({cfg.dataset.size} px)"],
        ["model", f"{cfg.model.name} (width {cfg.model.width}, {cfg.model.activation})"
                  if cfg.model.name == "cnn" else cfg.model.name],
        ["privacy", "DP-SGD" if cfg.privacy.enabled else "NONE (epsilon = infinity)"],
        ["strategy", f"{cfg.strategy.mode}, {cfg.strategy.num_rounds} rounds, hospital evaluation "
                     f"{'on' if cfg.strategy.client_evaluate else 'off'}"],
        ["federation", f"{cfg.federation.num_hospitals} hospitals, {cfg.federation.partition} partition"
                       + (f" (alpha {cfg.federation.alpha:g})" if cfg.federation.partition != "iid" else "")],
        ["local training", f"batch size {cfg.train.batch_size}, {cfg.train.local_epochs} epoch(s), "
                           f"lr {cfg.train.lr:g}, momentum {cfg.train.momentum:g}, "
                           + (f"logit adjustment {cfg.train.logit_adjustment:g} with class prior "
                              f"{', '.join(f'{p:g}' for p in cfg.dataset.class_prior)}"
                              if cfg.dataset.class_prior and cfg.train.logit_adjustment else "plain cross-entropy")],
        ["seed", str(cfg.seed)],
    ]
    return [Heading("Configuration"), Table(["setting", "value"], rows),
            Code(files.config_text, summary=f"Full resolved configuration ({rundir.CONFIG})")]


def _data(files: RunFiles) -> list[Block]:
    blocks: list[Block] = [Heading("Data and partition"), Paragraph(files.dataset),
                           Paragraph("The server holds the held-out test split (all test figures) and the "
                                     "official validation split (its public calibration split). Each hospital "
                                     "trains on its own partition and keeps part of it as a private validation "
                                     "split.")]
    if files.partition:
        headers = list(dict.fromkeys(key for row in files.partition for key in row))
        rows = [[_cell(row.get(h, "")) for h in headers] for row in files.partition]
        blocks.append(Table(headers, rows))
    elif files.result:
        rows = [[h["hospital"], str(h["records"])] for h in files.result["hospitals"]]
        blocks += [Paragraph(f"{rundir.PARTITION_JSON} is not in this run directory (the fedpriv CLI writes it); "
                             "training records as reported by the hospitals:"),
                   Table(["hospital", "training records"], rows)]
    return blocks


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _learning(files: RunFiles) -> list[Block]:
    rounds = files.rounds
    if not rounds:
        return [Heading("Learning curves"), Paragraph("No round finished, so there are no learning curves.")]
    rows = [[str(r["round"]), *(fmt(r["server"].get(k)) for k in ("auc", "accuracy", "loss")),
             f"{sum(1 for h in r['hospitals'].values() if h.get('status') == Status.TRAINED)} of {len(r['order'])}"]
            for r in rounds]
    return [Heading("Learning curves"),
            Figure("learning_curves", figures.learning_curves(rounds, synthetic=files.synthetic),
                   "Global model on the held-out test split, after every round."),
            Table(["round", "test AUC", "test accuracy", "test loss", "hospitals trained"], rows)]


def _privacy(files: RunFiles) -> list[Block]:
    blocks: list[Block] = [Heading("Privacy spent per hospital")]
    rounds = files.rounds
    if not files.private:
        blocks.append(Banner(NOT_PRIVATE))
    else:
        if _throwaway_ledger(files):
            blocks.append(Paragraph(f"Epsilon ({per_unit(_unit(files))}) is what this run spent on each "
                                    "hospital's data, from a throw-away "
                                    "ledger (federation.ledger_scope=run), at its own delta: the budget was enforced "
                                    "within this run only (and its resumptions), not over every use of the data. "
                                    "Epsilons are reported per hospital and as a maximum, never averaged."))
        else:
            blocks.append(Paragraph(f"Epsilon ({per_unit(_unit(files))}) is each hospital's cumulative "
                                    "epsilon from its own ledger, over every "
                                    "use of its data (all rounds and runs), at its own delta"
                                    + (f"; the simulated hospitals' ledgers are in {folder}" if
                                       (folder := (files.result or {}).get("ledger_folder")) else "")
                                    + ". Epsilons are reported per hospital and as a maximum, never averaged."))
        plot = figures.privacy_spend(rounds, synthetic=files.synthetic) if rounds else None
        if plot:
            blocks.append(Figure("privacy", plot, "Cumulative epsilon per hospital after each round; dashed: "
                                 "its budget; X: the round it locked."))
    blocks.append(_privacy_table(files))
    locks = _locks(rounds)
    already = sorted(name for name, state in _final_privacy(files).items() if state["locked"]
                     and name not in {row[0] for row in locks})
    if locks:
        blocks += [Paragraph("Locked hospitals (they refuse every further round):"),
                   Table(["hospital", "locked in round", "epsilon spent", "what it said"], locks)]
    if already:
        blocks.append(Paragraph(f"Locked before this run's first round (budgets spent by earlier runs): "
                                f"{', '.join(already)}."))
    if not locks and not already:
        blocks.append(Paragraph("No hospital was locked during this run."))
    refusals = _refusals(rounds)
    if refusals:
        blocks += [Paragraph("Hospitals that refused a round (nothing was charged; their records stay usable by a "
                             "smaller round):"),
                   Table(["hospital", "first refused in round", "rounds refused", "epsilon spent", "what it said"],
                         refusals)]
    return blocks


def _refusals(rounds: list[dict[str, Any]]) -> list[list[str]]:
    """One row per hospital that refused a round without being locked: when, how often, and why."""
    rows = []
    for name in dict.fromkeys(n for r in rounds for n in r["hospitals"]):
        refused = [r for r in rounds if r["hospitals"].get(name, {}).get("status") == Status.REFUSED]
        if refused:
            reply = refused[0]["hospitals"][name]
            rows.append([name, str(refused[0]["round"]), str(len(refused)),
                         fmt_epsilon(reply.get("epsilon", math.nan), reply.get("budget-epsilon")),
                         str(reply.get("message", ""))])
    return rows


THROWAWAY_LEDGER = ("THROW-AWAY LEDGER (federation.ledger_scope=run): each hospital's privacy budget was "
                    "enforced within this run only. Other uses of the same data are not counted, so epsilon "
                    "here is not a hospital's cumulative spend.")


def _throwaway_ledger(files: RunFiles) -> bool:
    """Whether the run charged a throw-away ledger: its budget was enforced within that run only."""
    scope = (files.result or {}).get("ledger_scope") or files.config.federation.ledger_scope
    return scope == "run"


def _shown_rounds(count: int) -> list[int]:
    """Indices of the rounds that get a column: all, or MAX_ROUND_COLUMNS spread evenly (first and last kept)."""
    return sorted({int(i) for i in np.linspace(0, count - 1, min(count, MAX_ROUND_COLUMNS))}) if count else []


def _final_privacy(files: RunFiles) -> dict[str, dict[str, Any]]:
    """Each hospital's final privacy state: from result.json, else from the last round."""
    if files.result:
        return {h["hospital"]: h for h in files.result["hospitals"]}
    return {p["hospital"]: p for p in files.rounds[-1]["privacy"]} if files.rounds else {}


def _privacy_table(files: RunFiles) -> Table:
    """Epsilon per hospital after each round (up to MAX_ROUND_COLUMNS of them), budget, delta and lock."""
    rounds = files.rounds
    shown = _shown_rounds(len(rounds))
    final = _final_privacy(files)
    headers = ["hospital", "budget", "delta", *(f"after round {rounds[i]['round']}" for i in shown), "final epsilon",
               "locked"]
    rows = []
    for name, state in final.items():
        per_round = [next((p for p in rounds[i]["privacy"] if p["hospital"] == name), None) for i in shown]
        rows.append([name, fmt_budget(state["budget_epsilon"]), f"{number(state['delta']):g}",
                     *(fmt_epsilon(p["epsilon"], p["budget_epsilon"]) if p else "-" for p in per_round),
                     fmt_epsilon(state["epsilon"], state["budget_epsilon"]),
                     "yes" if state["locked"] else "no"])
    return Table(headers, rows)


def _locks(rounds: list[dict[str, Any]]) -> list[list[str]]:
    """One row per hospital that locked: the first round whose privacy table shows it locked, and why."""
    rows = []
    for name in dict.fromkeys(p["hospital"] for r in rounds for p in r["privacy"]):
        locked = next(((r, p) for r in rounds for p in r["privacy"] if p["hospital"] == name and p["locked"]), None)
        if locked is not None:
            record, privacy = locked
            reply = record["hospitals"].get(name, {})
            rows.append([name, str(record["round"]), fmt_epsilon(privacy["epsilon"], privacy["budget_epsilon"]),
                         str(reply.get("message") or reply.get("status") or "")])
    return rows


def _record_privacy(files: RunFiles, dataset: MedicalImageDataset | None) -> list[Block]:
    """Each hospital's per-record epsilon against its budget: from the ledger, else as reported."""
    blocks: list[Block] = [Heading("Per-record epsilon per hospital")]
    found = ledger_spreads(files.config, files.run_dir, files.run_id, dataset)
    if isinstance(found, str):
        spreads = reported_spreads(files.rounds, _final_privacy(files))
        return [*blocks,
                Paragraph(f"Per-record epsilon is not plotted: {found}. Each hospital's per-record distribution is "
                          "held in its own ledger: `fedpriv-ledger show LEDGER` on the machine that holds it (a "
                          "deployed hospital's own machine) shows it.", strong=True),
                Paragraph("Below: what each hospital reported in its last reply: its largest and median epsilon "
                          "over its records and how many are exhausted (it does not report the smallest)."),
                _spread_table(spreads, reported=True)]
    return [*blocks, *_ledger_blocks(found, files.synthetic)]


def _ledger_blocks(found: LedgerSpreads, synthetic: bool) -> list[Block]:
    spreads = found.spreads
    blocks: list[Block] = [Paragraph(
        f"Every record's epsilon, read (read-only) from the simulated hospitals' ledger {found.path} when this "
        "report was built: the records each hospital trains on, accounted over every use of them, against that "
        f"hospital's budget. A record is exhausted (it never trains again) when less than {SPENT_FRACTION:.0%} of its "
        "budget is left or after a non-private use.")]
    if found.later_charges:
        blocks.append(Banner(f"The ledger holds {found.later_charges} charge(s) by later runs: these figures include "
                             "them (they are as of this report, not of the end of this run).", "warning"))
    plot = figures.record_epsilon([(s.hospital, s.epsilon, s.budget) for s in spreads if s.epsilon is not None],
                                  synthetic=synthetic)
    if plot:
        caption = ("Each hospital's records sorted by epsilon (solid) against its budget (dashed)."
                   if len(spreads) <= figures.MAX_RECORD_PANELS else
                   "Every hospital's records, each line one hospital's sorted by epsilon, as shares of that "
                   "hospital's own budget (dashed: 1, the budget).")
        blocks.append(Figure("record_epsilon", plot, caption))
    else:  # nothing finite to draw: every record is at infinity
        blocks.append(Paragraph("No plot: every record of every hospital has epsilon = infinity (not private: it "
                                "was used without differential privacy).", strong=True))
    return [*blocks, _spread_table(spreads, reported=False)]


def _spread_table(spreads: list[RecordSpread], *, reported: bool) -> Table:
    rows = [[s.hospital, "not reported" if s.records is None else str(s.records), fmt_budget(s.budget),
             *(_record_epsilon(v, s.budget) for v in (s.minimum, s.median, s.maximum)),
             "not reported" if s.exhausted is None else f"{s.exhausted} of {s.records}",
             *([f"round {s.reported_round}" if s.reported_round is not None else rundir.RESULT] if reported else [])]
            for s in spreads]
    headers = ["hospital", "records", "budget", "min epsilon", "median epsilon", "max epsilon", "exhausted"]
    return Table([*headers, *(["reported in"] if reported else [])], rows)


def _record_epsilon(value: float, budget: float) -> str:
    if math.isnan(value):
        return "not reported"
    return "infinity (not private)" if math.isinf(value) else format_epsilon(value, budget)


def _calibration(calibration: CalibrationReport | None, problem: str, synthetic: bool = False) -> list[Block]:
    blocks: list[Block] = [Heading("Calibration")]
    if calibration is None:
        return [*blocks, Banner(f"Calibration was not computed: {problem}", "warning")]
    before, after = calibration.before, calibration.after
    rows = [[name, fmt(getattr(before, key)), fmt(getattr(after, key))] for name, key in
            (("expected calibration error (ECE)", "ece"), ("Brier score", "brier"),
             ("negative log-likelihood", "nll"), ("accuracy", "accuracy"))]
    return [
        *blocks,
        Paragraph(f"Measured on {calibration.evaluated_on}. ECE uses {calibration.n_bins} {calibration.binning}; "
                  f"Brier score: squared error of the predicted probabilities (binary: of class 1)."),
        Paragraph(f"Temperature scaling: T = {calibration.fitted_temperature:.3f} was fitted by minimising the "
                  f"negative log-likelihood on {calibration.fitted_on}, never on a hospital's private data. "
                  f"T > 1 means the model was over-confident. T changes neither the predicted class nor a binary "
                  f"AUC. It is applied only if it lowers the ECE of that split. {_decision_sentence(calibration)} "
                  f"The applied T = {calibration.temperature:.3f} is saved in {rundir.CALIBRATION} and "
                  "fedpriv-predict uses it."),
        *_not_applied_warning(calibration),
        *_bound_warning(calibration),
        Table(["metric (test split)", "before (T = 1)", _after_header(calibration)], rows),
        Figure("reliability", figures.reliability_diagram(calibration, synthetic=synthetic),
               "Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration; "
               "below, the share of test images per bin."),
    ]


def _decision_sentence(calibration: CalibrationReport) -> str:
    if not calibration.decision:  # written before the choice existed: T was always applied
        return f"(This {rundir.CALIBRATION} predates that check: the fitted T was applied unconditionally.)"
    return f"Fitted T {calibration.decision}."


def _after_header(calibration: CalibrationReport) -> str:
    suffix = "" if calibration.applied else ", NOT applied"
    return f"with fitted T = {calibration.fitted_temperature:.3f}{suffix}"


def _not_applied_warning(calibration: CalibrationReport) -> list[Block]:
    if calibration.applied:
        return []
    return [Banner(f"Temperature scaling was NOT applied: the fitted T = {calibration.fitted_temperature:.3g} "
                   "did not improve calibration on the validation split; probabilities are the model's own "
                   "(T = 1).", "warning")]


def _bound_warning(calibration: CalibrationReport) -> list[Block]:
    if not calibration.at_bound:
        return []
    return [Banner(f"The fitted temperature reached the edge of its search range "
                   f"({calibration.fitted_temperature:.3g}): the "
                   "model's confidence carries little information (it is close to a constant predictor), or the "
                   "calibration split is too small or separated perfectly.", "warning")]


def _hospitals(fairness: HospitalFairness, synthetic: bool = False) -> list[Block]:
    blocks: list[Block] = [Heading("Fairness across hospitals")]
    if not fairness.available:
        return [*blocks, Paragraph(f"Per-hospital metrics are NOT available: {fairness.missing_reason}.", strong=True)]
    rows = [[r["hospital"], str(r["num-examples"]), *(fmt(r[m]) for m in ("auc", "accuracy", "sensitivity",
                                                                          "specificity"))] for r in fairness.rows]
    gaps = [_gap_row(g) for g in fairness.gaps]
    return [
        *blocks,
        Banner(PRIVATE_NOTE, "warning"),
        Paragraph(f"The final global model (after round {fairness.round}), evaluated by each hospital. A metric "
                  "that is undefined for a hospital (n/a: e.g. its validation split holds one class only) is "
                  "left out of that metric's gap. Small validation splits give noisy figures."),
        Table(["hospital", "validation images", "AUC", "accuracy", "sensitivity", "specificity"], rows),
        Table(["metric", "best hospital", "worst hospital", "gap"], gaps),
        Figure("hospitals", figures.hospital_bars(fairness, synthetic=synthetic), "Final model per hospital (private validation splits)."),
    ]


def _gap_row(gap: MetricGap) -> list[str]:
    if gap.gap == 0:
        return [LABELS.get(gap.metric, gap.metric), "(all equal)", "(all equal)", fmt(0.0)]
    return [LABELS.get(gap.metric, gap.metric), f"{gap.best} ({fmt(gap.best_value)})",
            f"{gap.worst} ({fmt(gap.worst_value)})", fmt(gap.gap)]


def _subgroups(subgroups: SubgroupFairness | None, problem: str) -> list[Block]:
    blocks: list[Block] = [Heading("Fairness across subgroups")]
    if subgroups is None:
        return [*blocks, Banner(f"Subgroup metrics were not computed: {problem}", "warning")]
    if not subgroups.available:
        return [*blocks, Paragraph(f"Subgroup fairness NOT assessed: {subgroups.missing_reason}.", strong=True)]
    blocks.append(Paragraph(f"On {subgroups.evaluated_on}; positive class: {subgroups.positive_class}. "
                            "Equal-opportunity difference: the largest gap in true-positive rate between groups. "
                            "Demographic-parity difference: the largest gap in the share predicted positive."))
    for attribute in subgroups.attributes:
        blocks.append(Heading(f"Attribute: {attribute.attribute}", 3))
        if attribute.skipped_reason:
            blocks.append(Paragraph(f"Not analysed: {attribute.skipped_reason}."))
            continue
        rows = [[g.group, str(g.count), str(g.positives) if g.positives >= 0 else "-", fmt(g.auc), fmt(g.accuracy),
                 fmt(g.tpr), fmt(g.tnr), fmt(g.selection_rate)] for g in attribute.groups]
        blocks.append(Table(["group", "images", "positives", "AUC", "accuracy", "TPR (sensitivity)",
                             "TNR (specificity)", "selection rate"], rows))
        blocks.append(Paragraph(_gap_line(attribute)))
    return blocks


def _gap_line(attribute: AttributeFairness) -> str:
    line = (f"Equal-opportunity difference {fmt(attribute.equal_opportunity_difference)}; demographic-parity "
            f"difference {fmt(attribute.demographic_parity_difference)}.")
    if attribute.missing:
        line += f" {attribute.missing} test images without a value were left out."
    small = [g.group for g in attribute.groups if g.count < SMALL_GROUP]
    if small:
        line += f" Groups under {SMALL_GROUP} images ({', '.join(small)}): their rates are noisy."
    return line


def _sweep(files: RunFiles) -> list[Block]:
    parent = files.run_dir.parent
    plot = parent / rundir.SWEEP_PLOT
    if plot.is_file():
        return [Heading("Sweep"),
                Paragraph(f"This run is part of the sweep in {parent} (table: ../{rundir.SWEEP_MD})."),
                Figure("privacy_utility", plot.read_bytes(), "Privacy-utility trade-off over the whole sweep.",
                       markdown_path=f"../{rundir.SWEEP_PLOT}")]
    if (parent / rundir.MULTIRUN_RECORD).is_file():
        return [Heading("Sweep"),
                Paragraph("This run is part of a sweep whose privacy-utility plot is written when the sweep ends; "
                          "run fedpriv-report on this directory afterwards to include it.")]
    return []


def _files(files: RunFiles) -> list[Block]:
    run_dir = files.run_dir
    rows = [[name, "present" if (run_dir / name).is_file() else "absent"] for name in rundir.LISTED_FILES]
    for folder in rundir.LISTED_FOLDERS:
        count = sum(1 for _ in (run_dir / folder).glob("*")) if (run_dir / folder).is_dir() else 0
        rows.append([f"{folder}/", f"{count} files"])
    return [Heading("Files"), Paragraph(f"Run directory: {run_dir}"), Table(["file", "status"], rows)]
