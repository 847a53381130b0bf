"""The paper's CIFAR-10 side experiments, rerun on a prepared data set held in memory.

relu-vs-tanh (Figure 1): the four-layer net with ReLU and with tanh units, each at the learning
  rate a short sweep picks for it, no regularisation (no weight decay, no dropout, no
  augmentation but the mean), the same data order; training error per epoch, and the epochs
  (and seconds) each needs to reach 25% training error. The paper: ReLU about six times faster.
lrn (section 3.3): the net with and without response normalisation (cuda-convnet's 11% and 13%
  layer files), random 24x24 crops and reflections, weight decay on the locally connected and
  output layers as in those files; test error of each and the difference. The paper: 13% -> 11%.

Every training run ("fit") is stored in OUT/fits/<key>.json when it ends, keyed by everything
that decides its result, so an interrupted experiment run again skips the fits it finished, and
the sweep's runs are shared between experiments and seeds. Weights of the final runs are saved as
checkpoints (OUT/<variant>-seed<N>.safetensors) that `alexcli eval` scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from alexcli import augment as aug
from alexcli.env import device_name, tune_cpu
from alexcli.errors import Interrupted, UsageError
from alexcli.model.alexnet import build_model, count_parameters, make_arch
from alexcli.train import loader
from alexcli.train.loop import derive_seed
from alexcli.train.memory import InMemory, load_split
from alexcli.train.optim import PaperSGD, set_lr

EXPERIMENTS = ("relu-vs-tanh", "lrn")
TARGET_ERROR = 0.25     # Figure 1: epochs to reach 25% training error
RESULTS = "results.json"
FIGURES = {"relu-vs-tanh": "figure1.png", "lrn": "lrn.png"}

Progress = Callable[..., None]


@dataclass
class ExperimentConfig:
    data: str                               # prepared data set (alexcli prepare --size 32 --holdout 0.1)
    out: str                                # results.json, the figure, fits/, checkpoints
    epochs: int = 30
    seeds: int = 1                          # seeds 0..seeds-1; mean and spread over them
    subset: int = 0                         # training images used (0: all); the first ones of the shuffled shards
    batch: int = 128                        # cuda-convnet's minibatch for these nets
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)   # the sweep; one value: no sweep
    fixed_lrs: dict = field(default_factory=dict)  # variant -> lr (--lrs relu=0.003,tanh=0.01): no sweep
    sweep_epochs: int = 1
    momentum: float = 0.9
    weight_decay: float = 0.004             # lrn only: cuda-convnet's wc on local3, local4, fc10
    crop: int = 0                           # 0: 32 for relu-vs-tanh (whole images), 24 for lrn (random crops)
    norm: str = "lrn"                       # lrn: the normalisation compared with none
    width: float = 1.0
    device: str = "auto"
    target: float = TARGET_ERROR

    def validate(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, not {self.epochs}")
        if self.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, not {self.seeds}")
        if self.subset < 0:
            raise UsageError(f"--subset must be 0 (all) or more, not {self.subset}")
        if self.batch < 1:
            raise UsageError(f"--batch must be at least 1, not {self.batch}")
        if not (self.lrs or self.fixed_lrs) or any(lr <= 0 for lr in [*self.lrs, *self.fixed_lrs.values()]):
            raise UsageError(f"--lrs must be positive learning rates, not {','.join(map(str, self.lrs))}")
        if self.sweep_epochs < 1:
            raise UsageError(f"--sweep-epochs must be at least 1, not {self.sweep_epochs}")
        if not 0 < self.target < 1:
            raise UsageError(f"--target must be between 0 and 1, not {self.target}")
        device_name(self.device)  # an unknown or unavailable device fails here, before any work


@dataclass
class Plan:
    """One variant of an experiment: the net and how it is trained."""

    label: str
    arch_fields: dict
    augment: tuple[str, ...]
    weight_decay: float
    lr_drops: tuple[int, ...] = ()          # epochs after which lr /= 10
    test: bool = False                      # score the held-out split after every epoch


def plans(name: str, cfg: ExperimentConfig, crop: int) -> list[Plan]:
    if name == "relu-vs-tanh":
        # Figure 1: "no regularization of any kind"; the 13pct net (no normalisation)
        return [Plan(act, {"activation": act, "norm": "none", "crop": crop}, ("mean",), 0.0)
                for act in ("relu", "tanh")]
    if name == "lrn":
        drops = (max(1, round(cfg.epochs * 0.8)),) if cfg.epochs >= 5 else ()
        return [Plan(norm, {"activation": "relu", "norm": norm, "crop": crop}, ("mean", "crop", "flip"),
                     cfg.weight_decay, drops, test=True)
                for norm in (cfg.norm, "none")]
    raise UsageError(f"unknown experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")


# ---------------------------------------------------------------------------------------------
# one training run

class Fit:
    """Train one net on in-memory data; `history` has one row per epoch."""

    def __init__(self, plan: Plan, arch, train: InMemory, test: InMemory | None, stats: dict, *, lr: float,
                 epochs: int, seed: int, batch: int, momentum: float, device: torch.device):
        self.plan, self.arch, self.train, self.test = plan, arch, train, test
        self.lr, self.epochs, self.seed, self.batch, self.momentum, self.device = lr, epochs, seed, batch, momentum, device
        torch.manual_seed(derive_seed(seed, "init"))
        self.net, self.variants = build_model(arch)
        self.net.to(device)
        decayed, plain = (self.net.decayed_parameters() if hasattr(self.net, "decayed_parameters")
                          else (list(self.net.parameters()), []))
        groups = [{"params": decayed, "weight_decay": plan.weight_decay}]
        if plain:
            groups.append({"params": plain, "weight_decay": 0.0})
        self.opt = PaperSGD(groups, lr=lr, momentum=momentum, weight_decay=plan.weight_decay)
        ctx = aug.AugmentContext.from_stats(stats, arch.crop, device)
        self.mean_image = ctx.mean_image
        self.pipeline, self.augment_used = aug.build(list(plan.augment), ctx)

    def run(self, progress: Progress) -> dict:
        history, seconds, diverged = [], 0.0, False
        n = len(self.train)
        steps = -(-n // self.batch)
        lr = self.lr
        for epoch in range(1, self.epochs + 1):
            if epoch - 1 in self.plan.lr_drops:
                lr /= 10
                set_lr(self.opt, lr)
            t0 = time.perf_counter()
            loss_sum, wrong = self.train_epoch(epoch, steps, progress)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": loss_sum / n, "train_error": wrong / n, "lr": lr,
                   "seconds": seconds}
            if not math.isfinite(row["train_loss"]):
                diverged = True
            elif self.test is not None and self.plan.test:
                row["test_error"] = self.score(self.test)
            history.append(row)
            progress("epoch_end", label=self.plan.label, row=row)
            if diverged:
                break
        return {"history": history, "diverged": diverged}

    def train_epoch(self, epoch: int, steps: int, progress: Progress) -> tuple[float, float]:
        """One pass in a seeded order that depends on (seed, epoch) only: every variant of an
        experiment sees the same images in the same order."""
        self.net.train()
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, epoch, "order"))).to(self.device)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "augment"))
        torch.manual_seed(derive_seed(self.seed, epoch, "torch"))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        wrong = torch.zeros((), dtype=torch.int64, device=self.device)
        for step in range(steps):
            idx = order[step * self.batch:(step + 1) * self.batch]
            x = self.pipeline(aug.to_float(self.train.images[idx]), gen)
            if x.shape[-1] != self.arch.crop:
                x = aug.center_crop(x, self.arch.crop)
            y = self.train.labels[idx]
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_sum += loss.detach().double() * len(idx)
            wrong += (logits.detach().argmax(1) != y).sum()
            progress("step", label=self.plan.label)
        return float(loss_sum), float(wrong)

    @torch.no_grad()
    def score(self, data: InMemory, crops: str = "center") -> float:
        """Top-1 error on DATA: the mean image subtracted, the centre patch or the mean softmax of
        the ten patches (section 4.1)."""
        from alexcli.evaluate import model_probs

        self.net.eval()
        wrong = 0
        for i in range(0, len(data), 1000):
            probs = model_probs(self.net, aug.to_float(data.images[i:i + 1000]), self.mean_image, self.arch.crop, crops)
            wrong += int((probs.argmax(1) != data.labels[i:i + 1000]).sum())
        return wrong / len(data)


# ---------------------------------------------------------------------------------------------
# the experiment

def _fit_key(plan: Plan, arch, cfg: ExperimentConfig, lr: float, epochs: int, seed: int, fingerprint: str,
             n_train: int) -> str:
    what = {"arch": arch.to_dict(), "augment": list(plan.augment), "weight_decay": plan.weight_decay,
            "lr_drops": list(plan.lr_drops), "test": plan.test, "lr": lr, "epochs": epochs, "seed": seed,
            "batch": cfg.batch, "momentum": cfg.momentum, "data": fingerprint, "train_images": n_train, "v": 1}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def crossing(history: list[dict], target: float) -> tuple[float | None, float | None]:
    """(epochs, seconds) at which the training error first reaches TARGET, interpolated linearly
    between the ends of the two epochs around the crossing; the end of epoch 1 when the first
    epoch already reaches it; (None, None) when no epoch does."""
    prev_e, prev_err, prev_s = 0.0, None, 0.0
    for row in history:
        err, e, s = row["train_error"], float(row["epoch"]), row["seconds"]
        if err <= target:
            if prev_err is None or prev_err == err:
                return e, s
            f = (prev_err - target) / (prev_err - err)
            return prev_e + f * (e - prev_e), prev_s + f * (s - prev_s)
        prev_e, prev_err, prev_s = e, err, s
    return None, None


def _spread(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": values}


def _run(name: str, cfg: ExperimentConfig, progress: Progress | None) -> dict:
    from alexcli.data.shards import read_manifest, write_json_atomic

    progress = progress or (lambda *a, **k: None)
    cfg.validate()
    if name not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    t_start = time.perf_counter()
    device = torch.device(device_name(cfg.device))
    if device.type == "cpu":
        tune_cpu()
    manifest = read_manifest(cfg.data)
    size = int(manifest["parameters"]["size"])
    crop = cfg.crop or (32 if name == "relu-vs-tanh" else 24)
    if crop > size:
        raise UsageError(f"--crop {crop} is larger than the {size}x{size} images of {cfg.data}")
    the_plans = plans(name, cfg, crop)
    if cfg.fixed_lrs:
        labels = [p.label for p in the_plans]
        if sorted(cfg.fixed_lrs) != sorted(labels):
            given = ",".join(f"{k}={v:g}" for k, v in cfg.fixed_lrs.items())
            raise UsageError(f"--lrs {given}: give one rate for each of {', '.join(labels)} (or a list to sweep)")
    test_split = _test_split(cfg.data, manifest) if any(p.test for p in the_plans) else None
    train = load_split(cfg.data, "train", limit=cfg.subset,
                       progress=lambda d, n: progress("load", done=d, total=n)).to(device)
    test = load_split(cfg.data, test_split).to(device) if test_split else None
    stats = loader.load_data_stats(cfg.data)
    fingerprint = manifest.get("fingerprint", "")
    out = Path(cfg.out)
    (out / "fits").mkdir(parents=True, exist_ok=True)
    archs = {p.label: make_arch("cifar-local", num_classes=len(train.classes), width=cfg.width, **p.arch_fields)
             for p in the_plans}
    steps = -(-len(train) // cfg.batch)

    def fit(plan: Plan, lr: float, epochs: int, seed: int, save: Path | None = None) -> dict:
        arch = archs[plan.label]
        key = _fit_key(plan, arch, cfg, lr, epochs, seed, fingerprint, len(train))
        path = out / "fits" / f"{key}.json"
        if path.is_file() and (save is None or save.is_file()):
            done = json.loads(path.read_text(encoding="utf-8"))
            progress("cached", label=plan.label, steps=steps * epochs, lr=lr, seed=seed)
            return done
        progress("fit", label=plan.label, lr=lr, seed=seed, epochs=epochs)
        f = Fit(plan, arch, train, test, stats, lr=lr, epochs=epochs, seed=seed, batch=cfg.batch,
                momentum=cfg.momentum, device=device)
        result = f.run(progress)
        result.update(label=plan.label, lr=lr, seed=seed, epochs=epochs, arch=arch.to_dict(),
                      parameters=count_parameters(f.net))
        skipped = (epochs - len(result["history"])) * steps
        if skipped:
            progress("skip", steps=skipped)
        if save is not None and not result["diverged"]:
            if test is not None:
                result["test_error"] = f.score(test)
                result["test_error_ten"] = f.score(test, "ten")
            _save_weights(save, f, plan, arch, train, stats, cfg, manifest, result)
            result["checkpoint"] = str(save)
        write_json_atomic(path, result)
        return result

    sweeping = not cfg.fixed_lrs and len(cfg.lrs) > 1
    total = steps * (len(cfg.lrs) * cfg.sweep_epochs * len(the_plans) * sweeping
                     + cfg.epochs * cfg.seeds * len(the_plans))
    progress("start", total=total, train=len(train), test=len(test) if test is not None else 0, device=str(device),
             plans=[p.label for p in the_plans])

    # the learning rate of each variant: the one with the lowest training error after a short run
    chosen, sweeps = {}, {}
    for plan in the_plans:
        if not sweeping:
            chosen[plan.label] = cfg.fixed_lrs.get(plan.label) or cfg.lrs[0]
            continue
        rows = []
        for lr in cfg.lrs:
            r = fit(replace(plan, lr_drops=(), test=False), lr, cfg.sweep_epochs, 0)
            last = r["history"][-1]
            err = math.inf if r["diverged"] else last["train_error"]
            rows.append({"lr": lr, "train_error": None if math.isinf(err) else err, "diverged": r["diverged"]})
        best = min(rows, key=lambda row: (math.inf if row["train_error"] is None else row["train_error"], -row["lr"]))
        if best["train_error"] is None:
            raise UsageError(f"{plan.label}: every learning rate of --lrs diverged in the sweep; give smaller ones")
        chosen[plan.label] = best["lr"]
        sweeps[plan.label] = rows
        progress("chosen", label=plan.label, lr=best["lr"])

    runs: dict[str, list[dict]] = {p.label: [] for p in the_plans}
    for seed in range(cfg.seeds):
        for plan in the_plans:
            save = out / f"{plan.label}-seed{seed}.safetensors"
            runs[plan.label].append(fit(plan, chosen[plan.label], cfg.epochs, seed, save))
    return _finish(name, cfg, out, device, train, test, crop, chosen, sweeps, runs, t_start, the_plans)


def run_experiment(name: str, cfg: ExperimentConfig, progress: Progress | None = None) -> dict:
    """Run experiment NAME; returns (and writes to OUT/results.json) its summary. Interrupted, it
    keeps every finished training run in OUT/fits/ and says so; run again, it continues."""
    try:
        return _run(name, cfg, progress)
    except KeyboardInterrupt:
        done = len(list((Path(cfg.out) / "fits").glob("*.json")))
        raise Interrupted(f"interrupted: {done} finished training runs are kept in {Path(cfg.out) / 'fits'}; "
                          f"run the same command again to continue") from None


def _finish(name, cfg, out, device, train, test, crop, chosen, sweeps, runs, t_start, the_plans) -> dict:
    from alexcli.data.shards import write_json_atomic

    summary = {"experiment": name, "data": str(Path(cfg.data).resolve()), "device": str(device),
               "train_images": len(train), "test_images": len(test) if test is not None else 0,
               "config": {**asdict(cfg), "lrs": list(cfg.lrs), "crop": crop},
               "variants": {p.label: {"arch": runs[p.label][0]["arch"], "augment": list(p.augment),
                                      "weight_decay": p.weight_decay, "lr_drops_after_epochs": list(p.lr_drops)}
                            for p in the_plans},
               "learning_rates": chosen, "sweep": sweeps,
               "parameters": {k: v[0]["parameters"] for k, v in runs.items()},
               "runs": {k: [{kk: r.get(kk) for kk in ("seed", "lr", "diverged", "history", "test_error",
                                                       "test_error_ten", "checkpoint")} for r in v]
                        for k, v in runs.items()}}
    if name == "relu-vs-tanh":
        summary.update(_summarise_speed(runs, cfg.target, cfg.epochs))
    else:
        summary.update(_summarise_lrn(runs, cfg.norm))
    summary["figure"] = str(out / FIGURES[name])
    _plot(name, runs, cfg, out / FIGURES[name])
    summary["seconds"] = time.perf_counter() - t_start
    write_json_atomic(out / RESULTS, summary)
    return summary


def _test_split(folder: str, manifest: dict) -> str:
    for split in ("test", "val"):
        if manifest.get("splits", {}).get(split, {}).get("shards"):
            return split
    raise UsageError(f"{folder}: no val or test split to measure test error on; prepare it with "
                     f"--holdout 0.1 (CIFAR-10's training folder) or from a source with val/")


def _summarise_speed(runs: dict, target: float, epochs: int) -> dict:
    cross = {label: [crossing(r["history"], target) for r in rs] for label, rs in runs.items()}
    reach = {}
    for label, points in cross.items():
        ep, sec = zip(*points)
        reach[label] = {"epochs": _spread(list(ep)), "seconds": _spread(list(sec))}
    ratios, sratios = [], []
    for (e_relu, s_relu), (e_tanh, s_tanh) in zip(cross["relu"], cross["tanh"]):
        ratios.append(e_tanh / e_relu if e_relu and e_tanh else None)
        sratios.append(s_tanh / s_relu if s_relu and s_tanh else None)
    return {"target_error": target, "reach": reach, "ratio_epochs": _spread(ratios), "ratio_seconds": _spread(sratios),
            "paper_ratio": 6.0,
            "not_reached": {k: sum(v["epochs"]["values"][i] is None for i in range(len(v["epochs"]["values"])))
                            for k, v in reach.items()}}


def _summarise_lrn(runs: dict, norm: str) -> dict:
    out = {}
    for label, rs in runs.items():
        out[label] = {"test_error": _spread([r.get("test_error") for r in rs]),
                      "test_error_ten": _spread([r.get("test_error_ten") for r in rs])}
    diffs = [(b.get("test_error") - a.get("test_error")) if a.get("test_error") is not None
             and b.get("test_error") is not None else None for a, b in zip(runs[norm], runs["none"])]
    return {"test": out, "difference": _spread(diffs), "difference_means": "test error without minus with "
            f"{norm} (positive: normalisation helps)", "paper": {"none": 0.13, norm: 0.11}}


def _save_weights(path: Path, f: Fit, plan: Plan, arch, train: InMemory, stats: dict, cfg: ExperimentConfig,
                  manifest: dict, result: dict) -> None:
    from alexcli.train import checkpoint as ck

    variants = {**f.variants, **{f"augment:{k}": v for k, v in f.augment_used.items()}}
    last = result["history"][-1]
    meta = {"arch": arch.to_dict(), "variants": variants, "augment": list(plan.augment),
            "classes": train.classes, "class_names": list(manifest.get("class_names") or train.classes),
            "data": {"folder": str(Path(cfg.data).resolve()), "size": int(manifest["parameters"]["size"]),
                     "train_images": len(train)},
            "parameters": result["parameters"], "epoch": last["epoch"], "init": arch.init,
            "metrics": {"train_top1_error": last["train_error"], "train_loss": last["train_loss"],
                        "val_top1_error": result.get("test_error")},
            "experiment": {"variant": plan.label, "lr": result["lr"], "seed": result["seed"]}}
    ck.save_checkpoint(path, f.net.state_dict(), ck.stats_tensors(stats), meta)


def _plot(name: str, runs: dict, cfg: ExperimentConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = {0: "-", 1: "--"}
    for i, (label, rs) in enumerate(runs.items()):
        for k, r in enumerate(rs):
            h = r["history"]
            key = "train_error" if name == "relu-vs-tanh" else "test_error"
            xs = [0] + [row["epoch"] for row in h if key in row]
            ys = [1 - 1 / r["arch"]["num_classes"]] + [row[key] for row in h if key in row]  # epoch 0: chance
            ax.plot(xs, ys, styles.get(i, ":"), color="black" if i == 0 else "tab:gray",
                    alpha=1.0 if k == 0 else 0.4, label=f"{label} (lr {r['lr']:g})" if k == 0 else None)
    if name == "relu-vs-tanh":
        ax.axhline(cfg.target, color="tab:red", lw=0.8)
        ax.set(ylabel="training error rate", title="Figure 1: ReLU (solid) vs tanh (dashed)")
    else:
        ax.set(ylabel="test error rate (centre patch)", title=f"{runs and list(runs)[0]} (solid) vs none (dashed)")
    ax.set(xlabel="epochs", ylim=(0, 0.9), xlim=(0, cfg.epochs))
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
