"""Running an experiment: the sweep, the final runs over seeds, the summary and its files.

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
from dataclasses import asdict, replace
from pathlib import Path

import torch

from alexcli import checkpoint as ck
from alexcli.choices import Experiment, choice
from alexcli.data.dataset import Split, has_split, load_stats, open_split, read_manifest
from alexcli.data.memory import InMemory, load_split
from alexcli.env import device_name, tune_cpu
from alexcli.errors import Interrupted, UsageError
from alexcli.events import Begin, Note, Progress, ignore
from alexcli.experiment import FITS, MARKER, RESULTS
from alexcli.experiment.fit import Fit
from alexcli.experiment.plans import PAPER_LRN, PAPER_SPEEDUP, ExperimentConfig, Plan, plans
from alexcli.io import write_json
from alexcli.model.registry import count_parameters, make_arch

FIGURES = {Experiment.relu_vs_tanh: "figure1.png", Experiment.lrn: "lrn.png"}
FIT_FORMAT = 1  # bump when a fit's result would change for the same key


# what the paper's CIFAR-10 runs used: a data set otherwise is told so (the figures then compare
# with nothing in the paper)
CIFAR_SIZE, CIFAR_CLASSES = 32, 10
# settings that make an experiment folder's results another experiment's (device, verify: not)
_SETTINGS = ("epochs", "seeds", "subset", "batch", "lrs", "fixed_lrs", "sweep_epochs", "momentum", "weight_decay",
             "crop", "norm", "width", "target")


def run_experiment(name: str, cfg: ExperimentConfig, progress: Progress = ignore, overwrite: bool = False) -> dict:
    """Run experiment NAME; returns (and writes to OUT/results.json) its summary. Interrupted, it
    keeps every finished training run in OUT/fits/ and says so; run again, it continues. An OUT
    holding another experiment, data set or settings is refused unless OVERWRITE, which removes
    that experiment's own files (results, figure, weights) first."""
    try:
        return _run(choice(Experiment, name, "experiment"), cfg, progress, overwrite)
    except KeyboardInterrupt:
        done = len(list((Path(cfg.out) / FITS).glob("*.json")))
        raise Interrupted(f"interrupted: {done} finished training runs are kept in {Path(cfg.out) / 'fits'}; "
                          f"run the same command again to continue") from None


_WEIGHTS = "*-seed*.safetensors"  # an experiment's final weights: OUT/<variant>-seed<N>.safetensors


def _claim(out: Path, marker: dict, overwrite: bool) -> list[str]:
    """Make OUT this experiment's: a folder holding the results or final weights of another
    experiment (another data set or settings) is refused, or with OVERWRITE those files are removed.
    fits/ stays either way: each fit is keyed by everything that decides it, so none can be mixed
    in, and a rerun with other settings (more epochs, say) reuses the sweep's. Then the marker is
    written (by the caller, once the data is read: a run refused before leaves nothing). Returns the
    names to remove before that."""
    held = None
    if (out / MARKER).is_file():
        try:
            held = json.loads((out / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            held = {}
    elif (out / RESULTS).is_file():
        held = {}  # results of an alexcli that wrote no marker: their settings are unknown
    finished = (out / RESULTS).is_file() or any(out.glob(_WEIGHTS))
    if held is not None and held != marker and finished:
        if not overwrite:
            theirs = held.get("settings", {})
            diff = [f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in marker["settings"].items() if theirs.get(k) != v]
            if held.get("experiment") != marker["experiment"]:
                diff.insert(0, f"experiment {held.get('experiment')!r}")
            if held.get("fingerprint") != marker["fingerprint"]:
                diff.insert(0, f"another data set ({held.get('data', 'unknown')})")
            raise UsageError(f"--out {out}: holds an experiment with other settings ({'; '.join(diff) or 'unknown'}); "
                             f"choose another --out, or pass --overwrite to replace its results")
        try:
            old = json.loads((out / RESULTS).read_text(encoding="utf-8")) if (out / RESULTS).is_file() else {}
        except (OSError, ValueError):
            old = {}
        own = [RESULTS, *FIGURES.values()] + [r.get("checkpoint") and Path(r["checkpoint"]).name
                                             for rs in (old.get("runs") or {}).values() for r in rs]
        own += [p.name for p in out.glob(_WEIGHTS) if held]  # an interrupted run's, named in no results yet
        return sorted(set(filter(None, own)))
    return []


def _run(name: Experiment, cfg: ExperimentConfig, progress: Progress, overwrite: bool = False) -> dict:
    cfg.validate()
    t_start = time.perf_counter()
    device = torch.device(device_name(cfg.device))
    if device.type == "cpu":
        tune_cpu()
    manifest = read_manifest(cfg.data)
    size = int(manifest["parameters"]["size"])
    crop = cfg.default_crop(name)
    if crop > size:
        raise UsageError(f"--crop {crop} is larger than the {size}x{size} images of {cfg.data}")
    the_plans = plans(name, cfg, crop)
    if cfg.fixed_lrs:
        labels = [p.label for p in the_plans]
        if sorted(cfg.fixed_lrs) != sorted(labels):
            given = ",".join(f"{k}={v:g}" for k, v in cfg.fixed_lrs.items())
            raise UsageError(f"--lrs {given}: give one rate for each of {', '.join(labels)} (or a list to sweep)")
    test_split = _test_split(cfg.data, manifest) if any(p.test for p in the_plans) else None
    train_split = open_split(cfg.data, "train", verify=False)  # what the saved checkpoints say they were trained on
    archs = {p.label: make_arch("cifar-local", num_classes=len(train_split.classes), width=cfg.width, **p.arch_fields)
             for p in the_plans}
    for arch in archs.values():  # a bad --width or --norm is refused before the data is read
        arch.validate()
    out = Path(cfg.out)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k in _SETTINGS}
    marker = {"experiment": name.value, "fingerprint": manifest.get("fingerprint", ""), "data": str(cfg.data),
              "settings": settings}
    replaced = _claim(out, marker, overwrite)  # another experiment's results in --out: refused before any work
    train = load_split(cfg.data, "train", limit=cfg.subset, progress=progress, verify=cfg.verify).to(device)
    test = load_split(cfg.data, test_split, verify=cfg.verify).to(device) if test_split else None
    stats = load_stats(cfg.data)
    (out / FITS).mkdir(parents=True, exist_ok=True)
    for old in replaced:
        (out / old).unlink(missing_ok=True)
    write_json(out / MARKER, marker)
    steps = -(-len(train) // cfg.batch)
    if size != CIFAR_SIZE or len(train_split.classes) != CIFAR_CLASSES:
        progress(Note(f"warning: {cfg.data} holds {len(train_split.classes)} classes of {size}x{size} images; the "
                      f"paper's runs were on CIFAR-10 ({CIFAR_CLASSES} classes of {CIFAR_SIZE}x{CIFAR_SIZE}), so "
                      f"these results do not compare with its numbers"))
    counter = {"run": 0}

    def fit(plan: Plan, lr: float, epochs: int, seed: int, save: Path | None = None) -> dict:
        arch = archs[plan.label]
        what = f"{plan.label} lr {lr:g} seed {seed}"
        path = out / FITS / f"{_fit_key(plan, arch, cfg, lr, epochs, seed, manifest, len(train))}.json"
        counter["run"] += 1
        run = f"run {counter['run']} of {total_runs}"
        if path.is_file() and (save is None or save.is_file()):
            progress(Note(f"{what} ({run}): done before, read from fits/"))
            return json.loads(path.read_text(encoding="utf-8"))
        progress(Begin(f"{what} ({run})", steps * epochs, unit="steps"))  # one bar per training run
        f = Fit(plan, arch, train, test, stats, lr=lr, epochs=epochs, seed=seed, batch=cfg.batch,
                momentum=cfg.momentum, device=device)
        result = f.run(progress)
        result.update(label=plan.label, lr=lr, seed=seed, epochs=epochs, arch=arch.to_dict(),
                      parameters=count_parameters(f.net))
        if save is not None and not result["diverged"]:
            if test is not None:
                result["test_error"] = f.score(test)
                result["test_error_ten"] = f.score(test, "ten")
            _save_weights(save, f, plan, arch, train, stats, train_split, manifest, result)
            result["checkpoint"] = str(save)
        write_json(path, result)
        return result

    sweeping = not cfg.fixed_lrs and len(cfg.lrs) > 1
    total_runs = len(the_plans) * (len(cfg.lrs) * sweeping + cfg.seeds)
    progress(Note(f"{', '.join(p.label for p in the_plans)} on {device}: {len(train):,} training images"
                  + (f", {len(test):,} test images" if test is not None else "") + f"; {total_runs} training runs"))

    # the learning rate of each variant: the one with the lowest training error after a short run
    chosen, sweeps = {}, {}
    for plan in the_plans:
        if not sweeping:
            chosen[plan.label] = cfg.fixed_lrs.get(plan.label) or cfg.lrs[0]
            continue
        rows = []
        for lr in cfg.lrs:
            r = fit(replace(plan, lr_drops=(), test=False), lr, cfg.sweep_epochs, 0)
            err = math.inf if r["diverged"] else r["history"][-1]["train_error"]
            rows.append({"lr": lr, "train_error": None if math.isinf(err) else err, "diverged": r["diverged"]})
        best = min(rows, key=lambda row: (math.inf if row["train_error"] is None else row["train_error"], -row["lr"]))
        if best["train_error"] is None:
            raise UsageError(f"{plan.label}: every learning rate of --lrs diverged in the sweep; give smaller ones")
        chosen[plan.label] = best["lr"]
        sweeps[plan.label] = rows
        progress(Note(f"{plan.label}: learning rate {best['lr']:g} chosen by the sweep"))

    runs: dict[str, list[dict]] = {p.label: [] for p in the_plans}
    for seed in range(cfg.seeds):
        for plan in the_plans:
            save = out / f"{plan.label}-seed{seed}.safetensors"
            runs[plan.label].append(fit(plan, chosen[plan.label], cfg.epochs, seed, save))
    return _finish(name, cfg, out, device, train, test, crop, chosen, sweeps, runs, t_start, the_plans)


def _fit_key(plan: Plan, arch, cfg: ExperimentConfig, lr: float, epochs: int, seed: int, manifest: dict,
             n_train: int) -> str:
    what = {"arch": arch.to_dict(), "augment": list(plan.augment), "weight_decay": plan.weight_decay,
            "lr_drops": list(plan.lr_drops), "test": plan.test, "lr": lr, "epochs": epochs, "seed": seed,
            "batch": cfg.batch, "momentum": cfg.momentum, "data": manifest.get("fingerprint", ""),
            "train_images": n_train, "v": FIT_FORMAT}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _test_split(folder: str, manifest: dict) -> str:
    for split in ("test", "val"):
        if has_split(manifest, split):
            return split
    raise UsageError(f"{folder}: no val or test split to measure test error on; prepare it with "
                     f"--holdout 0.1 (CIFAR-10's training folder) or from a source with val/")


def _save_weights(path: Path, f: Fit, plan: Plan, arch, train: InMemory, stats: dict, split: Split,
                  manifest: dict, result: dict) -> None:
    last = result["history"][-1]
    meta = ck.training_meta(
        arch=arch, variants=f.variants, augment=f.augment_used, split=split,
        manifest=manifest, parameters=result["parameters"], train_images=len(train), epoch=last["epoch"],
        metrics={"train_top1_error": last["train_error"], "train_loss": last["train_loss"],
                 "val_top1_error": result.get("test_error")},
        experiment={"variant": plan.label, "lr": result["lr"], "seed": result["seed"]})
    ck.save_checkpoint(path, f.net.state_dict(), ck.stats_tensors(stats), meta)


# ---------------------------------------------------------------------------------------------
# the summary

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


def _finish(name, cfg, out, device, train, test, crop, chosen, sweeps, runs, t_start, the_plans) -> dict:
    from alexcli.figures.plot import experiment_figure

    summary = {"experiment": name.value, "data": str(Path(cfg.data).resolve()), "device": str(device),
               "train_images": len(train), "test_images": len(test) if test is not None else 0,
               "config": {**asdict(cfg), "device": cfg.device.value, "lrs": list(cfg.lrs), "crop": crop},
               "variants": {p.label: {"arch": runs[p.label][0]["arch"], "augment": list(p.augment),
                                      "weight_decay": p.weight_decay, "lr_drops_after_epochs": list(p.lr_drops)}
                            for p in the_plans},
               "learning_rates": chosen, "sweep": sweeps,
               "parameters": {k: v[0]["parameters"] for k, v in runs.items()},
               "runs": {k: [{kk: r.get(kk) for kk in ("seed", "lr", "diverged", "history", "test_error",
                                                       "test_error_ten", "checkpoint")} for r in v]
                        for k, v in runs.items()}}
    if name == Experiment.relu_vs_tanh:
        summary.update(_summarise_speed(runs, cfg.target))
    else:
        summary.update(_summarise_lrn(runs, cfg.norm))
    summary["figure"] = str(out / FIGURES[name])
    experiment_figure(name.value, runs, cfg.epochs, cfg.target, out / FIGURES[name])
    summary["seconds"] = time.perf_counter() - t_start
    write_json(out / RESULTS, summary)
    return summary


def _summarise_speed(runs: dict, target: float) -> dict:
    """Figure 1: each variant's epochs and seconds to TARGET training error, computed once per run,
    and tanh's over relu's for each seed where both got there."""
    cross = {label: [crossing(r["history"], target) for r in rs] for label, rs in runs.items()}
    reach = {label: {"epochs": _spread([e for e, _ in points]), "seconds": _spread([s for _, s in points])}
             for label, points in cross.items()}
    ratios, sratios = [], []
    for (e_relu, s_relu), (e_tanh, s_tanh) in zip(cross["relu"], cross["tanh"]):
        ratios.append(e_tanh / e_relu if e_relu and e_tanh else None)
        sratios.append(s_tanh / s_relu if s_relu and s_tanh else None)
    return {"target_error": target, "reach": reach, "ratio_epochs": _spread(ratios), "ratio_seconds": _spread(sratios),
            "paper_ratio": PAPER_SPEEDUP,
            "not_reached": {k: sum(e is None for e, _ in points) for k, points in cross.items()}}


def _summarise_lrn(runs: dict, norm: str) -> dict:
    out = {}
    for label, rs in runs.items():
        out[label] = {"test_error": _spread([r.get("test_error") for r in rs]),
                      "test_error_ten": _spread([r.get("test_error_ten") for r in rs])}
    diffs = [(b.get("test_error") - a.get("test_error")) if a.get("test_error") is not None
             and b.get("test_error") is not None else None for a, b in zip(runs[norm], runs["none"])]
    return {"test": out, "difference": _spread(diffs), "difference_means": "test error without minus with "
            f"{norm} (positive: normalisation helps)", "paper": {"none": PAPER_LRN["none"], norm: PAPER_LRN["with"]}}
