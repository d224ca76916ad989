"""Shared test set-up: no test may touch the user's real privacy ledgers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

LEDGER_DIR_ENV = "FEDPRIV_LEDGER_DIR"  # fedpriv.experiment.LEDGER_DIR_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_ledger_env_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """FEDPRIV_LEDGER_DIR for module- and session-scoped fixtures, which run before any per-test fixture."""
    folder = tmp_path_factory.mktemp("fedpriv-ledgers-shared") / "ledgers"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LEDGER_DIR_ENV, str(folder))
        yield folder


@pytest.fixture(autouse=True)
def ledger_env_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FEDPRIV_LEDGER_DIR at a fresh folder for every test.

    Persistent ledgers (federation.ledger_scope=persistent, the default) live there instead of in the
    user's data folder; `fedpriv` and Flower subprocesses inherit the variable. A test that needs the
    folder (e.g. to find a default run's ledgers) asks for this fixture by name. fedpriv creates the
    folder itself when it first checks it.
    """
    folder = tmp_path_factory.mktemp("fedpriv-ledgers") / "ledgers"
    monkeypatch.setenv(LEDGER_DIR_ENV, str(folder))
    return folder


KEY_DIR_ENV = "FEDPRIV_KEY_DIR"  # fedpriv.privacy.chain.KEY_DIR_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Ledger keys and witnesses of every test live in a temporary folder, never the user's config.

    One folder for the session: keys are named by their ledger's path, and every test's ledgers have
    paths of their own, so module-scoped fixtures and the tests reading their ledgers find the same key.
    """
    folder = tmp_path_factory.mktemp("fedpriv-keys-shared") / "keys"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_DIR_ENV, str(folder))
        yield folder
