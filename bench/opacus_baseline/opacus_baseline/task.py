"""Data and model of the baseline: the same PneumoniaMNIST shares and the same CNN as fedpriv's
default, so that the comparison measures the frameworks, not two different workloads."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedpriv.data import NORMALISATION_MEAN, NORMALISATION_STD
from fedpriv.models import build_model


def model() -> torch.nn.Module:
    return build_model("cnn", in_channels=1, num_classes=2, image_size=28)


def _tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = (torch.from_numpy(images).float().unsqueeze(1) / 255.0 - NORMALISATION_MEAN) / NORMALISATION_STD
    return TensorDataset(x, torch.from_numpy(labels.reshape(-1)).long())


def hospital_share(data_file: str, partition: int, partitions: int, seed: int = 0):
    """(train, validation) of one hospital: an IID slice of the training and validation splits."""
    with np.load(data_file) as npz:
        shares = []
        for split in ("train", "val"):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            order = np.random.default_rng(seed).permutation(len(images))
            mine = np.array_split(order, partitions)[partition]
            shares.append(_tensors(images[mine], labels[mine]))
    return shares[0], shares[1]


def test_split(data_file: str) -> TensorDataset:
    with np.load(data_file) as npz:
        return _tensors(npz["test_images"], npz["test_labels"])


def evaluate(net: torch.nn.Module, data: TensorDataset) -> tuple[float, float]:
    """(loss, accuracy) of `net` on `data`."""
    net.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=512)
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = net(x)
            loss += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    return loss / len(data), correct / len(data)
