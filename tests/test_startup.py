"""Start-up weight: every simulated run imports fedpriv in four processes before its first round
(the CLI, the ServerApp, two Ray workers), so heavy libraries are imported only where they are used."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.processes  # starts real processes; each test stops what it started

# Opacus (~1.4 s) and torchvision's model zoo (~1.5 s): see BENCHMARKS.md, federation overhead.
HEAVY = ("opacus", "torchvision")


@pytest.mark.parametrize("module", ["fedpriv.cli.main", "fedpriv.server_app", "fedpriv.client_app",
                                    "fedpriv.cli.ledger"])
def test_entry_points_do_not_import_heavy_libraries(module):
    probe = (f"import sys, {module}; "
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"importing {module} also imports {loaded}"


def test_a_hospital_process_imports_neither_scikit_learn_nor_scipy_until_it_evaluates():
    # Deployed, every message starts a fresh ClientApp process: training and queries skip both.
    probe = "import sys, fedpriv.client_app; print(' '.join(m for m in ('sklearn', 'scipy') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_private_training_and_resnet_still_load_them_on_demand():
    probe = ("import sys; from fedpriv.models import build_model; "
             "from fedpriv.privacy.accounting import PrivacyEvent, epsilon; "
             "build_model('resnet18', in_channels=1, num_classes=2, image_size=28); "
             "value = epsilon([PrivacyEvent(1.0, 0.01, 100)], 1e-5); "
             "print(value, ' '.join(m for m in ('opacus', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert 0 < float(out[0]) < 10
    assert out[1:] == ["opacus", "torchvision"]


def test_checking_a_config_reads_medmnists_table_without_importing_the_medmnist_package():
    # `import medmnist` runs its __init__ (scikit-learn, torchvision, PIL): the CLI, the ServerApp and
    # every hospital check the dataset name against the table, and only a download needs the package.
    probe = ("import sys; from fedpriv.app_config import compose_config; from fedpriv.config import validate_config; "
             "from fedpriv.data.medmnist import medmnist_info; validate_config(compose_config([])); "
             "table = medmnist_info(); loaded = [m for m in ('medmnist', 'sklearn') if m in sys.modules]; "
             "import medmnist; print(table == medmnist.INFO, 'pneumoniamnist' in table, *loaded)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]  # the same table as the package's, and neither package imported for it
