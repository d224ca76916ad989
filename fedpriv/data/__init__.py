"""Medical image data for fedpriv: loaders, a synthetic generator, and partitioning into hospitals.

Every loader returns a :class:`MedicalImageDataset` (train/val/test :class:`LabeledImages`, float32
``(N, C, H, W)`` images normalised with fixed constants). :func:`partition_indices` divides a training
split among simulated hospitals; :func:`dataset_fingerprint` identifies a hospital's records so its
privacy ledger stays tied to them, and :meth:`LabeledImages.ids` names each record for per-record
accounting.
"""

from fedpriv.data.base import (
    NORMALISATION_MEAN,
    NORMALISATION_STD,
    RECORD_ID_PREFIX,
    LabeledImages,
    MedicalImageDataset,
    content_record_ids,
    dataset_fingerprint,
    default_data_dir,
)
from fedpriv.data.loading import load_dataset, load_server_dataset
from fedpriv.data.partition import (
    format_partition_table,
    partition_indices,
    partition_summary,
)

__all__ = [
    "NORMALISATION_MEAN",
    "NORMALISATION_STD",
    "RECORD_ID_PREFIX",
    "LabeledImages",
    "MedicalImageDataset",
    "content_record_ids",
    "dataset_fingerprint",
    "default_data_dir",
    "format_partition_table",
    "load_dataset",
    "load_server_dataset",
    "partition_indices",
    "partition_summary",
]
