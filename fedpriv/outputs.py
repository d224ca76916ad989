"""A run's files: resolved config, per-round metrics and privacy, checkpoints, final model, summary.

Everything is written as the run goes (after every round), so a stopped run leaves a consistent
directory that `fedpriv resume=RUN_DIR` can continue from.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedpriv import rundir
from fedpriv.config import FedprivConfig, to_config
from fedpriv.errors import ConfigError
from fedpriv.experiment import ledger_folder
from fedpriv.roster import HospitalState, RoundRecord

# Settings that decide the model's shape or which records each hospital holds: a resumed run must
# keep them, or its checkpoint would continue another experiment. The rest (rounds, epsilon,
# learning rate, mode, ledger folder) may change on resume.
RESUME_MUST_MATCH = (
    "dataset.name", "dataset.size", "dataset.path", "dataset.val_fraction", "dataset.test_fraction",
    "dataset.num_samples", "model.name", "model.width", "model.activation", "privacy.enabled",
    "federation.num_hospitals", "federation.partition", "federation.alpha", "federation.hospitals",
    "federation.local_val_fraction", "seed",
)


class RunRecorder:
    """Writes a federated run's outputs into `run_dir` as rounds finish.

    It counts the rounds in which at least one hospital trained (`rounds_trained`, saved in every
    checkpoint and in result.json). A run that ends with none has an untrained model: its summary
    and result.json then give no test metric as a result.
    """

    def __init__(self, run_dir: str | Path, config: FedprivConfig, run_id: str, dataset_description: str,
                 rounds_trained: int = 0, server_device: str = "cpu") -> None:
        """`rounds_trained`: the rounds trained before this recorder started (a resumed run's checkpoint);
        `server_device`: the torch device the server evaluates the global model on."""
        self.server_device = server_device
        self.run_dir = Path(run_dir)
        self.config = config
        self.run_id = run_id
        self.dataset_description = dataset_description
        self.rounds: list[dict] = []
        self.rounds_trained = rounds_trained
        self.started = time.perf_counter()
        (self.run_dir / rundir.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        rundir.write_config(self.run_dir, config)

    def round_end(self, record: RoundRecord, state: dict[str, torch.Tensor], hospitals: list[HospitalState]) -> None:
        """Save this round's checkpoint and append its metrics and privacy table."""
        self.rounds_trained += bool(record.trained)
        # Written whole, then renamed: a coordinator killed mid-write leaves no truncated checkpoint.
        final = rundir.checkpoint(self.run_dir, record.round)
        partial = final.with_suffix(".pt.partial")
        torch.save({"round": record.round, "run_id": self.run_id, "state_dict": state,
                    "hospitals": [asdict(h) for h in hospitals], "rounds_trained": self.rounds_trained}, partial)
        os.replace(partial, final)
        self.rounds.append({
            "round": record.round, "seconds": record.seconds, "order": record.order,
            "server": record.server_metrics, "hospitals": record.hospitals,
            "client_evaluation": record.client_evaluation,
            "privacy": [{"hospital": h.name, "epsilon": h.epsilon, "delta": h.delta,
                         "budget_epsilon": h.budget_epsilon, "locked": h.locked,
                         "unit": h.unit or self.config.privacy.unit,
                         "epsilon_is_lower_bound": h.unreported_since is not None} for h in hospitals],
        })
        self._write_metrics()

    def _write_metrics(self) -> None:
        rundir.write_metrics(self.run_dir, self.run_id, self.dataset_description, self.rounds)

    def finish(self, final_state: dict[str, torch.Tensor], hospitals: list[HospitalState], stop_reason: str,
               excluded: dict[str, str] | None = None) -> str:
        """Save the final model and write summary.md; returns the summary text.

        `excluded` names the hospitals that refused to take part at the start, with their reasons.
        """
        excluded = excluded or {}
        torch.save(final_state, self.run_dir / rundir.MODEL)
        cfg = self.config
        result = {
            "run_id": self.run_id, "mode": cfg.strategy.mode, "private": cfg.privacy.enabled,
            # What one record of the epsilons here is, as the hospitals reported it: "image", "patient" (all
            # of a patient's images), or "mixed" (each hospital's own: see its "unit").
            "privacy_unit": run_unit(cfg, hospitals),
            "epsilon_budget": cfg.privacy.epsilon if cfg.privacy.enabled else math.inf,
            "rounds_planned": cfg.strategy.num_rounds, "rounds_run": len(self.rounds), "stop_reason": stop_reason,
            "rounds_trained": self.rounds_trained,
            # What the hospitals reported doing, not what the run config asked for.
            "noise_seeded": any(h.noise_seeded for h in hospitals),
            "accountants": {h.name: h.accountant for h in hospitals if h.accountant},
            # Where the arithmetic ran: each hospital's own report of the device it last trained on, and the
            # server's for the test evaluation. It changes no privacy figure.
            "devices": {h.name: h.device for h in hospitals if h.device},
            "server_device": self.server_device,
            # An untrained model's test figures are not a result: left out.
            "test": self.rounds[-1]["server"] if self.rounds and self.rounds_trained else {},
            "hospitals": [{"hospital": h.name, "records": h.num_examples, "epsilon": h.epsilon, "delta": h.delta,
                           "budget_epsilon": h.budget_epsilon, "locked": h.locked,
                           "unit": h.unit or cfg.privacy.unit, "epsilon_is_lower_bound": h.unreported_since is not None,
                           "unreported_since_round": h.unreported_since, "accountant": h.accountant,
                           "noise_seeded": h.noise_seeded, "chain_length": h.chain_length,
                           "chain_head": h.chain_head, "max_epsilon_per_round": h.max_epsilon_per_round,
                           "max_epsilon_per_run": h.max_epsilon_per_run, "device": h.device} for h in hospitals],
            "excluded_hospitals": excluded, "dataset": self.dataset_description, "seed": cfg.seed,
            # "run": a throw-away ledger, so every epsilon here was enforced within this run only.
            "ledger_scope": cfg.federation.ledger_scope,
            "ledger_folder": str(self.ledger_folder),
            # The running Ray cluster the simulation attached to; None: a local Ray of its own (or a deployment).
            "ray_address": cfg.federation.ray_address if cfg.federation.ray_address not in ("", "local") else None,
            "server_seconds": time.perf_counter() - self.started,
        }
        summary = self.summary(hospitals, stop_reason, excluded)
        rundir.write_result(self.run_dir, result, summary)
        return summary

    @property
    def ledger_folder(self) -> Path:
        """Where the simulated hospitals' ledgers are (a deployed hospital keeps its own elsewhere)."""
        return ledger_folder(self.config, self.run_dir)

    def ledger_lines(self, hospitals: list[HospitalState] = ()) -> tuple[str, str]:
        """The summary's bullet about the ledger and its closing sentence about what epsilon counts."""
        per = rundir.per_unit(run_unit(self.config, hospitals))
        if self.config.federation.ledger_scope == "run":
            return (f"- privacy ledger: THROW-AWAY (federation.ledger_scope=run), in {self.ledger_folder}: each "
                    "hospital's budget was enforced within this run only (and its resumptions); other uses of "
                    "its data are not counted",
                    f"Epsilon ({per}) is what this run spent on each hospital's data, at its delta: the budget was "
                    "enforced within this run only (a throw-away ledger), not over every use of the data.")
        return (f"- privacy ledger: persistent, in {self.ledger_folder} (simulated hospitals; a deployed hospital "
                "keeps its own where its node config says)",
                f"Epsilon ({per}) is cumulative over every use of each hospital's data (its ledger), at its delta.")

    def final_metrics_line(self, last: dict[str, float]) -> str:
        """The summary's headline metrics, or why there are none (an untrained model)."""
        if not self.rounds_trained:
            return "- final model: UNTRAINED: no hospital trained in any round; no test metric is reported"
        return (f"- final test AUC: {last.get('auc', math.nan):.4f}, accuracy: {last.get('accuracy', math.nan):.4f}, "
                f"sensitivity: {last.get('sensitivity', math.nan):.4f}, "
                f"specificity: {last.get('specificity', math.nan):.4f}")

    def summary(self, hospitals: list[HospitalState], stop_reason: str, excluded: dict[str, str] | None = None) -> str:
        cfg = self.config
        last = self.rounds[-1]["server"] if self.rounds else {}
        # Non-private runs charge the ledger too: their records' epsilon becomes infinity there.
        ledger_line, epsilon_sentence = self.ledger_lines(hospitals)
        lines = [
            "# fedpriv run summary", "",
            f"- data: {self.dataset_description}",
            f"- mode: {cfg.strategy.mode}, rounds run: {len(self.rounds)} of {cfg.strategy.num_rounds}",
            f"- stopped because: {stop_reason}",
            privacy_line(cfg, hospitals),
            *budget_lines(cfg, hospitals),
            ledger_line,
            *([f"- every hospital's records are spent in the persistent ledger {self.ledger_folder}. To run a "
               "throw-away experiment on public benchmark data instead, add federation.ledger_scope=run (its "
               "budget is then enforced within that run only)"]
              if cfg.federation.ledger_scope != "run" and hospitals and all(h.locked for h in hospitals) else []),
            *([f"- WARNING: {', '.join(h.name for h in hospitals if h.noise_seeded)} seeded their DP noise from a "
               "noise seed so that this experiment repeats exactly; anyone who knows that seed can regenerate the "
               "noise, so the guarantee does not hold against them"] if any(h.noise_seeded for h in hospitals) else []),
            *([f"- the run config asked for privacy.noise_seed={cfg.privacy.noise_seed}; no hospital used it "
               "(each drew fresh entropy)"] if cfg.privacy.noise_seed is not None and hospitals
              and not any(h.noise_seeded for h in hospitals) and self.rounds else []),
            self.final_metrics_line(last),
            device_line(hospitals, self.server_device),
        ]
        capped = any(math.isfinite(h.max_epsilon_per_round) or math.isfinite(h.max_epsilon_per_run) for h in hospitals)
        unit = run_unit(cfg, hospitals)
        counted = "records (unit)" if unit == rundir.MIXED_UNITS else f"{unit}s"
        lines += ["", f"| hospital | {counted} | epsilon spent {rundir.per_unit(unit)} | delta | budget | locked |"
                  + (" caps: round / run |" * capped),
                  "|---|---:|---:|---:|---:|---|" + ("---|" * capped)]
        for h in hospitals:
            spent = rundir.format_epsilon(h.epsilon, h.budget_epsilon)  # never rounded onto or past the budget
            if h.unreported_since is not None:  # it may have charged since, without being able to say so
                spent = f">= {spent} (no report since round {h.unreported_since}; its ledger holds the figure)"
            budget = "none" if math.isinf(h.budget_epsilon) else f"{h.budget_epsilon:g}"
            caps = f" {_cap(h.max_epsilon_per_round)} / {_cap(h.max_epsilon_per_run)} |" * capped
            records = f"{h.num_examples} ({h.unit})" if unit == rundir.MIXED_UNITS else str(h.num_examples)
            lines.append(f"| {h.name} | {records} | {spent} | {h.delta:g} | {budget} | "
                         f"{'yes' if h.locked else 'no'} |{caps}")
        if excluded:
            lines += ["", "Hospitals that refused to take part (nothing was trained or spent on their data):"]
            lines += [f"- {name}: {reason}" for name, reason in sorted(excluded.items())]
        lines += ["", epsilon_sentence,
                  "Hospital validation metrics are computed on private data and are not covered by the DP guarantee.",
                  ""]
        return "\n".join(lines)


def device_line(hospitals: list[HospitalState], server_device: str) -> str:
    """The summary's bullet on where training and evaluation ran, from what the hospitals reported."""
    by_device: dict[str, list[str]] = {}
    for h in hospitals:
        if h.device:
            by_device.setdefault(h.device, []).append(h.name)
    trained = "; ".join(f"{device} ({', '.join(names)})" for device, names in sorted(by_device.items()))
    return f"- device: hospitals trained on {trained or 'none reported'}; the server evaluated on {server_device}"


def untrained_reason(stop_reason: str) -> str:
    """One line on why a run's model is untrained (no hospital trained in any round)."""
    return (f"no hospital trained in any round ({stop_reason}): the model is the untrained initial one, and no "
            "test metric is reported for it")


def budget_lines(cfg: FedprivConfig, hospitals: list[HospitalState]) -> list[str]:
    """Say so where a hospital's own budget is not the one the run config asked for (deployment)."""
    if not cfg.privacy.enabled:
        return []
    asked = {h.name: h.epsilon for h in cfg.federation.hospitals if h.epsilon is not None}
    differ = [h for h in hospitals if math.isfinite(h.budget_epsilon)
              and not math.isclose(h.budget_epsilon, asked.get(h.name, cfg.privacy.epsilon), rel_tol=1e-9)]
    if not differ:
        return []
    return [f"- budgets are the hospitals' own, not the run config's privacy.epsilon={cfg.privacy.epsilon:g}: "
            + ", ".join(f"{h.name} {h.budget_epsilon:g}" for h in differ)]


def _cap(value: float) -> str:
    return "none" if math.isinf(value) else f"{value:g}"


def privacy_line(cfg: FedprivConfig, hospitals: list[HospitalState]) -> str:
    """The summary's privacy bullet, from what the hospitals reported (the run config only asks)."""
    if not cfg.privacy.enabled:
        return "- privacy: NONE: not private, epsilon = infinity"
    used = sorted({h.accountant for h in hospitals if h.accountant})
    line = f"- privacy: DP-SGD at every hospital, accountant {', '.join(used) or cfg.privacy.accountant}"
    if used and used != [cfg.privacy.accountant]:
        line += (f" (as the hospitals' own ledgers report; the run config asked for {cfg.privacy.accountant}, "
                 "which a hospital's existing ledger does not change)")
    unit = run_unit(cfg, hospitals)
    if unit == "patient":
        return line + "; epsilon per patient (user-level DP-SGD: all of a patient's images together)"
    if unit == rundir.MIXED_UNITS:
        by_unit = {u: ", ".join(h.name for h in hospitals if h.unit == u) for u in ("patient", "image")}
        return (line + f"; epsilon per patient at {by_unit['patient']} (user-level DP-SGD), per image at "
                f"{by_unit['image']} (a patient with k images protected only at about k x epsilon there)")
    return line + "; epsilon per image (a patient with k images is protected only at about k x epsilon)"



def run_unit(cfg: FedprivConfig, hospitals: list[HospitalState]) -> str:
    """What one record of the run's epsilons is, as the hospitals reported it (each hospital decides its
    own): "image", "patient", or "mixed". The run config's setting only where no hospital has replied,
    so a server config saying "patient" never relabels a per-image guarantee."""
    units = {h.unit for h in hospitals if h.unit}
    if not units:
        return cfg.privacy.unit
    return units.pop() if len(units) == 1 else rundir.MIXED_UNITS



@dataclass(frozen=True)
class Resumed:
    """Where a resumed run goes on from: its last checkpoint's weights, round and run id."""

    state_dict: dict[str, torch.Tensor]
    first_round: int  # the round after the checkpoint's
    run_id: str
    rounds_trained: int
    checkpoint: Path


def resume(cfg: FedprivConfig, model: torch.nn.Module) -> Resumed:
    """Load `resume=`'s last checkpoint into `model`; ConfigError, saying why, if it cannot be used."""
    checkpoint_path = resume_checkpoint(cfg)
    try:
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        # A checkpoint from before the count existed: its rounds are taken as trained (none is
        # declared untrained without evidence).
        return Resumed(checkpoint["state_dict"], checkpoint["round"] + 1, checkpoint["run_id"],
                       int(checkpoint.get("rounds_trained", checkpoint["round"])), checkpoint_path)
    except Exception as exc:  # truncated file, or weights of another model
        raise ConfigError("resume", cfg.resume, f"checkpoint {checkpoint_path.name} cannot be used "
                          f"({type(exc).__name__}: {str(exc)[:200]})",
                          "resume from an intact run directory of the same model, or start a new run") from None


def resume_checkpoint(cfg: FedprivConfig) -> Path:
    """The checkpoint `resume=` continues from; ConfigError if there is none or its run differs."""
    run_dir = Path(str(cfg.resume))
    checkpoint = rundir.latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError("resume", str(run_dir), "no checkpoint found in that run directory",
                          f"point resume= at a previous run directory holding {rundir.CHECKPOINTS}/round-*.pt")
    try:
        previous = to_config(rundir.read_config_yaml(run_dir))
    except Exception as exc:  # missing, unreadable or from another version: its settings are unknown
        raise ConfigError("resume", str(run_dir), f"its {rundir.CONFIG} cannot be read ({type(exc).__name__})",
                          f"resume only a run directory written by fedpriv, with its {rundir.CONFIG}") from None
    differences = [f"{key} was {then!r}, now {now!r}" for key in RESUME_MUST_MATCH
                   if (then := _setting(previous, key)) != (now := _setting(cfg, key))]
    if differences:
        raise ConfigError("resume", str(run_dir), "that run used other data or model settings ("
                          + "; ".join(differences) + ")",
                          f"resume with the settings in its {rundir.CONFIG}, or start a new run without resume=")
    return checkpoint


def _setting(cfg: FedprivConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return [asdict(item) for item in value] if isinstance(value, list) else value

