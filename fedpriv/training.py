"""One hospital's local training step (DP-SGD with Opacus) and model evaluation. No Flower here.

:func:`train_local` is pure: it copies the model, trains the copy according to a
:class:`~fedpriv.privacy.plan.PrivacyPlan`, and returns plain (unwrapped) weights together with the
privacy events Opacus's own accountant hook recorded, so what is charged is what was run.

Given ``groups`` (each image's patient), private training is patient-level DP-SGD (user-level
DP-SGD): patients are Poisson-sampled, each sampled patient's per-image gradients (from Opacus's
GradSampleModule) are averaged into one per-patient gradient, that is clipped, and the Gaussian noise
is calibrated to the per-patient clip. See :func:`train_local`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from fedpriv.errors import PrivacyError
from fedpriv.models import check_private_trainable, resolve_grad_sample_mode
from fedpriv.privacy.accounting import PrivacyEvent, epsilon
from fedpriv.privacy.plan import PrivacyPlan

log = logging.getLogger(__name__)


@dataclass
class LocalTrainResult:
    """What a local training call produced: weights to share, and what it cost in privacy."""

    state_dict: dict[str, torch.Tensor]  # plain module keys (no Opacus `_module.` prefix)
    events: list[PrivacyEvent]  # empty for a non-private run
    steps: int
    num_examples: int
    mean_loss: float
    private: bool

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        """Epsilon of THIS call alone (infinity when non-private). A hospital's total is its ledger's."""
        return epsilon(self.events, delta, accountant) if self.private else math.inf


class LogitAdjustedCrossEntropy(nn.Module):
    """Cross-entropy on ``logits + shift``: logit adjustment (Menon et al., ICLR 2021).

    With ``shift = tau * log(class prior)`` the model must beat the prior's head start to predict a
    common class, so its raw logits (used unshifted at prediction time) lean less towards the majority
    class. Under DP-SGD this matters more than usual: clipping caps every record's pull, so the
    majority class's many records dominate each noisy sum. The shift works through the size of each
    record's gradient; with two classes its direction is fixed, so for records whose gradient is
    clipped anyway the shift changes nothing. A zero shift is plain cross-entropy. ``reduction`` is an
    attribute because Opacus's ghost clipping switches it to "none" to get per-sample losses.
    """

    def __init__(self, shift: Sequence[float] | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(list(shift or ()), dtype=torch.float32))
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if len(self.shift):
            logits = logits + self.shift.to(logits.device)
        return nn.functional.cross_entropy(logits, labels, reduction=self.reduction)


def train_local(
    model: nn.Module,
    data: Dataset,
    plan: PrivacyPlan,
    *,
    lr: float,
    momentum: float = 0.0,
    logit_shift: Sequence[float] | None = None,
    seed: int = 0,
    device: str = "cpu",
    groups: np.ndarray | None = None,
    max_images_per_group: int | None = None,
) -> LocalTrainResult:
    """Train a copy of `model` on `data` for `plan.steps` optimizer steps; `model` is not modified.

    Private plans use Poisson sampling, per-sample clipping to `plan.max_grad_norm` and Gaussian
    noise of std `noise_multiplier * max_grad_norm`; logical batches are split into physical
    batches of at most `plan.max_physical_batch_size` by Opacus's BatchMemoryManager.

    `plan.grad_sample_mode` chooses how Opacus computes the clipping: "hooks", "functorch", "ew",
    "ghost" (ghost clipping), or "auto", the measured choice for this model
    (:data:`fedpriv.models.GRAD_SAMPLE_MODE_BY_MODEL`). Every mode clips the same per-sample
    gradients and adds the same noise. `logit_shift` (one number per class, see
    :class:`LogitAdjustedCrossEntropy`) is added to the logits in the training loss only.

    Ghost clipping works with BatchMemoryManager: each physical batch's clipped sum is accumulated
    and noise is added once per logical batch (supported by Opacus since its fix of opacus#707; the
    tests compare it with per-sample clipping).

    `groups` (one patient id per item of `data`, any hashable values) makes a private plan
    patient-level: `plan.sample_rate` is then the Poisson rate per *patient*, each step takes every
    sampled patient's images (at most `max_images_per_group` of them, drawn at random; None: all),
    averages their per-sample gradients into one gradient per patient, clips that to
    `plan.max_grad_norm`, sums over patients, adds noise of std `noise_multiplier * max_grad_norm`
    and divides by the expected number of patients. Removing one patient (all of their images)
    changes the noisy sum by at most `max_grad_norm`: the neighbouring relation is add/remove one
    patient. Needs per-sample gradients ("hooks" or "functorch"; "auto" picks hooks). Physical
    batches hold whole patients, up to `plan.max_physical_batch_size` images (a patient with more
    images is a batch of its own). A non-private plan ignores `groups`.

    `device` (a resolved torch device: "cpu", "cuda", "cuda:N"; see fedpriv.devices) holds the model, the
    per-sample gradients and the noise; sampling draws on the CPU (:func:`round_generators`). The
    mechanism, and so what the returned events say, is the same on every device.
    """
    num_records = len(data)
    if num_records == 0:
        raise ValueError("cannot train on an empty dataset")
    torch.manual_seed(seed)
    sampling, noise = round_generators(seed, device)
    local_model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(local_model.parameters(), lr=lr, momentum=momentum)
    criterion = LogitAdjustedCrossEntropy(logit_shift)
    if plan.private:
        check_private_trainable(local_model)
        if groups is not None:
            return _train_private_grouped(local_model, optimizer, data, plan, sampling, noise, device, criterion,
                                          np.asarray(groups), max_images_per_group)
        return _train_private(local_model, optimizer, data, plan, sampling, noise, device, criterion)
    return _train_plain(local_model, optimizer, data, plan, sampling, device, criterion)


def round_generators(seed: int, device: str | torch.device) -> tuple[torch.Generator, torch.Generator]:
    """A round's two sources of randomness from its seed: (sampling, noise).

    Sampling (Poisson draws, shuffles) makes CPU tensors, so its generator is a CPU one. The noise
    generator lives on `device`, the parameters' device: Opacus draws each parameter's Gaussian noise
    with ``generator=`` on that parameter's device, and torch refuses a generator of another device.
    On the CPU both are one generator, so a seeded CPU round draws exactly what it always drew.
    """
    sampling = torch.Generator().manual_seed(seed)
    if torch.device(device).type == "cpu":
        return sampling, sampling
    return sampling, torch.Generator(device=device).manual_seed(seed)


def _train_private(model, optimizer, data, plan, sampling, noise, device, criterion) -> LocalTrainResult:
    # Imported here, not at module level: Opacus takes ~1.4 s to import, and the processes that
    # never train privately (the CLI, the ServerApp) should not pay it.
    from opacus.accountants import create_accountant
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    mode = resolve_grad_sample_mode(plan.grad_sample_mode, model)
    expected_batch_size = plan.expected_batch_size(len(data))
    if mode == "ghost":
        # Ghost clipping (Opacus's fast gradient clipping): per-sample gradient NORMS only (computed
        # without materialising per-sample gradients for Linear layers; other layers' per-sample
        # gradients are built one layer at a time and dropped), then a second backward pass on the
        # loss reweighted by each sample's clipping factor. The optimizer only adds noise and scales.
        grad_sample_model = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=plan.max_grad_norm,
            use_ghost_clipping=True)
        optimizer_class = DPOptimizerFastGradientClipping
    else:
        grad_sample_model = wrap_model(model, mode, loss_reduction="mean")
        optimizer_class = DPOptimizer
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise,
    )
    if mode == "ghost":
        # Its loss object runs both backward passes when `.backward()` is called.
        criterion = DPLossFastGradientClipping(grad_sample_model, dp_optimizer, criterion, loss_reduction="mean")
    # Opacus's accountant hook counts exactly the optimizer steps that added noise.
    accountant = create_accountant(plan.accountant)
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(plan.sample_rate))
    loader = DPDataLoader(data, sample_rate=plan.sample_rate, generator=sampling)
    try:
        losses = _run_steps(grad_sample_model, dp_optimizer, loader, plan, device, criterion, private=True,
                            per_sample_only=mode == "hooks")
    finally:
        grad_sample_model._close()  # removes Opacus hooks and attributes; the plain module stays usable
    events = [PrivacyEvent(sigma, q, steps) for sigma, q, steps in accountant.history]
    return LocalTrainResult(_plain_state(model), events, sum(e.steps for e in events), len(data),
                            float(np.mean(losses)) if losses else math.nan, True)


def _train_private_grouped(model, optimizer, data, plan, sampling, noise_generator, device, criterion,
                           groups: np.ndarray, max_images: int | None) -> LocalTrainResult:
    """Patient-level DP-SGD (see :func:`train_local`): Opacus gives per-sample gradients, fedpriv groups them."""
    from opacus.accountants import create_accountant
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers.optimizer import _generate_noise

    if len(groups) != len(data):
        raise PrivacyError(f"{len(groups)} patient ids for {len(data)} images; give one per image")
    if max_images is not None and max_images < 1:
        raise PrivacyError(f"max_images_per_patient must be at least 1, got {max_images}")
    mode = resolve_grad_sample_mode(plan.grad_sample_mode, model)
    if mode not in ("hooks", "functorch"):
        raise PrivacyError(f"patient-level DP-SGD needs per-sample gradients to sum per patient; grad_sample_mode "
                           f"{mode!r} does not give them. Use grad_sample_mode='hooks' (or 'auto')")
    _, owner = np.unique(groups, return_inverse=True)
    order = np.argsort(owner.reshape(-1), kind="stable")
    members = np.split(order, np.cumsum(np.bincount(owner.reshape(-1)))[:-1])
    num_groups = len(members)
    # The noisy sum is divided by the EXPECTED number of patients, a public constant (as Opacus does
    # per sample), never by how many were drawn, which would depend on the data.
    expected = plan.expected_batch_size(num_groups)
    # Per-sample losses summed, so Opacus's per-sample gradients are those of each image's own loss.
    criterion.reduction = "sum"
    grad_sample_model = wrap_model(model, mode, loss_reduction="sum")
    parameters = [p for p in grad_sample_model.parameters() if p.requires_grad]
    accountant = create_accountant(plan.accountant)
    clip, sigma = plan.max_grad_norm, plan.noise_multiplier
    losses: list[float] = []
    try:
        for _ in range(plan.steps):
            drawn = torch.nonzero(torch.rand(num_groups, generator=sampling) < plan.sample_rate).flatten().tolist()
            chosen = []
            for group in drawn:
                images = members[group]
                if max_images is not None and len(images) > max_images:
                    pick = torch.randperm(len(images), generator=sampling)[:max_images].numpy()
                    images = np.sort(images[pick])
                chosen.append(images)
            total = [torch.zeros_like(p) for p in parameters]
            for batch in _whole_groups(chosen, plan.max_physical_batch_size):
                losses.append(_add_clipped_group_gradients(grad_sample_model, parameters, data, batch, total, clip,
                                                           device, criterion, per_sample_only=mode == "hooks"))
            for parameter, summed in zip(parameters, total):
                noise = _generate_noise(std=sigma * clip, reference=summed, generator=noise_generator)
                parameter.grad = (summed + noise) / expected
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            accountant.step(noise_multiplier=sigma, sample_rate=plan.sample_rate)
    finally:
        grad_sample_model._close()
    events = [PrivacyEvent(s, q, steps) for s, q, steps in accountant.history]
    return LocalTrainResult(_plain_state(model), events, sum(e.steps for e in events), len(data),
                            float(np.mean(losses)) if losses else math.nan, True)


def _whole_groups(chosen: list[np.ndarray], capacity: int):
    """Pack the drawn groups' image indices into physical batches of whole groups, up to `capacity` images."""
    batch: list[np.ndarray] = []
    size = 0
    for images in chosen:
        if batch and size + len(images) > capacity:
            yield batch
            batch, size = [], 0
        batch.append(images)
        size += len(images)
    if batch:
        yield batch


def _add_clipped_group_gradients(model, parameters, data, batch: list[np.ndarray], total: list[torch.Tensor],
                                 clip: float, device, criterion, *, per_sample_only: bool) -> float:
    """Add each group's clipped mean per-sample gradient to `total`; returns the batch's mean loss."""
    index = np.concatenate(batch)
    owner = torch.from_numpy(np.repeat(np.arange(len(batch)), [len(b) for b in batch]))
    images, labels = data[torch.from_numpy(index)]
    images, labels = images.to(device), labels.to(device)
    for parameter in parameters:
        parameter.grad_sample = None
    towards = {}
    if per_sample_only and images.is_floating_point():
        towards = {"inputs": [images.requires_grad_(True)]}  # see _run_steps: Opacus's hooks need no more
    loss = criterion(model(images), labels)
    loss.backward(**towards)
    counts = torch.bincount(owner, minlength=len(batch)).to(device=images.device, dtype=images.dtype)
    per_group = []
    for parameter in parameters:
        per_sample = parameter.grad_sample
        summed = torch.zeros((len(batch), *per_sample.shape[1:]), dtype=per_sample.dtype, device=per_sample.device)
        summed.index_add_(0, owner.to(per_sample.device), per_sample)
        per_group.append(summed / counts.view(-1, *[1] * (per_sample.dim() - 1)))
        parameter.grad_sample = None
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_group], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's own per-sample rule, applied per group
    for summed, group in zip(total, per_group):
        summed += torch.einsum("i,i...->...", factor, group)
    return loss.item() / len(index)


def _train_plain(model, optimizer, data, plan, sampling, device, criterion) -> LocalTrainResult:
    batch_size = plan.expected_batch_size(len(data))
    sampler = RandomSampler(data, generator=sampling)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    losses = _run_steps(model, optimizer, loader, plan, device, criterion, private=False)
    return LocalTrainResult(_plain_state(model), [], plan.steps, len(data),
                            float(np.mean(losses)) if losses else math.nan, False)


def _run_steps(model, optimizer, loader, plan: PrivacyPlan, device, criterion, *, private: bool,
               per_sample_only: bool = False) -> list[float]:
    """Loop over the loader (restarting it as needed) until `plan.steps` real optimizer steps ran.

    `per_sample_only` (Opacus hooks mode): backpropagate only towards the input images. Opacus's hooks
    still see every layer's output gradient and build the per-sample gradients from it, which is all
    DP-SGD uses (the optimizer clips them, sums, adds noise and writes `.grad` itself); autograd just
    skips the batch-summed parameter gradients it would otherwise compute and throw away. The update
    is the same (tests compare hooks with ghost clipping). Measured on the CNN with two threads: 2-9%
    less time per private sample at physical batches 128-256 (BENCHMARKS.md, DP training overhead).
    """
    if private:
        from opacus.utils.batch_memory_manager import BatchMemoryManager
    losses: list[float] = []
    steps_done = 0
    while steps_done < plan.steps:
        if private:
            context = BatchMemoryManager(data_loader=loader, max_physical_batch_size=plan.max_physical_batch_size,
                                         optimizer=optimizer)
        else:
            context = contextlib.nullcontext(loader)
        with context as batches:
            for images, labels in batches:
                optimizer.zero_grad(set_to_none=True)
                images, labels = images.to(device), labels.to(device)
                towards = {}
                if per_sample_only and images.is_floating_point():
                    towards = {"inputs": [images.requires_grad_(True)]}
                if len(labels):
                    loss = criterion(model(images), labels)
                    loss.backward(**towards)
                    losses.append(loss.item())
                elif private:
                    # Poisson sampling can draw an empty batch; DP-SGD still adds noise for it. A plain
                    # backward gives every parameter a zero gradient (zero per-sample gradients, or in
                    # ghost mode a zero sum to accumulate), so the step below is noise alone.
                    model(images).sum().backward(**towards)
                optimizer.step()
                if private and optimizer._is_last_step_skipped:
                    continue  # only part of a logical batch; no real step yet
                steps_done += 1
                if steps_done == plan.steps:
                    break
    return losses


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


@dataclass
class EvalResult:
    """Metrics of a model on one labelled split, with its predicted probabilities."""

    loss: float
    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    num_examples: int
    probabilities: np.ndarray = field(repr=False)  # (N, num_classes)
    labels: np.ndarray = field(repr=False)  # (N,)

    def metrics(self) -> dict[str, float]:
        """The scalar metrics, as a flat dict (for logs, JSON and Flower MetricRecords)."""
        return {"loss": self.loss, "auc": self.auc, "accuracy": self.accuracy,
                "sensitivity": self.sensitivity, "specificity": self.specificity,
                "num-examples": self.num_examples}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 512, device: str = "cpu") -> EvalResult:
    """Loss, ROC-AUC, accuracy, sensitivity and specificity of `model` on `data`.

    Binary tasks: sensitivity is the recall of class 1 (e.g. pneumonia), specificity that of class 0.
    Multi-class tasks: one-vs-rest macro AUC, and macro-averaged sensitivity/specificity.
    AUC is NaN when the split holds a single class.
    """
    model = model.to(device).eval()
    logits, labels = [], []
    for images, batch_labels in DataLoader(data, batch_size=batch_size):
        logits.append(model(images.to(device)).cpu())
        labels.append(batch_labels)
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    loss = nn.functional.cross_entropy(all_logits, all_labels).item()
    probabilities = torch.softmax(all_logits, dim=1).numpy()
    y = all_labels.numpy()
    predictions = probabilities.argmax(axis=1)
    num_classes = probabilities.shape[1]
    sensitivity, specificity = _sensitivity_specificity(y, predictions, num_classes)
    return EvalResult(loss, roc_auc(y, probabilities), float((predictions == y).mean()), sensitivity,
                      specificity, len(y), probabilities, y)


def roc_auc(y: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC-AUC of class probabilities ``(N, classes)``: binary, or one-vs-rest macro; NaN where undefined.

    Undefined: a single class in ``y``, or (multi-class) a class absent from it.
    """
    # scikit-learn is imported where it is used (here and below): it takes ~1 s to import, and a
    # deployed hospital starts a fresh process for every message: training and budget queries never evaluate.
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return math.nan
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(y, probabilities[:, 1]))
    present = np.unique(y)
    if len(present) < probabilities.shape[1]:
        return math.nan  # one-vs-rest AUC is undefined for a class absent from the split
    return float(roc_auc_score(y, probabilities, multi_class="ovr", average="macro"))


def _sensitivity_specificity(y: np.ndarray, predictions: np.ndarray, num_classes: int) -> tuple[float, float]:
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y, predictions, labels=list(range(num_classes)))
    true_pos = np.diag(matrix).astype(float)
    false_neg = matrix.sum(axis=1) - true_pos
    false_pos = matrix.sum(axis=0) - true_pos
    true_neg = matrix.sum() - true_pos - false_neg - false_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = true_pos / (true_pos + false_neg)
        true_neg_rate = true_neg / (true_neg + false_pos)
    if num_classes == 2:
        return float(recall[1]), float(recall[0])
    return float(np.nanmean(recall)), float(np.nanmean(true_neg_rate))
