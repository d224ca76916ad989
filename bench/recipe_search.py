"""Search the federated DP-SGD recipe quickly, in process (no Flower), judged on the validation split.

Three hospitals, Dirichlet(0.5) label skew, PneumoniaMNIST, epsilon per hospital (PRV, delta 1e-5),
parallel (FedAvg, optional server learning rate) or sequential. Each setting runs for 3 seeds and
appends one JSON line to bench/results/recipe_search.jsonl: validation AUC / accuracy (what the
choice is based on), test AUC / accuracy (what BENCHMARKS.md reports), and test accuracy at the
operating point that maximises Youden's J on the validation split.

It has its own short training loop (Opacus hooks mode, like fedpriv's train_local) so that it can
try options fedpriv does not ship: EMA of the local iterates, random-shift augmentation, average
pooling, averaging the last global models. The options that won were then built into fedpriv
(model.activation, train.logit_adjustment, train.lr_final, strategy.server_lr), and
bench/federated.py measures them through Flower itself.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/recipe_search.py --act tanh --tau 3 --lr-final 0.3
"""
import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from sklearn.metrics import roc_curve
from torch import nn

from fedpriv.config import DatasetConfig
from fedpriv.data import load_dataset, partition_indices
from fedpriv.experiment import split_local_validation
from fedpriv.models import _groups
from fedpriv.privacy.accounting import noise_multiplier_for
from fedpriv.privacy.plan import steps_per_epoch
from fedpriv.training import evaluate

RESULTS = Path(__file__).parent / "results" / "recipe_search.jsonl"
torch.set_num_threads(1)  # two settings run side by side on the 2-core machine


class CNN(nn.Module):
    def __init__(self, width=16, act="relu", pool="max", groups=0, widths=None):
        super().__init__()
        A = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}[act]
        ch = [1, *(widths or [width, width * 2, width * 4])]
        blocks = []
        for i, (a, b) in enumerate(zip(ch, ch[1:])):
            blocks += [nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(groups or _groups(b), b), A()]
            blocks.append((nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)) if i < 2 else nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(ch[-1], 2)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class AdjustedCE(nn.Module):
    def __init__(self, shift):
        super().__init__()
        self.register_buffer("shift", shift)
        self.reduction = "mean"

    def forward(self, logits, y):
        return nn.functional.cross_entropy(logits + self.shift, y, reduction=self.reduction)


def augment(x, gen):
    if x.shape[0] == 0:
        return x
    pad = nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return pad[:, :, dy:dy + 28, dx:dx + 28]


def augment_each(x, gen, flip=False):
    """An independent random shift (up to 2 pixels) per image, and optionally a horizontal flip."""
    n = x.shape[0]
    pad = nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(28)[None, :])  # (n, 28)
    cols = (dx[:, None] + torch.arange(28)[None, :])
    out = pad[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out[mask] = out[mask].flip(-1)
    return out


def average_augmentations(model, k):
    """Augmentation multiplicity (De et al. 2022): each record's gradient is the mean over its k
    augmented copies, taken BEFORE clipping, so one record still has one clipped gradient."""
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is not None:
            p.grad_sample = gs.view(gs.shape[0] // k, k, *gs.shape[1:]).mean(1)


def local_train(model, data, sigma, q, steps, a, seed, lr=None):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model).train()
    if a.freeze_first:  # the first conv keeps its (random) initial filters: fewer noisy coordinates
        for p in m.features[0].parameters():
            p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr or a.lr, momentum=a.momentum)
    gsm = wrap_model(m, "hooks", loss_reduction="mean")
    dpo = DPOptimizer(opt, noise_multiplier=sigma, max_grad_norm=a.clip,
                      expected_batch_size=max(1, round(q * len(data))), loss_reduction="mean", generator=gen)
    prior = torch.tensor([0.258, 0.742])
    crit = AdjustedCE(a.tau * prior.log()) if a.tau else nn.CrossEntropyLoss()
    loader = DPDataLoader(data, sample_rate=q, generator=gen)
    ema = {k: v.detach().clone() for k, v in m.state_dict().items()} if a.ema else None
    done = 0
    while done < steps:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=512, optimizer=dpo) as batches:
            for x, y in batches:
                dpo.zero_grad(set_to_none=True)
                if len(y) and a.augmult:
                    xs = augment_each(x.repeat_interleave(a.augmult, 0), gen, a.flip)
                    crit(gsm(xs), y.repeat_interleave(a.augmult, 0)).backward()
                    average_augmentations(gsm, a.augmult)
                elif len(y):
                    if a.aug:
                        x = augment(x, gen)
                    crit(gsm(x), y).backward()
                else:
                    gsm(x).sum().backward()
                dpo.step()
                if dpo._is_last_step_skipped:
                    continue
                done += 1
                if ema is not None:
                    with torch.no_grad():
                        for k, v in m.state_dict().items():
                            ema[k].mul_(a.ema).add_(v.detach(), alpha=1 - a.ema)
                if done == steps:
                    break
    gsm._close()
    state = ema if ema is not None else {k: v.detach().clone() for k, v in m.state_dict().items()}
    return state


def run(a, seed, dataset):
    labels = dataset.train.labels.numpy()
    parts = partition_indices(labels, 3, "dirichlet", alpha=0.5, seed=seed)
    train_idx, _ = split_local_validation(parts, 0.1, seed)
    datas = [dataset.train.subset(t).as_dataset() for t in train_idx]
    torch.manual_seed(seed)
    model = CNN(a.width, a.act, a.pool, a.groups, a.widths)
    plans = []
    for d in datas:
        q = min(1.0, a.batch / len(d))
        steps = a.epochs * steps_per_epoch(q)
        # --eps 0: clipping without noise (the ceiling DP noise is measured against)
        sigma = (noise_multiplier_for(target_epsilon=a.eps, delta=1e-5, sample_rate=q, steps=steps * a.rounds)
                 if a.eps else 0.0)
        plans.append((q, steps, sigma))
    val, test = dataset.val.as_dataset(), dataset.test.as_dataset()
    hist = []
    snapshots = []
    for r in range(a.rounds):
        lr = a.lr * (1 - (1 - a.lr_final) * r / max(1, a.rounds - 1))
        if a.mode == "parallel":
            states, ns = [], []
            for i, d in enumerate(datas):
                q, steps, sigma = plans[i]
                states.append(local_train(model, d, sigma, q, steps, a, seed * 1000 + r * 10 + i, lr))
                ns.append(len(d))
            w = np.array(ns) / sum(ns)
            new = {k: sum(wi * s[k] for wi, s in zip(w, states)) for k in states[0]}
            if a.server_lr != 1.0:
                old = model.state_dict()
                new = {k: old[k] + a.server_lr * (new[k] - old[k]) for k in new}
            model.load_state_dict(new)
        else:
            total = sum(len(d) for d in datas)
            for i, d in enumerate(datas):
                q, steps, sigma = plans[i]
                trained = local_train(model, d, sigma, q, steps, a, seed * 1000 + r * 10 + i, lr)
                # --sequential-step share (fedpriv's strategy.sequential_step): the server keeps only
                # part of a small hospital's (noisier) step
                weight = 1.0 if a.sequential_step == "full" else min(1.0, len(datas) * len(d) / total)
                old = model.state_dict()
                model.load_state_dict({k: old[k] + weight * (trained[k] - old[k]) for k in old})
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        if a.avg_last > 1:
            last = snapshots[-a.avg_last:]
            evm = copy.deepcopy(model)
            evm.load_state_dict({k: sum(s[k] for s in last) / len(last) for k in last[0]})
        else:
            evm = model
        v, t = evaluate(evm, val), evaluate(evm, test)
        hist.append((round(v.auc, 4), round(t.auc, 4), round(t.accuracy, 4)))
    tails = {}
    for n in a.tail_list or []:  # the same run, judged by the average of its last n global models
        last = snapshots[-n:]
        tail_model = copy.deepcopy(model)
        tail_model.load_state_dict({k: sum(s[k] for s in last) / len(last) for k in last[0]})
        tv, tt = evaluate(tail_model, val), evaluate(tail_model, test)
        tails[n] = {"val_auc": tv.auc, "val_acc": tv.accuracy, "test_auc": tt.auc, "test_acc": tt.accuracy}
    fpr, tpr, thr = roc_curve(v.labels, v.probabilities[:, 1])
    th = thr[np.argmax(tpr - fpr)]
    yacc = float(((t.probabilities[:, 1] >= th) == t.labels).mean())
    return {"seed": seed, "youden_acc": yacc, "val_auc": v.auc, "val_acc": v.accuracy, "test_auc": t.auc, "test_acc": t.accuracy,
            "sigma": [round(p[2], 3) for p in plans], "hist": hist, "tails": tails}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="parallel")
    p.add_argument("--eps", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--act", default="relu")
    p.add_argument("--pool", default="max")
    p.add_argument("--tau", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("--aug", type=int, default=0)
    p.add_argument("--augmult", type=int, default=0, help="augmentations per record, averaged before clipping")
    p.add_argument("--flip", action="store_true", help="with --augmult: random horizontal flips too")
    p.add_argument("--freeze-first", action="store_true", help="keep the first conv layer at its initial weights")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--sequential-step", choices=["full", "share"], default="full",
                   help="sequential: share scales each hospital's step by its share of records x hospitals, capped at 1")
    p.add_argument("--lr-final", type=float, default=1.0)
    p.add_argument("--groups", type=int, default=0, help="GroupNorm groups (0: fedpriv's rule)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="channels per block")
    p.add_argument("--avg-last", type=int, default=1)
    p.add_argument("--tail-list", type=int, nargs="+", default=None,
                   help="also judge the run by the average of its last n global models, for each n")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tag", default="")
    a = p.parse_args()
    dataset = load_dataset(DatasetConfig(), seed=0)
    rows = []
    t0 = time.time()
    for s in a.seeds:
        rows.append(run(a, s, dataset))
    summary = {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0)
               for k in ("val_auc", "val_acc", "test_auc", "test_acc", "youden_acc")}
    out = {"args": vars(a), "summary": summary, "rows": rows, "seconds": time.time() - t0}
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(out) + "\n")
    for n in a.tail_list or []:
        means = {k: float(np.mean([r["tails"][n][k] for r in rows])) for k in ("val_auc", "val_acc", "test_auc", "test_acc")}
        print(f"{a.tag} tail {n}:", " ".join(f"{k}={m:.4f}" for k, m in means.items()))
    print(a.tag, " ".join(f"{k}={m:.3f}±{s:.3f}" for k, (m, s) in summary.items()),
          "per-seed test", [(round(r["test_auc"], 3), round(r["test_acc"], 3)) for r in rows], f"{time.time()-t0:.0f}s")


if __name__ == "__main__":
    main()
