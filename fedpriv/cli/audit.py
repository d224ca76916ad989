"""`fedpriv-audit`: attack a configuration and compare what the attacks achieve with what epsilon promises.

Same Hydra config groups as `fedpriv`; the `audit.*` keys tune the attacks. Writes `audit.json`,
`audit.md` and the figures into the Hydra run directory. Exit codes: 0 when every attack stayed
under its privacy ceiling, 2 on bad input (one line on stderr, as `fedpriv`), 3 when an attack beat
the ceiling, which means the privacy accounting or the training is wrong.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedpriv import rundir
from fedpriv.app_config import CONFIG_NAME, config_dir
from fedpriv.attacks.audit import run_audit
from fedpriv.cli.main import EXIT_BAD_INPUT
from fedpriv.config import register_configs, to_config
from fedpriv.errors import FedprivError
from fedpriv.experiment import absolute_paths

log = logging.getLogger("fedpriv.audit")

EXIT_CEILING_EXCEEDED = 3


def run(cfg: DictConfig, run_dir: Path) -> int:
    """Run the audit on the composed config; return the exit code."""
    config = absolute_paths(to_config(cfg))
    torch.set_num_threads(config.audit.threads)
    with warnings.catch_warnings():
        # Opacus's hooks on a first layer whose input needs no gradient: harmless, and once per model.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        report = run_audit(config, run_dir)
    log.info("Audit finished in %.0f s; report in %s", report.seconds, run_dir / rundir.AUDIT_MD)
    if report.ok:
        log.info("PASS: no attack beat the ceiling that the spent epsilon allows")
        return 0
    message = "; ".join(f"{label} {check.attack} attack at FPR {check.fpr_level:g}"
                        for label, check in report.violations)
    log.error("BOUND VIOLATED: %s", message)
    print(f"fedpriv-audit: BOUND VIOLATED: an attack beat the differential-privacy ceiling ({message}). "
          f"The privacy accounting or the training is wrong; see {run_dir / rundir.AUDIT_MD}", file=sys.stderr)
    return EXIT_CEILING_EXCEEDED


@hydra.main(version_base="1.3", config_path=config_dir(), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        code = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FedprivError as error:
        print(f"fedpriv-audit: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    if code:
        raise SystemExit(code)


def main() -> None:
    """Console-script entry point (`fedpriv-audit`)."""
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
