"""What a finished simulated run left in its privacy ledger, hospital by hospital (used by reliability.py, scale.py).

Simulated hospitals share one ledger per data source (`fedpriv.site.simulation_ledger_path`); each
hospital's events carry its name, and its records are `prepare_experiment(cfg).hospital_data(i).ids()`.
The run's own config.yaml says where the ledger is; with `federation.ledger_scope=run` (what the
benchmarks use, so that a benchmark never spends a persistent budget) the key lies beside it, in
`ledgers/keys/`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from fedpriv.config import FedprivConfig, to_config
from fedpriv.experiment import prepare_experiment
from fedpriv.privacy.ledger import read_ledger
from fedpriv.site import simulation_ledger_path


def saved_config(run_dir: Path) -> FedprivConfig:
    raw = OmegaConf.load(run_dir / "config.yaml")
    return to_config(OmegaConf.merge(OmegaConf.structured(FedprivConfig), raw))


def ledger_key(cfg: FedprivConfig, ledger: Path) -> Path | None:
    """Where a simulated run's ledger key is (as fedpriv.site puts it); None: the default key folder."""
    return ledger.parent / "keys" / f"{ledger.stem}.key" if cfg.federation.ledger_scope == "run" else None


def run_ledgers(run_dir: Path) -> dict:
    """Verify the run's shared ledger and read each hospital's spend from it (by its records and name)."""
    cfg = saved_config(run_dir)
    experiment = prepare_experiment(cfg)
    path = simulation_ledger_path(cfg, run_dir)
    ledgers = sorted(path.parent.glob("*.db"))
    hospitals = {}
    with read_ledger(path, key_path=ledger_key(cfg, path)) as ledger:
        report = ledger.verify()
        events = ledger.events()
        for index, hospital in enumerate(experiment.hospitals):
            status = ledger.status(experiment.hospital_data(index).ids(), budget=hospital.epsilon)
            own = [e for e in events if e.hospital == hospital.name]
            hospitals[hospital.name] = {
                "budget": hospital.epsilon, "epsilon": status.epsilon_spent, "records": status.records,
                "exhausted": status.exhausted, "events": len(own),
                "unconfirmed": sum(not e.confirmed for e in own),
            }
    return {"path": str(path), "ledger_files": len(ledgers), "verified": report.ok, "problems": report.problems,
            "entries": report.entries, "events": report.events, "bytes": path.stat().st_size,
            "hospitals": hospitals}
