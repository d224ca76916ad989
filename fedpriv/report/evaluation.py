"""The final model of a run: loading it (with its temperature), and evaluating it once for the report.

:func:`evaluate_final_model` runs the model over the server's two splits, once each. It fits the
temperature on the public calibration split (the dataset's official validation split, which the
server holds) and measures calibration and subgroup metrics on the held-out test split. It writes
``calibration.json`` and ``subgroups.json`` into the run directory, so later reports and
``fedpriv-predict`` just read them. No hospital's private data is touched.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpriv import data as datasets
from fedpriv import rundir
from fedpriv.config import FedprivConfig
from fedpriv.data import MedicalImageDataset
from fedpriv.data.medmnist import medmnist_info
from fedpriv.data.synthetic import CLASS_NAMES
from fedpriv.errors import RunFilesError
from fedpriv.models import build_model
from fedpriv.report.calibration import CalibrationReport, calibrate, softmax
from fedpriv.report.fairness import SubgroupFairness, subgroup_fairness
from fedpriv.rundir import number
from fedpriv.scatnet import scattering_maps

log = logging.getLogger(__name__)


def calibration_split(images: int) -> str:
    """How the report names the split the temperature is fitted on."""
    return f"the server's public calibration split (the dataset's official validation split, {images} images)"


@dataclass(frozen=True)
class ModelInfo:
    """What is needed to rebuild the network and name its outputs."""

    name: str
    width: int
    in_channels: int
    num_classes: int
    image_size: int
    class_names: list[str]
    activation: str = "tanh"
    scale: int | None = None  # scatnet's front end (fedpriv.scatnet)
    orientations: int = 8
    order: int = 2

    def build(self) -> nn.Module:
        return build_model(self.name, in_channels=self.in_channels, num_classes=self.num_classes,
                           image_size=self.image_size, width=self.width, activation=self.activation,
                           scale=self.scale, orientations=self.orientations, order=self.order)


@dataclass
class RunModel:
    """A loaded model with the temperature that calibrates it (1.0 and a reason when there is none)."""

    model: nn.Module
    info: ModelInfo
    path: Path
    temperature: float = 1.0
    uncalibrated_reason: str = ""
    untrusted: list[str] = field(default_factory=list)  # why no prediction may be trusted (synthetic, untrained)

    def probabilities(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated, raw) class probabilities of normalised ``(N, C, H, W)`` images."""
        logits = predict_logits(self.model, images)
        return softmax(logits, self.temperature), softmax(logits)


# ------------------------------------------------------------------------------ reading run files


def resolve_model(path: str | Path) -> tuple[Path, Path]:
    """(model file, run directory) for a run directory or a model/checkpoint file inside one."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / rundir.MODEL
    if not path.is_file():
        raise RunFilesError(f"model not found: {path} (give a run directory or its {rundir.MODEL})")
    for folder in (path.parent, path.parent.parent):  # model.pt, or checkpoints/round-NNN.pt
        if (folder / rundir.CONFIG).is_file():
            return path, folder
    raise RunFilesError(f"no {rundir.CONFIG} next to {path}: the model's architecture is unknown")


def load_state(model_file: Path) -> dict[str, torch.Tensor]:
    """A state_dict from model.pt (a plain state_dict) or from a round checkpoint."""
    try:
        loaded = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise RunFilesError(f"cannot load {model_file}: {type(exc).__name__}: {exc}") from exc
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunFilesError(f"{model_file} holds no model weights (state_dict)")
    return state


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the model and its T


def model_info(cfg: FedprivConfig, state: dict[str, torch.Tensor], class_names: list[str] | None = None) -> ModelInfo:
    """The architecture from the config, the input channels and classes from the weights themselves."""
    convolutions = [v for v in state.values() if v.ndim == 4]
    linear = [v for v in state.values() if v.ndim == 2]
    if not convolutions or not linear:
        raise RunFilesError("the weights hold no convolution or no linear layer: not a fedpriv model")
    num_classes = int(linear[-1].shape[0])
    names = class_names or _class_names(cfg, num_classes)
    in_channels = int(convolutions[0].shape[1])
    if cfg.model.name == "scatnet":  # its first convolution sees K scattering maps per image channel
        in_channels //= scattering_maps(cfg.model.scale, cfg.model.orientations, cfg.model.order, cfg.dataset.size)
    return ModelInfo(cfg.model.name, cfg.model.width, in_channels, num_classes, cfg.dataset.size, list(names),
                     cfg.model.activation, cfg.model.scale, cfg.model.orientations, cfg.model.order)


def _class_names(cfg: FedprivConfig, num_classes: int) -> list[str]:
    """Class names without loading the data: MedMNIST's table, the synthetic names, or the folder's."""
    names: list[str] = []
    if cfg.dataset.name == "synthetic":
        names = list(CLASS_NAMES)
    elif cfg.dataset.name == "imagefolder" and cfg.dataset.path and Path(cfg.dataset.path).is_dir():
        names = sorted(d.name for d in Path(cfg.dataset.path).iterdir() if d.is_dir() and not d.name.startswith("."))
    elif cfg.dataset.name != "imagefolder":
        labels = medmnist_info().get(cfg.dataset.name, {}).get("label", {})
        names = [labels[k] for k in sorted(labels, key=int)]
    return names if len(names) == num_classes else [f"class {i}" for i in range(num_classes)]


def load_run_model(path: str | Path) -> RunModel:
    """The model in a run directory (or a model file inside one) with its fitted temperature.

    The temperature comes from calibration.json only if that file was written for these very
    weights (its SHA-256 matches); otherwise T = 1 and ``uncalibrated_reason`` says why.
    """
    model_file, run_dir = resolve_model(path)
    cfg = rundir.read_config(run_dir)
    state = load_state(model_file)
    calibration_path = run_dir / rundir.CALIBRATION
    saved = rundir.read_optional_json(calibration_path)
    names = (saved or {}).get("model", {}).get("class_names")
    info = model_info(cfg, state, names)
    model = info.build()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunFilesError(f"{model_file} does not fit the {info.name} model of {run_dir / rundir.CONFIG}: "
                            f"{str(exc).splitlines()[0]}") from exc
    loaded = RunModel(model.eval(), info, model_file, untrusted=untrusted_reasons(cfg, model_file, run_dir))
    if saved is None:
        loaded.uncalibrated_reason = f"no {rundir.CALIBRATION} in {run_dir} (run fedpriv-report {run_dir} to fit one)"
    elif saved.get("model_sha256") != file_sha256(model_file):
        loaded.uncalibrated_reason = f"{calibration_path} was fitted for other weights than {model_file}"
    else:
        loaded.temperature = float(saved["temperature"])
        if saved.get("applied") is False:  # the fitted T made calibration worse: the model's own probabilities
            loaded.uncalibrated_reason = (f"the fitted temperature {number(saved.get('fitted_temperature')):.3g} "
                                          f"{saved.get('decision', 'was not applied')}")
    return loaded


def untrusted_reasons(cfg: FedprivConfig, model_file: Path, run_dir: Path) -> list[str]:
    """Why a model's predictions must not be trusted at all: synthetic training data, or no training.

    Whether it trained comes from the model file itself (a round checkpoint counts its rounds
    trained) or, for model.pt, from result.json; a file from before that count says nothing.
    """
    reasons = []
    if cfg.dataset.name == "synthetic":
        reasons.append("trained on SYNTHETIC data")
    if model_file.name == rundir.MODEL:
        trained = (rundir.read_result(run_dir) or {}).get("rounds_trained")
    else:
        saved = torch.load(model_file, map_location="cpu", weights_only=True)
        trained = saved.get("rounds_trained") if isinstance(saved, dict) else None
    if trained == 0:
        reasons.append("UNTRAINED (no hospital trained in any round)")
    return reasons


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Logits ``(N, classes)`` of normalised ``(N, C, H, W)`` images, in evaluation mode on the CPU."""
    model = model.to("cpu").eval()
    chunks = [model(images[start:start + batch_size]).double().numpy() for start in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


# --------------------------------------------------------------------------- the final evaluation


def evaluate_final_model(run_dir: str | Path, dataset: MedicalImageDataset | None = None) -> tuple[CalibrationReport,
                                                                                                   SubgroupFairness]:
    """Calibrate the run's model.pt and measure its subgroups; writes calibration.json and subgroups.json.

    ``dataset`` is the run's data if the caller already holds it (the ServerApp does); otherwise it
    is loaded from config.yaml.
    """
    run_dir = Path(run_dir)
    cfg = rundir.read_config(run_dir)
    if dataset is None:
        dataset = datasets.load_dataset(cfg.dataset, cfg.seed)  # looked up at call time: tests stand in for it
    model_file = run_dir / rundir.MODEL
    if not model_file.is_file():
        raise RunFilesError(f"{model_file} not found: the run has not finished")
    state = load_state(model_file)
    info = model_info(cfg, state, dataset.class_names)
    model = info.build()
    model.load_state_dict(state)
    val_logits, test_logits = (predict_logits(model, split.images) for split in (dataset.val, dataset.test))
    calibration = calibrate(
        val_logits, dataset.val.labels.numpy(), test_logits, dataset.test.labels.numpy(),
        fitted_on=calibration_split(len(dataset.val)),
        evaluated_on=f"the held-out test split, {len(dataset.test)} images",
    )
    subgroups = subgroup_fairness(softmax(test_logits), dataset.test.labels.numpy(), dataset.test.attributes,
                                  dataset.class_names, evaluated_on=calibration.evaluated_on,
                                  dataset_name=dataset.name)
    for name, data in ((rundir.CALIBRATION, {**calibration.to_dict(), "model": asdict(info),
                                            "model_file": rundir.MODEL, "model_sha256": file_sha256(model_file)}),
                       (rundir.SUBGROUPS, subgroups.to_dict())):
        log.info("wrote %s", rundir.write_json(run_dir / name, data))
    return calibration, subgroups


def read_evaluation(run_dir: str | Path) -> tuple[CalibrationReport, SubgroupFairness] | None:
    """The saved calibration and subgroup results, or None when either file is missing."""
    run_dir = Path(run_dir)
    paths = run_dir / rundir.CALIBRATION, run_dir / rundir.SUBGROUPS
    if not all(p.is_file() for p in paths):
        return None
    return (CalibrationReport.from_dict(rundir.read_json(paths[0])),
            SubgroupFairness.from_dict(rundir.read_json(paths[1])))
