"""Search model=scatnet's federated DP-SGD recipe quickly, in process (no Flower), judged on the validation split.

What it runs is fedpriv's own code, minus Flower and the ledger: the hospitals' records are split as
fedpriv splits them (:func:`fedpriv.data.partition_indices` then each hospital's local hold-out,
:func:`fedpriv.experiment.split_local_validation`), each hospital's images are turned into
scattering coefficients once by fedpriv.scatnet's real front end (:func:`fedpriv.scatnet.precomputed`),
each hospital's plan is :func:`fedpriv.privacy.plan.plan_local_training`'s (Poisson sampling, PRV
accountant, delta 1e-5, sigma calibrated so that the planned rounds spend exactly the target epsilon,
as a hospital's first round does with a fresh ledger), the learning rate falls as
:meth:`fedpriv.hospital.RoundRequest.round_lr`, the initial model is :func:`fedpriv.models.build_model`'s
after ``torch.manual_seed(seed)`` as in the ServerApp, and the server combines the replies with
fedpriv.aggregation (FedAvg with a server learning rate in parallel mode,
:func:`~fedpriv.aggregation.sequential_weight` in sequential mode).

Local training is :func:`fast_train_local` by default: the same DP-SGD as
:func:`fedpriv.training.train_local` with the head's per-sample gradients written out by hand (the
tests check it against train_local); ``--trainer fedpriv`` runs train_local itself (Opacus, slower).

Each setting runs for the given seeds and appends one JSON line to bench/results/scatnet_search.jsonl:
validation AUC / accuracy of the final global model (what a recipe is chosen on) and test AUC /
accuracy (recorded, never used to choose). ``--report`` ranks them by validation only.

    FEDPRIV_DATA_DIR=../shared/data nice -n 10 .venv/bin/python bench/scatnet_search.py \
        --eps 1 --mode parallel --rounds 10 --batch 256 --lr 0.5 --seeds 0 1
    .venv/bin/python bench/scatnet_search.py --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "scatnet_search.jsonl"
HEAD_KEYS = ("head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias", "head.5.weight", "head.5.bias")
CACHE = Path.home() / ".cache" / "fedpriv" / "scatnet_search"


def coefficients(model, dataset, name: str):
    """The three splits' scattering coefficients, computed once by the model's fixed front end (and cached:
    they depend on the images and (J, L, order) only)."""
    from fedpriv.scatnet import precomputed

    key = f"{name}-J{model.scale}-L{model.orientations}-o{model.order}.pt"
    path = CACHE / key
    if path.exists():
        return torch.load(path)
    splits = {split: precomputed(model, getattr(dataset, split)) for split in ("train", "val", "test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({split: (s.images, s.labels) for split, s in splits.items()}, path)
    return {split: (s.images, s.labels) for split, s in splits.items()}


def unfold_normalised(coefficients: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """Each record's GroupNorm-normalised coefficients (before GroupNorm's affine weights), unfolded into
    3x3 patches ``(N, C*9, H*W)``. A per-record function of the data alone (no parameters), so the
    search computes it once per process and :func:`fast_train_local` reuses it every step."""
    out = []
    for start in range(0, len(coefficients), 512):
        xhat = torch.nn.functional.group_norm(coefficients[start:start + 512], groups, eps=eps)
        out.append(torch.nn.functional.unfold(xhat, 3, padding=1))
    return torch.cat(out)


def fast_train_local(model, data, plan, *, lr: float, logit_shift=(), seed: int = 0) -> dict[str, torch.Tensor]:
    """The DP-SGD of :func:`fedpriv.training.train_local` for ScatNet's default head, without Opacus.

    The same mechanism: `plan.steps` steps, each a Poisson draw at `plan.sample_rate`, every sampled
    record's gradient (of its own logit-adjusted cross-entropy) clipped to `plan.max_grad_norm`, the
    clipped gradients summed, Gaussian noise of std `noise_multiplier * max_grad_norm` added to the sum,
    the sum divided by the expected batch size (Opacus's "mean" reduction), a plain SGD step of `lr`.
    The per-sample gradients of GroupNorm -> 3x3 conv -> tanh -> linear are written out by hand: with
    U the unfolded normalised coefficients (:func:`unfold_normalised`, fixed per record) and dz the
    gradient at the convolution's output, the conv weight's gradient is gamma * dz U^T + beta * dz M^T
    (M: the padding mask), and GroupNorm's are contractions of the same products with the conv weight.
    That needs two matrix products per record and step instead of Opacus's generic hooks.
    tests/test_scatnet.py checks it against train_local. Only the search uses it.

    `data` is (unfolded (N, C*9, H*W) from :func:`unfold_normalised`, labels (N,), indices of this
    hospital's records in them); `model` is not modified. Returns the new state_dict.
    """
    if not plan.private:
        raise ValueError("fast_train_local runs private plans only; use --trainer fedpriv without privacy")
    head = model.head
    if not (isinstance(head[0], torch.nn.GroupNorm) and isinstance(head[2], torch.nn.Tanh)
            and isinstance(head[3], torch.nn.Identity) and len(head) == 6):
        raise ValueError("fast_train_local handles ScatNet's default head (tanh, no pooling) only")
    unfolded_all, labels_all, index = data
    n = len(index)
    gen = torch.Generator().manual_seed(seed)
    params = [model.state_dict()[k].detach().clone() for k in HEAD_KEYS]
    gamma, beta, conv_w, conv_b, lin_w, lin_b = params
    width, channels = conv_w.shape[:2]
    side = model.coefficient_shape[1]
    mask = torch.nn.functional.unfold(torch.ones(1, 1, side, side), 3, padding=1)[0]  # (9, HW)
    shift = torch.tensor(list(logit_shift), dtype=torch.float32) if len(logit_shift) else None
    clip, sigma = plan.max_grad_norm, plan.noise_multiplier
    expected = plan.expected_batch_size(n)
    for _ in range(plan.steps):
        chosen = index[torch.rand(n, generator=gen) < plan.sample_rate]
        total = [torch.zeros_like(p) for p in params]
        if len(chosen):
            u, y = unfolded_all[chosen], labels_all[chosen]
            b = len(y)
            w3 = conv_w.reshape(width, channels, 9)
            z = ((w3 * gamma[None, :, None]).reshape(width, -1) @ u
                 + (torch.einsum("ock,c->ok", w3, beta) @ mask)[None] + conv_b[None, :, None])  # (B, O, HW)
            act = torch.tanh(z)
            flat = act.reshape(b, -1)
            logits = flat @ lin_w.T + lin_b
            probs = torch.softmax(logits if shift is None else logits + shift, dim=1)
            d_logits = probs - torch.nn.functional.one_hot(y, probs.shape[1]).to(probs.dtype)
            d_z = (d_logits @ lin_w).reshape(b, width, -1) * (1 - act * act)
            a_prod = torch.bmm(d_z, u.transpose(1, 2)).reshape(b, width, channels, 9)  # dz U^T
            s_prod = d_z @ mask.T  # (B, O, 9)
            grads = [
                torch.einsum("ock,bock->bc", w3, a_prod),  # GroupNorm weight
                torch.einsum("ock,bok->bc", w3, s_prod),  # GroupNorm bias
                (a_prod * gamma[None, None, :, None] + s_prod[:, :, None, :] * beta[None, None, :, None]
                 ).reshape(b, *conv_w.shape),
                d_z.sum(2),
                d_logits[:, :, None] * flat[:, None, :],
                d_logits,
            ]
            norms = torch.sqrt(sum(g.reshape(b, -1).pow(2).sum(1) for g in grads))
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            total = [torch.tensordot(factor, g, dims=1) for g in grads]
        for p, g in zip(params, total):
            noisy = g + torch.normal(0.0, sigma * clip, size=g.shape, generator=gen) if sigma else g
            p.sub_(lr * noisy / expected)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update(dict(zip(HEAD_KEYS, params)))
    return state


def run(a: argparse.Namespace, seed: int, dataset, coeffs) -> dict:
    from fedpriv.aggregation import sequential_weight, server_step, weighted_average
    from fedpriv.data import LabeledImages, partition_indices
    from fedpriv.experiment import split_local_validation
    from fedpriv.hospital import RoundRequest
    from fedpriv.models import build_model
    from fedpriv.privacy.plan import plan_local_training
    from fedpriv.training import evaluate, train_local

    labels = dataset.train.labels.numpy()
    parts = partition_indices(labels, 3, "dirichlet", alpha=0.5, seed=seed, groups=dataset.train.patient_ids)
    train_idx, _ = split_local_validation(parts, 0.1, seed, dataset.train.patient_ids)
    train_images, train_labels = coeffs["train"]
    datas = [LabeledImages(train_images[t], train_labels[t]).as_dataset() for t in train_idx]
    if a.trainer == "fast":
        unfolded = unfolded_train(coeffs)
        pairs = [(unfolded, train_labels, torch.as_tensor(t)) for t in train_idx]

    def local(model, i, plan, lr, round_seed):
        if a.trainer == "fedpriv":
            return train_local(model, datas[i], plan, lr=lr, logit_shift=shift, seed=round_seed).state_dict
        return fast_train_local(model, pairs[i], plan, lr=lr, logit_shift=shift, seed=round_seed)

    torch.manual_seed(seed)  # as the ServerApp does before building the initial model
    model = build_model("scatnet", in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                        image_size=dataset.image_size, width=a.width, activation=a.act)
    prior = dataset_prior(dataset)
    shift = [a.tau * float(np.log(p)) for p in prior] if a.tau else []
    plans = [plan_local_training(num_records=len(d), batch_size=a.batch, local_epochs=a.epochs, private=a.eps > 0,
                                 target_epsilon=a.eps or None, delta=1e-5, max_grad_norm=a.clip,
                                 planned_rounds=a.rounds, accountant="prv", max_physical_batch_size=a.physical)
             for d in datas]
    val = LabeledImages(*coeffs["val"]).as_dataset()
    test = LabeledImages(*coeffs["test"]).as_dataset()
    state = model.state_dict()
    history = []
    for r in range(1, a.rounds + 1):
        lr = RoundRequest(run_id="search", server_round=r, num_rounds=a.rounds, local_epochs=a.epochs,
                          batch_size=a.batch, lr=a.lr, lr_final=a.lr_final).round_lr()
        if a.mode == "parallel":
            replies = [local(model, i, plan, lr, seed * 100_000 + r * 10 + i) for i, plan in enumerate(plans)]
            state = server_step(state, weighted_average(replies, [len(d) for d in datas]), a.server_lr)
            model.load_state_dict(state)
        else:
            sizes = [len(d) for d in datas]
            for i, (d, plan) in enumerate(zip(datas, plans)):
                trained = local(model, i, plan, lr, seed * 100_000 + r * 10 + i)
                weight = sequential_weight(len(d), sizes, a.sequential_step)
                state = {k: state[k] + weight * (trained[k] - state[k]) if state[k].is_floating_point()
                         else trained[k] for k in state}
                model.load_state_dict(state)
        if a.trace and (r % a.trace == 0 or r == a.rounds):
            v = evaluate(model, val)
            history.append((r, round(v.auc, 4)))
    v, t = evaluate(model, val), evaluate(model, test)
    return {"seed": seed, "val_auc": v.auc, "val_acc": v.accuracy, "test_auc": t.auc, "test_acc": t.accuracy,
            "sigma": [round(p.noise_multiplier, 3) for p in plans] if a.eps else [], "val_history": history}


_UNFOLDED = {}


def unfolded_train(coeffs) -> torch.Tensor:
    if "train" not in _UNFOLDED:
        from fedpriv.scatnet import _group_count

        images = coeffs["train"][0]
        _UNFOLDED["train"] = unfold_normalised(images, _group_count(images.shape[1]))
    return _UNFOLDED["train"]


def dataset_prior(dataset) -> list[float]:
    """fedpriv's configured public class prior for the dataset (conf/dataset/pneumoniamnist.yaml)."""
    from fedpriv.app_config import compose_config

    prior = compose_config(["dataset=" + dataset.name]).dataset.class_prior
    if prior is None:
        raise SystemExit(f"dataset {dataset.name} declares no class_prior")
    return [float(p) for p in prior]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential"])
    p.add_argument("--eps", type=float, default=3.0, help="epsilon per hospital (0: non-private)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--batch", type=int, default=128, help="expected (Poisson) batch size")
    p.add_argument("--physical", type=int, default=512, help="physical batch (memory only; same result)")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--lr-final", type=float, default=0.3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=3.0)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--act", default="tanh")
    p.add_argument("--server-lr", type=float, default=1.5)
    p.add_argument("--sequential-step", default="share", choices=["share", "full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trace", type=int, default=0, help="also record validation AUC every n rounds")
    p.add_argument("--trainer", default="fast", choices=["fast", "fedpriv"],
                   help="fast: fast_train_local (same DP-SGD, per-sample gradients by hand); fedpriv: train_local (Opacus)")
    p.add_argument("--tag", default="")
    p.add_argument("--report", action="store_true", help="rank the recorded settings by validation AUC and stop")
    p.add_argument("--settings-file", type=Path, default=None,
                   help="run every line of this file as its own setting (its options on top of the command line's), "
                        "loading the data once")
    a = p.parse_args()
    if a.report:
        return report()
    torch.set_num_threads(a.threads)
    from fedpriv.config import DatasetConfig
    from fedpriv.data import load_dataset
    from fedpriv.models import build_model

    dataset = load_dataset(DatasetConfig(), seed=0)
    front = build_model("scatnet", in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                        image_size=dataset.image_size)
    coeffs = coefficients(front, dataset, dataset.name)
    if a.settings_file is None:
        return search(a, dataset, coeffs)
    for line in a.settings_file.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            search(p.parse_args(sys.argv[1:] + line.split()), dataset, coeffs)


def search(a: argparse.Namespace, dataset, coeffs) -> None:
    started = time.time()
    rows = [run(a, seed, dataset, coeffs) for seed in a.seeds]
    summary = {k: (statistics.mean(r[k] for r in rows), statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0)
               for k in ("val_auc", "val_acc", "test_auc", "test_acc")}
    settings = {k: v for k, v in vars(a).items()
                if k not in ("report", "threads", "physical", "trace", "seeds", "settings_file")}
    out = {"settings": settings, "seeds": a.seeds, "summary": summary, "rows": rows,
           "seconds": round(time.time() - started, 1)}
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(out) + "\n")
    print(a.tag, json.dumps(settings), " ".join(f"{k}={m:.4f}±{s:.4f}" for k, (m, s) in summary.items()),
          f"{out['seconds']:.0f}s", flush=True)


def report() -> None:
    """Every recorded setting, per (epsilon, mode), best validation AUC first (test shown, never used to rank)."""
    lines = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list] = {}
    for line in lines:
        s = line["settings"]
        groups.setdefault((s["eps"], s["mode"]), []).append(line)
    for (eps, mode), items in sorted(groups.items()):
        print(f"\n## epsilon {eps:g}, {mode} (ranked by validation AUC)")
        print("| lr | lr_final | clip | tau | width | rounds x epochs | batch | server lr / step | seeds | val AUC | val acc. "
              "| test AUC | test acc. |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for it in sorted(items, key=lambda x: -x["summary"]["val_auc"][0]):
            s, m = it["settings"], it["summary"]
            step = s["server_lr"] if mode == "parallel" else s["sequential_step"]
            cells = [f"{m[k][0]:.4f} ± {m[k][1]:.4f}" if k == "val_auc" else f"{m[k][0]:.3f} ± {m[k][1]:.3f}"
                     for k in ("val_auc", "val_acc", "test_auc", "test_acc")]
            print(f"| {s['lr']:g} | {s['lr_final']:g} | {s['clip']:g} | {s['tau']:g} | {s['width']} | {s['rounds']} x {s['epochs']} | {s['batch']} | "
                  f"{step} | {' '.join(map(str, it['seeds']))} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
