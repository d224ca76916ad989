"""One entry point that turns a :class:`~fedpriv.config.DatasetConfig` into a dataset."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedpriv.data.base import MedicalImageDataset
from fedpriv.data.imagefolder import load_image_folder
from fedpriv.data.medmnist import load_medmnist
from fedpriv.data.synthetic import make_synthetic
from fedpriv.errors import ConfigError

if TYPE_CHECKING:  # only for annotations: keeps `fedpriv.data` importable without the config stack
    from fedpriv.config import DatasetConfig

logger = logging.getLogger(__name__)


def load_dataset(cfg: DatasetConfig, seed: int) -> MedicalImageDataset:
    """Load the dataset ``cfg.name`` names: "synthetic", "imagefolder", or a MedMNIST 2D flag.

    ``seed`` fixes the generated images (synthetic) and the train/val/test split (synthetic and
    image folder); MedMNIST keeps its official split. Raises DataError or ConfigError with a fix.
    """
    if cfg.name == "synthetic":
        return make_synthetic(cfg.num_samples, cfg.size, seed, cfg.val_fraction, cfg.test_fraction,
                              images_per_patient=cfg.images_per_patient)
    if cfg.name == "imagefolder":
        if not cfg.path:
            raise ConfigError("dataset.path", cfg.path, "the image folder needs a location",
                              "set dataset.path=/path/to/folder with one subfolder per class")
        return load_image_folder(cfg.path, cfg.size, attributes_csv=cfg.attributes_csv,
                                 val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed)
    return load_medmnist(cfg.name, cfg.size, cfg.root, cfg.download)



def load_server_dataset(cfg: DatasetConfig, seed: int) -> MedicalImageDataset:
    """What the ServerApp loads: the test split it evaluates on is required; nothing else is.

    A MedMNIST npz needs only ``test_images``/``test_labels`` (a deployment's coordinator holds no
    training data); ``val`` (the public split the run report's calibration is fitted on) and
    ``train`` (simulation: the report names the simulated hospitals' records) are read when
    present, and empty otherwise. A synthetic or image-folder dataset is split as in simulation.
    """
    if cfg.name in ("synthetic", "imagefolder"):
        return load_dataset(cfg, seed)
    return load_medmnist(cfg.name, cfg.size, cfg.root, cfg.download, required=("test",), optional=("val", "train"))
