"""Patient-level DP (privacy.unit=patient): clipping per patient, accounting and enforcement per patient, splits.

The guarantee's neighbouring relation is add/remove ALL of one patient's images. These tests measure
the sensitivity to removing a whole patient, recompute each patient's epsilon from the ledger's raw
events independently (dp_accounting), refuse a spent patient's new image, and check that no split
puts one patient on both sides.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from independent_accounting import check_records
from torch import nn
from torch.utils.data import TensorDataset

from fedpriv import rundir
from fedpriv.app_config import compose_config
from fedpriv.data import LabeledImages
from fedpriv.data.imagefolder import load_image_folder
from fedpriv.data.partition import partition_indices
from fedpriv.data.splits import hold_out
from fedpriv.data.synthetic import make_synthetic
from fedpriv.errors import ConfigError, DataError, LedgerError, PrivacyError
from fedpriv.experiment import split_local_validation
from fedpriv.hospital import (
    REFUSED,
    TRAINED,
    HospitalSettings,
    RoundOutcome,
    RoundRequest,
    budget_state,
    train_round,
)
from fedpriv.outputs import RunRecorder
from fedpriv.privacy import PrivacyPlan
from fedpriv.privacy.ledger import PrivacyLedger, read_ledger
from fedpriv.privacy.records import record_keys
from fedpriv.protocol import outcome_fields, outcome_metrics
from fedpriv.roster import HospitalState
from fedpriv.training import train_local

FEATURES = 16


@pytest.fixture(autouse=True)
def _key_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(tmp_path / "keys"))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, 2))


def _change(model: nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[k] - v).flatten() for k, v in model.state_dict().items()])


# --- training: the clip is per patient ------------------------------------------------------------


def _marked_patient_data() -> tuple[TensorDataset, np.ndarray, TensorDataset, np.ndarray]:
    """Patient "A": 5 identical large images and one marked one, all mislabelled (their gradients are
    far above the clip); patients "B" and "C": ordinary images. Returns the data with A and without."""
    generator = torch.Generator().manual_seed(3)
    same = torch.randn(1, 1, 1, FEATURES, generator=generator) * 100
    marked = same.clone()
    marked[..., 0] += 300.0
    patient_a = torch.cat([same.repeat(5, 1, 1, 1), marked])
    others = torch.randn(6, 1, 1, FEATURES, generator=generator)
    label_a = 1 - _model()(same).argmax(dim=1)
    labels_a = label_a.repeat(6)
    labels_others = (others.flatten(1).sum(1) > 0).long()
    with_a = TensorDataset(torch.cat([patient_a, others]), torch.cat([labels_a, labels_others]))
    groups_with = np.array(["A"] * 6 + ["B"] * 3 + ["C"] * 3)
    without_a = TensorDataset(others, labels_others)
    return with_a, groups_with, without_a, groups_with[6:]


@pytest.mark.parametrize("max_images", [None, 2])
@pytest.mark.parametrize("clip", [0.1, 1.0])
def test_removing_a_whole_patient_changes_the_update_by_at_most_the_per_patient_clip(clip, max_images):
    model = _model()
    with_a, groups_with, without_a, groups_without = _marked_patient_data()
    # q = 1 and no noise: every patient is drawn, so the noisy sums differ by exactly patient A's part.
    plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=clip)
    update_with = train_local(model, with_a, plan, lr=1.0, groups=groups_with, max_images_per_group=max_images)
    update_without = train_local(model, without_a, plan, lr=1.0, groups=groups_without,
                                 max_images_per_group=max_images)
    # The update is the noisy sum divided by the (public) expected number of patients: 3 and 2.
    sensitivity = (_change(model, update_with.state_dict) * 3 - _change(model, update_without.state_dict) * 2).norm()
    assert sensitivity.item() <= clip * (1 + 1e-4)
    assert sensitivity.item() == pytest.approx(clip, rel=1e-3)  # A's raw gradient was far larger: the clip acted
    # Image-level DP-SGD on the same data clips each of A's six images on its own: removing A then
    # moves the sum by about six clips, which is why a k-image patient gets only about k x epsilon.
    image_plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=clip)
    image_with = train_local(model, with_a, image_plan, lr=1.0)
    image_without = train_local(model, without_a, image_plan, lr=1.0)
    image_sensitivity = (_change(model, image_with.state_dict) * 12 - _change(model, image_without.state_dict) * 6)
    assert image_sensitivity.norm().item() > 5 * clip


def test_patient_level_noise_is_calibrated_to_the_per_patient_clip_over_the_expected_patients():
    # All-zero inputs give the weights a zero gradient: their update is noise of std sigma * C / patients.
    features, sigma, clip = 4096, 2.0, 0.5
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, 2))
    data = TensorDataset(torch.zeros(12, 1, 1, features), torch.zeros(12, dtype=torch.long))
    groups = np.repeat(np.arange(4), 3)  # 4 patients of 3 images
    plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=sigma, max_grad_norm=clip)
    result = train_local(model, data, plan, lr=1.0, groups=groups)
    noise = result.state_dict["1.weight"] - model.state_dict()["1.weight"]
    assert noise.std().item() == pytest.approx(sigma * clip / 4, rel=0.05)
    assert result.events[0].sample_rate == 1.0 and result.steps == 1


def test_patient_level_training_needs_per_sample_gradients_and_one_id_per_image():
    model, data = _model(), TensorDataset(torch.randn(4, 1, 1, FEATURES), torch.zeros(4, dtype=torch.long))
    ghost = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")
    with pytest.raises(PrivacyError, match="per-sample gradients"):
        train_local(model, data, ghost, lr=1.0, groups=np.arange(4))
    plan = PrivacyPlan(steps=1, sample_rate=1.0, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(PrivacyError, match="3 patient ids for 4 images"):
        train_local(model, data, plan, lr=1.0, groups=np.arange(3))


# --- the ledger accounts and enforces per patient -------------------------------------------------


def _patients(count: int, images: int, seed: int = 0, prefix: str = "P") -> LabeledImages:
    x = torch.randn(count * images, 1, 1, FEATURES, generator=torch.Generator().manual_seed(seed))
    patients = np.repeat([f"{prefix}{i:03d}" for i in range(count)], images)
    return LabeledImages(x, (x.flatten(1).sum(1) > 0).long(), patient_ids=patients)


def _settings(tmp_path, budget: float = 1.0, **kwargs) -> HospitalSettings:
    return HospitalSettings("A", budget, 1e-5, tmp_path / "ledger.db", accountant="rdp", unit="patient", **kwargs)


def _request(**kwargs) -> RoundRequest:
    return RoundRequest(**{"run_id": "run-1", "server_round": 1, "num_rounds": 2, "batch_size": 8, "lr": 0.1,
                           **kwargs})


def test_each_patient_is_one_ledger_record_and_its_epsilon_matches_an_independent_accountant(tmp_path):
    settings = _settings(tmp_path, budget=2.0, max_images_per_patient=2)
    records = _patients(40, 3)  # 40 patients of 3 images: the round samples patients at 8 / 40
    for server_round in (1, 2):
        outcome = train_round(_model(), records, settings, _request(server_round=server_round))
        assert outcome.status == TRAINED and outcome.unit == "patient" and outcome.metrics()["per-patient"] == 1
        assert outcome.records == 40 and outcome.num_examples == 40  # patients, not the 120 images
    with read_ledger(settings.ledger_path) as ledger:
        events = ledger.events()  # reading the chain tells the ledger's settings, its unit among them
        assert ledger.unit == "patient"
        assert [e.set_size for e in events] == [40, 40]
        assert all(e.sample_rate == pytest.approx(8 / 40) for e in events)
        patients = np.unique(records.patient_ids)
        spent = check_records(ledger, patients, 2.0)  # dp_accounting (RDP) within 3%, and within the budget
        assert spent.max() == pytest.approx(2.0, rel=0.02)
        # The ledger's record IS the patient: there is no per-image record.
        assert ledger.status().records == 40


def test_a_spent_patients_new_image_is_refused_and_other_patients_still_train(tmp_path):
    settings = _settings(tmp_path, budget=1.0)
    records = _patients(30, 2)
    request = _request(num_rounds=1)
    assert train_round(_model(), records, settings, request).status == TRAINED
    state = budget_state(settings, records)
    assert state.locked and state.exhausted == 30  # every patient spent the whole budget in one planned round
    # The hospital receives a new scan of patient P007 and 20 new patients (two scans each).
    new_scan = _patients(1, 1, seed=9)
    new_scan.patient_ids = np.array(["P007"])
    newcomers = _patients(20, 2, seed=5, prefix="N")
    grown = LabeledImages(torch.cat([records.images, new_scan.images, newcomers.images]),
                          torch.cat([records.labels, new_scan.labels, newcomers.labels]),
                          patient_ids=np.concatenate([records.patient_ids, new_scan.patient_ids,
                                                      newcomers.patient_ids]))
    outcome = train_round(_model(), grown, settings, _request(run_id="run-2", num_rounds=1))
    assert outcome.status == TRAINED and outcome.num_examples == 20  # the 20 new patients only
    with read_ledger(settings.ledger_path) as ledger:
        last = ledger.events()[-1]
        history, epsilon, exhausted, _ = ledger.record_history("P007")
        assert exhausted and last.id not in [e.id for e in history]  # P007's new scan did not train
        assert len(history) == 1 and epsilon == pytest.approx(1.0, rel=0.02)
    # And a hospital holding only spent patients (new scans included) refuses, charging nothing.
    only_spent = LabeledImages(torch.cat([records.images, new_scan.images]),
                               torch.cat([records.labels, new_scan.labels]),
                               patient_ids=np.concatenate([records.patient_ids, new_scan.patient_ids]))
    refused = train_round(_model(), only_spent, settings, _request(run_id="run-3", num_rounds=1))
    assert refused.status != TRAINED and refused.locked


def test_a_ledger_records_its_unit_and_refuses_another(tmp_path):
    path = tmp_path / "ledger.db"
    with PrivacyLedger.open(path, budget_epsilon=3.0, delta=1e-5, unit="patient") as ledger:
        assert ledger.unit == "patient" and ledger.status().unit == "patient"
    with pytest.raises(LedgerError, match="accounts per patient.*privacy.unit=image"):
        PrivacyLedger.open(path, budget_epsilon=3.0, delta=1e-5)
    image_path = tmp_path / "images.db"
    PrivacyLedger.open(image_path, budget_epsilon=3.0, delta=1e-5).close()
    with pytest.raises(LedgerError, match="accounts per image"):
        PrivacyLedger.open(image_path, budget_epsilon=3.0, delta=1e-5, unit="patient")
    with pytest.raises(PrivacyError, match="privacy unit"):
        PrivacyLedger.open(tmp_path / "other.db", budget_epsilon=3.0, delta=1e-5, unit="visit")
    with read_ledger(path) as ledger:
        assert ledger.verify().ok and ledger.events() == [] and ledger.unit == "patient"  # verify() read the chain


def test_patient_level_privacy_on_data_without_patient_ids_names_the_fix(tmp_path):
    images = LabeledImages(torch.randn(20, 1, 1, FEATURES), torch.zeros(20, dtype=torch.long))
    with pytest.raises(DataError, match="no patient ids.*patient_id.*privacy.unit=image"):
        train_round(_model(), images, _settings(tmp_path), _request())
    assert not (tmp_path / "ledger.db").exists()  # refused before the ledger was touched


# --- splits never put one patient on both sides --------------------------------------------------


def _sides(parts: list[np.ndarray], patients: np.ndarray) -> None:
    """Every index once, and every patient on one side only."""
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == list(range(len(patients)))
    owners = [set(patients[p].tolist()) for p in parts]
    for i, first in enumerate(owners):
        for second in owners[i + 1:]:
            assert not first & second


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_the_partition_gives_each_patient_to_one_hospital(scheme):
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), rng.integers(1, 6, 60)).astype(str)
    labels = (np.unique(patients, return_inverse=True)[1] % 2)[...]
    parts = partition_indices(labels, 4, scheme, alpha=0.5, seed=1, groups=patients)
    _sides(parts, patients)
    assert all(len(p) for p in parts)


@pytest.mark.parametrize(("scheme", "shares", "alpha", "expected"), [
    ("iid", None, 0.5, "the training split has 4 patients, too few for 5 hospitals"),
    ("iid", [1.0, 1.0, 8.0], 0.5, "would receive 0 of 4 patients"),
    ("dirichlet", None, 0.001, "received 0 patients (needs at least 1)"),
])
def test_a_partition_of_patients_that_cannot_work_speaks_of_patients(scheme, shares, alpha, expected):
    """Twenty images of four patients: the sizes that matter (and the errors) count patients, not images."""
    patients = np.repeat(["p1", "p2", "p3", "p4"], 5)
    hospitals = 5 if shares is None and scheme == "iid" else 3
    with pytest.raises(ConfigError) as error:
        partition_indices(np.arange(20) % 2, hospitals, scheme, alpha=alpha, shares=shares, groups=patients)
    assert expected in str(error.value) and "records" not in str(error.value)


def test_validation_splits_hold_out_whole_patients():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(50), rng.integers(1, 8, 50)).astype(str)
    kept, held = hold_out(np.arange(len(patients)), 0.2, np.random.default_rng(0), patients)
    _sides([kept, held], patients)
    assert 0 < len(held) <= int(0.2 * len(patients))
    parts = partition_indices(np.zeros(len(patients), dtype=int), 3, "iid", seed=0, groups=patients)
    training, validation = split_local_validation(parts, 0.25, seed=0, patient_ids=patients)
    for train, val in zip(training, validation):
        assert len(val) and not set(patients[train]) & set(patients[val])
    # Without patient ids the split is the one it always was.
    plain_training, plain_validation = split_local_validation(parts, 0.25, seed=0)
    for part, index, train, val in zip(parts, range(3), plain_training, plain_validation):
        shuffled = np.random.default_rng([0, index]).permutation(part)
        assert val.tolist() == sorted(shuffled[:int(0.25 * len(part))].tolist())


def test_synthetic_patients_share_label_and_stay_in_one_split():
    dataset = make_synthetic(200, 8, 0, 0.1, 0.2, images_per_patient=4)
    splits = [dataset.train, dataset.val, dataset.test]
    assert sum(len(s) for s in splits) == 200
    owners = [set(s.patient_ids.tolist()) for s in splits]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    for split in splits:
        _, index = split.patients()
        assert np.bincount(index).max() <= 4
        for patient in range(index.max() + 1):
            assert len(set(split.labels[index == patient].tolist())) == 1
    # Without the knob, the dataset is exactly the one it always was (no patient ids).
    plain = make_synthetic(200, 8, 0, 0.1, 0.2)
    assert plain.train.patient_ids is None
    with pytest.raises(DataError, match="no patient ids"):
        plain.train.patients()


def test_an_image_folder_reads_patient_ids_from_its_attributes_csv(tmp_path):
    from PIL import Image

    rows = []
    for label in ("normal", "pneumonia"):
        (tmp_path / label).mkdir()
        for i in range(12):
            pixels = np.full((8, 8), (i * 20 + (label == "pneumonia") * 7) % 256, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
            rows.append({"path": f"{label}/{i}.png", "sex": "F", "patient_id": f"{label}-{i // 3}"})
    with (tmp_path / "attributes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "sex", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    dataset = load_image_folder(str(tmp_path), 8, attributes_csv="attributes.csv", val_fraction=0.25,
                                test_fraction=0.25)
    splits = [dataset.train, dataset.val, dataset.test]
    owners = [set(s.patient_ids.tolist()) for s in splits]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert all("patient_id" not in row and row["sex"] == "F" for s in splits for row in s.attributes)
    # A patient_id column with a blank cell: every image needs one.
    rows[3]["patient_id"] = " "
    with (tmp_path / "attributes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "sex", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match="1 of 24 images have no patient id"):
        load_image_folder(str(tmp_path), 8, attributes_csv="attributes.csv")


def test_an_npz_file_can_carry_patient_ids(tmp_path):
    from fedpriv.data.medmnist import load_medmnist

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    arrays["train_patient_ids"] = np.array([f"p{i // 2}" for i in range(12)])
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    dataset = load_medmnist("pneumoniamnist", 28, str(tmp_path), False)
    assert dataset.train.patients()[0].tolist() == [f"p{i}" for i in range(6)]
    assert dataset.val.patient_ids is None
    assert math.isfinite(float(record_keys(dataset.train.unit_ids("patient"))[0]))


# --- a whole federation, per patient --------------------------------------------------------------


@pytest.mark.slow
def test_a_patient_level_federation_charges_patients_and_says_so_everywhere(tmp_path):
    from test_federation import federate, ledger_of

    from fedpriv import rundir

    strategy, _, run_dir = federate(tmp_path, "dataset.images_per_patient=4", "privacy.unit=patient",
                                    "train.batch_size=8")
    assert all(h.epsilon == pytest.approx(3.0, rel=0.02) for h in strategy.hospitals)
    result = rundir.read_result(run_dir)
    assert result["privacy_unit"] == "patient" and result["rounds_trained"] == 2
    summary = rundir.read_summary(run_dir)
    assert "epsilon per patient" in summary and "epsilon spent per patient" in summary
    report = (run_dir / rundir.REPORT_MD).read_text()
    assert "patient-level (epsilon, delta)-DP" in report and " per patient (budgets:" in report
    with read_ledger(ledger_of(run_dir)) as ledger:
        events = ledger.events()
        assert ledger.unit == "patient" and {e.hospital for e in events} == {"hospital-1", "hospital-2", "hospital-3"}
        patients = np.unique(np.concatenate([make_synthetic(240, 28, 0, 0.1, 0.2, images_per_patient=4)
                                             .train.patient_ids]))
        check_records(ledger, patients, 3.0)
    # The same data per image on the same (per-patient) ledger is refused by every hospital, naming why.
    again, _, again_dir = federate(tmp_path, "dataset.images_per_patient=4", run="again")
    assert again.history == [] and rundir.read_result(again_dir)["rounds_trained"] == 0


def test_a_deployed_hospital_chooses_its_unit_in_its_node_config(tmp_path):
    from fedpriv.deployment.node import hospital_settings, parse_node_config

    (tmp_path / "ledger").mkdir()
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"")
    config = {"name": "St-Elsewhere", "data": str(tmp_path / "pneumoniamnist.npz"), "budget-epsilon": 2.5,
              "delta": 1e-5, "ledger": str(tmp_path / "ledger" / "ledger.db")}
    assert hospital_settings(parse_node_config(config)).unit == "image"
    settings = hospital_settings(parse_node_config({**config, "privacy-unit": "patient",
                                                    "max-images-per-patient": "3"}))
    assert (settings.unit, settings.max_images_per_patient) == ("patient", 3)
    with pytest.raises(ConfigError, match="privacy-unit"):
        parse_node_config({**config, "privacy-unit": "visit"})


# --- the unit shown is the one the hospitals report, never the run config's ------------------------

def _reported(name: str, unit: str) -> HospitalState:
    state = HospitalState(node_id=len(name), name=name)
    outcome = RoundOutcome(name, TRAINED, "", num_examples=40, epsilon=1.5, delta=1e-5, budget_epsilon=3.0,
                           chain_length=4, unit=unit)
    state.update(outcome_metrics(outcome), TRAINED, outcome_fields(outcome))
    return state


@pytest.mark.parametrize("asked", ["image", "patient"])
def test_the_summary_and_result_say_the_unit_the_hospitals_report(tmp_path, asked):
    cfg = compose_config(["dataset=synthetic", f"privacy.unit={asked}"])
    recorder = RunRecorder(tmp_path, cfg, "run-1", "SYNTHETIC")
    per_image = [_reported("A", "image"), _reported("B", "image")]
    summary = recorder.finish({}, per_image, "completed all 1 rounds")
    result = rundir.read_result(tmp_path)
    assert result["privacy_unit"] == "image" and {h["unit"] for h in result["hospitals"]} == {"image"}
    assert "epsilon per image" in summary and "epsilon spent per image" in summary
    assert "per patient" not in summary  # a server config saying "patient" never relabels a per-image guarantee

    mixed = [_reported("A", "patient"), _reported("B", "image")]
    summary = recorder.finish({}, mixed, "completed all 1 rounds")
    assert rundir.read_result(tmp_path)["privacy_unit"] == "mixed"
    assert "epsilon per patient at A (user-level DP-SGD), per image at B" in summary
    assert "| A | 40 (patient) |" in summary and "| B | 40 (image) |" in summary
