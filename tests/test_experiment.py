"""`alexcli experiment`: the paper's CIFAR-10 experiments end to end on a tiny generated set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alexcli.data.prepare import PrepareConfig, prepare
from alexcli.experiment.fit import Fit
from alexcli.experiment.plans import ExperimentConfig, plans
from alexcli.experiment.run import crossing
from alexcli.data import dataset
from alexcli.data.memory import load_split
from alexcli.model.registry import make_arch
from conftest import not_one_of, out_of_range, run_here, says
from test_cifar import write_cifar_like

FAST = ["--batch", "16", "--sweep-epochs", "1"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar-like")
    src = write_cifar_like(root / "src", classes=4, per_class=24)
    out = root / "cifar"
    prepare(src, out, PrepareConfig(size=32, holdout=0.25, shard_size=32, workers=1))
    return out


def test_crossing_interpolates_between_epochs():
    h = [{"epoch": 1, "train_error": 0.5, "seconds": 10.0}, {"epoch": 2, "train_error": 0.3, "seconds": 20.0},
         {"epoch": 3, "train_error": 0.2, "seconds": 30.0}]
    assert crossing(h, 0.25) == pytest.approx((2.5, 25.0))
    assert crossing(h, 0.5) == (1.0, 10.0)
    assert crossing(h, 0.1) == (None, None)
    # reached in the first epoch: interpolated from nothing learnt at epoch 0 is not assumed
    assert crossing([{"epoch": 1, "train_error": 0.2, "seconds": 5.0}], 0.25) == (1.0, 5.0)


def test_variants_see_the_same_images_in_the_same_order(cifar, monkeypatch):
    cfg = ExperimentConfig(data=str(cifar), out="unused", batch=8)
    train = load_split(cifar, "train")
    stats = dataset.load_stats(cifar)
    seen = {}
    for plan in plans("relu-vs-tanh", cfg, 32):
        fit = Fit(plan, make_arch("cifar-local", num_classes=4, **plan.arch_fields), train, None, stats, lr=0.01,
                  epochs=2, seed=3, batch=8, momentum=0.9, device=torch.device("cpu"))
        batches = []
        real = fit.net.forward
        monkeypatch.setattr(fit.net, "forward", lambda x, real=real, b=batches: (b.append(x.clone()), real(x))[1])
        fit.run(lambda *a, **k: None)
        seen[plan.label] = torch.cat(batches)
    assert seen["relu"].shape == (2 * len(train), 3, 32, 32)
    assert torch.equal(seen["relu"], seen["tanh"])


def test_relu_vs_tanh_end_to_end_and_resumes_from_finished_fits(cifar, tmp_path):
    out = tmp_path / "rvt"
    # learning rates at which both nets learn this tiny set (none diverges) and reach 50% training error
    args = ["experiment", "relu-vs-tanh", "--data", cifar, "--out", out, "--epochs", "4", "--lrs", "0.003,0.01",
            "--target", "0.5", *FAST]
    r = run_here(*args, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res == json.loads((out / "results.json").read_text())
    assert res["train_images"] == 72 and set(res["learning_rates"]) == {"relu", "tanh"}
    # Figure 1: no regularisation of any kind, whole images, no normalisation
    for label in ("relu", "tanh"):
        v = res["variants"][label]
        assert (v["augment"], v["weight_decay"], v["arch"]["activation"], v["arch"]["norm"], v["arch"]["crop"]) == \
            (["mean"], 0.0, label, "none", 32)
    for label in ("relu", "tanh"):
        sweep = res["sweep"][label]
        assert [row["lr"] for row in sweep] == [0.003, 0.01]
        finite = [row for row in sweep if row["train_error"] is not None]
        # the lowest training error after the sweep's epoch wins; a tie goes to the larger rate
        assert res["learning_rates"][label] == min(finite, key=lambda row: (row["train_error"], -row["lr"]))["lr"]
        (run,) = res["runs"][label]
        assert not run["diverged"] and [row["epoch"] for row in run["history"]] == [1, 2, 3, 4]
        assert Path(run["checkpoint"]).is_file()
        want = crossing(run["history"], 0.5)
        assert want[0] is not None, run["history"]  # the target is reached, so the ratio below is computed
        assert res["reach"][label]["epochs"]["values"] == [want[0]]
        assert res["reach"][label]["seconds"]["values"] == [want[1]]
    e_relu, e_tanh = res["reach"]["relu"]["epochs"]["mean"], res["reach"]["tanh"]["epochs"]["mean"]
    assert res["ratio_epochs"]["values"] == [pytest.approx(e_tanh / e_relu)] and res["not_reached"] == {"relu": 0,
                                                                                                       "tanh": 0}
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "relu" in r.stderr and "chosen by the sweep" in r.stderr

    # run again: every fit is read back from fits/, nothing is trained, the results are the same
    again = run_here(*args, "--json")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("done before, read from fits/") == 6  # 2 x 2 sweep runs, 2 final runs
    assert "epoch   1" not in again.stderr
    res2 = json.loads(again.stdout)
    for k in ("learning_rates", "reach", "ratio_epochs", "runs"):
        assert res2[k] == res[k]


def test_lrn_end_to_end_and_checkpoints_score_the_same_in_eval(cifar, tmp_path):
    out = tmp_path / "lrn"
    r = run_here("experiment", "lrn", "--data", cifar, "--out", out, "--epochs", "3", "--lrs", "0.002", "--seeds", "2",
                *FAST)
    assert r.returncode == 0, r.stderr
    assert "without - with normalisation" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["test_images"] == 24 and res["learning_rates"] == {"lrn": 0.002, "none": 0.002}
    assert res["sweep"] == {}  # one learning rate: no sweep
    for label in ("lrn", "none"):
        v = res["variants"][label]
        assert (v["augment"], v["weight_decay"], v["arch"]["norm"], v["arch"]["crop"]) == \
            (["mean", "crop", "flip"], 0.004, label, 24)
    from alexcli.evaluate import score

    val = dataset.open_split(cifar, "val")
    for label in ("lrn", "none"):
        errors = [run["test_error"] for run in res["runs"][label]]
        # each run's test error is what an independent eval of its saved weights gives on the 24 test images
        scored = [score([run["checkpoint"]], val)["models"][0]["top1_error"] for run in res["runs"][label]]
        assert errors == scored and all((e * 24).is_integer() for e in errors)
        ten = [score([run["checkpoint"]], val, crops="ten")["models"][0]["top1_error"] for run in res["runs"][label]]
        assert [run["test_error_ten"] for run in res["runs"][label]] == ten
        assert res["test"][label]["test_error"]["mean"] == pytest.approx(sum(errors) / 2)
        assert all(run["history"][-1]["test_error"] == run["test_error"] for run in res["runs"][label])
    diffs = [b["test_error"] - a["test_error"] for a, b in zip(res["runs"]["lrn"], res["runs"]["none"])]
    assert res["difference"]["values"] == pytest.approx(diffs)
    # the saved weights are an ordinary checkpoint: alexcli eval gives the same centre-patch error
    ckpt = out / "lrn-seed1.safetensors"
    e = run_here("eval", ckpt, "--data", cifar, "--json")
    assert e.returncode == 0, e.stderr
    scored = json.loads(e.stdout)
    assert scored["images"] == 24
    assert scored["models"][0]["top1_error"] == pytest.approx(res["runs"]["lrn"][1]["test_error"])


def test_bad_input_is_one_line_and_exit_2(cifar, prepared, tmp_path):
    r = run_here("experiment", "dropout", "--data", cifar)
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert says(err, not_one_of("NAME", "dropout", "'relu-vs-tanh', 'lrn'")), err
    assert err.endswith(". (see: alexcli experiment --help)"), err
    r = run_here("experiment", "lrn", "--data", cifar, "--lrs", "fast")
    assert r.returncode == 2 and r.stderr.strip() == ("error: --lrs 'fast': expected learning rates like 0.001,0.01 "
                                                      "or relu=0.003,tanh=0.01")
    for lrs in ("0.003,,0.01", "relu=0.003,,tanh=0.01", "0.01,"):  # an empty entry: an error, not dropped
        r = run_here("experiment", "lrn", "--data", cifar, "--lrs", lrs)
        assert r.returncode == 2 and r.stderr.strip() == (f"error: --lrs {lrs!r}: an empty entry between commas; "
                                                          "expected learning rates like 0.001,0.01 or relu=0.003,tanh=0.01")
    r = run_here("experiment", "relu-vs-tanh", "--data", cifar, "--lrs", "relu=0.003", "--out", tmp_path / "z")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --lrs relu=0.003: give one rate for each of relu, tanh (or a list to sweep)"
    r = run_here("experiment", "lrn", "--data", cifar, "--norm", "batchnorm-typo")
    assert r.returncode == 2 and "unknown norm 'batchnorm-typo'" in r.stderr
    r = run_here("experiment", "relu-vs-tanh", "--data", cifar, "--crop", "40", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--crop 40 is larger than the 32x32 images" in r.stderr
    no_val = tmp_path / "noval"
    prepare(cifar.parent / "src", no_val, PrepareConfig(size=32, workers=1))
    r = run_here("experiment", "lrn", "--data", no_val, "--out", tmp_path / "y", "--lrs", "0.01")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {no_val}: no val or test split to measure test error on; prepare it with "
                                "--holdout 0.1 (CIFAR-10's training folder) or from a source with val/")
    r = run_here("experiment", "lrn", "--data", tmp_path / "missing")
    assert r.returncode == 2 and "missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a width the net cannot have is refused before the data is read (it printed "32 training images" and a bar)
    r = run_here("experiment", "relu-vs-tanh", "--data", cifar, "--width", "0", "--out", tmp_path / "w")
    assert r.returncode == 2 and r.stderr.strip() == "error: --width must be in (0, 4], not 0.0"
    assert not (tmp_path / "w").exists()
    r = run_here("experiment", "relu-vs-tanh", "--data", cifar, "--target", "1.5")
    assert r.returncode == 2 and says(r.stderr, out_of_range("--target", 1))


def test_one_learning_rate_per_variant_skips_the_sweep(cifar, tmp_path):
    r = run_here("experiment", "relu-vs-tanh", "--data", cifar, "--out", tmp_path / "o", "--epochs", "1",
                "--lrs", "relu=0.002,tanh=0.02", "--batch", "16", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["learning_rates"] == {"relu": 0.002, "tanh": 0.02} and res["sweep"] == {}
    assert [run["lr"] for run in res["runs"]["tanh"]] == [0.02]
    assert "chosen by the sweep" not in r.stderr


def test_help_has_an_example():
    r = run_here("experiment", "--help")
    assert r.returncode == 0 and "alexcli experiment relu-vs-tanh --data shards/cifar10" in r.stdout


# `alexcli experiment` that stops in its second training run once the first one is stored, writes
# a marker and waits there, so Ctrl-C arrives at a known point however loaded the machine is
# (a fixed sleep, or a poll for the first fit, raced the next fits and the end of the run).
EXPERIMENT_HELD = """
import signal, sys, time
from pathlib import Path
from alexcli.experiment.fit import Fit
# Ctrl-C raises KeyboardInterrupt, as in a terminal, even where the test runner was started with
# SIGINT ignored (a background job of a script), which its children would inherit.
signal.signal(signal.SIGINT, signal.default_int_handler)
marker, argv = Path(sys.argv[1]), sys.argv[2:]
real, calls = Fit.run, []
def run(self, progress):
    calls.append(1)
    if len(calls) == 2:  # the first fit is in fits/: it is written before the next one starts
        marker.write_text("held")
        time.sleep(3600)  # Ctrl-C (SIGINT) ends this with KeyboardInterrupt, as it would a fit
    return real(self, progress)
Fit.run = run
from alexcli.cli import main
sys.exit(main(argv))
"""


def test_interrupted_experiment_keeps_finished_runs_and_continues(cifar, tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import RUN_TIMEOUT, wait_for

    out = tmp_path / "int"
    marker = tmp_path / "held"
    args = ["experiment", "relu-vs-tanh", "--data", str(cifar), "--out", str(out), "--epochs", "40",
            "--lrs", "0.003,0.01", *FAST]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:  # a file, not a pipe that nobody reads while it runs
        p = subprocess.Popen([sys.executable, "-c", EXPERIMENT_HELD, str(marker), *args], stdout=subprocess.DEVNULL,
                             stderr=err)
        try:
            wait_for(marker.exists, p, "the experiment finished its first training run", log=log)
            p.send_signal(signal.SIGINT)
            p.wait(timeout=RUN_TIMEOUT)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    stderr = log.read_text()
    assert p.returncode == 130, stderr
    kept = len(list((out / "fits").glob("*.json")))
    assert kept == 1  # the one it finished before the Ctrl-C, no more, no fewer
    assert stderr.strip().splitlines()[-1] == (f"error: interrupted: {kept} finished training runs are kept in "
                                               f"{out / 'fits'}; run the same command again to continue")
    assert not (out / "results.json").exists()
    # run again with fewer epochs for the final runs: the sweep runs already done are read back
    r = run_here("experiment", "relu-vs-tanh", "--data", cifar, "--out", out, "--epochs", "2", "--lrs", "0.003,0.01",
                *FAST)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("done before, read from fits/") >= kept
    assert (out / "results.json").is_file()


def _speed_result(relu_epochs, tanh_epochs, seeds=1):
    """A relu-vs-tanh summary as run_experiment returns it, each variant's epochs to 25% per seed."""
    from alexcli.experiment.run import _spread

    def spread(values):
        return _spread(list(values))

    pairs = list(zip(relu_epochs, tanh_epochs))
    ratio = [t / r if r and t else None for r, t in pairs]
    return {"experiment": "relu-vs-tanh", "train_images": 45000, "device": "cpu", "seconds": 60.0,
            "config": {"epochs": 30, "seeds": seeds}, "learning_rates": {"relu": 0.01, "tanh": 0.01},
            "target_error": 0.25, "paper_ratio": 6.0, "figure": "runs/x/figure1.png",
            "reach": {"relu": {"epochs": spread(relu_epochs), "seconds": spread(e and e * 10 for e in relu_epochs)},
                      "tanh": {"epochs": spread(tanh_epochs), "seconds": spread(e and e * 10 for e in tanh_epochs)}},
            "ratio_epochs": spread(ratio), "ratio_seconds": spread(ratio),
            "not_reached": {"relu": sum(e is None for e in relu_epochs), "tanh": sum(e is None for e in tanh_epochs)}}


def test_summary_says_plainly_when_the_target_was_not_reached(capsys):
    from alexcli.cli.experiment import render

    render(_speed_result([5.0], [None]))
    text = " ".join(capsys.readouterr().out.split())  # the console wraps at 80 columns when piped
    assert "relu: 25% training error after 5.00 epochs, 50.00 s" in text
    assert "tanh: did not reach 25% training error in 30 epochs" in text
    assert "tanh / relu: no ratio, since no seed had both reach 25% in 30 epochs (paper: about 6x); try more " \
           "--epochs" in text
    assert "not reached" not in text and "not reachedx" not in text

    render(_speed_result([5.0, 6.0, 4.0], [12.0, None, 10.0], seeds=3))
    text = " ".join(capsys.readouterr().out.split())
    assert "tanh: 25% training error after 11.00 ± 1.41 (n=2) epochs" in text
    assert "1 of 3 seeds did not reach it in 30 epochs" in text
    assert "tanh / relu: 2.45 ± 0.07 (n=2)x the epochs" in text


def test_an_out_holding_another_experiment_is_refused_and_overwrite_replaces_it(cifar, tmp_path):
    """The default --out was silently overwritten and left mixed (new results.json beside the last
    run's checkpoints of another data set)."""
    out = tmp_path / "e"
    base = ["experiment", "relu-vs-tanh", "--data", cifar, "--out", out, "--lrs", "relu=0.01,tanh=0.01",
            "--batch", "16", "--target", "0.9"]
    r = run_here(*base, "--epochs", "1", "--seeds", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert "tanh lr 0.01 seed 1 (run 4 of 4)" in r.stderr  # each bar is one training run, numbered
    assert {p.name for p in out.glob("*-seed*.safetensors")} == {"relu-seed0.safetensors", "relu-seed1.safetensors",
                                                                  "tanh-seed0.safetensors", "tanh-seed1.safetensors"}
    r = run_here(*base, "--epochs", "2", "--seeds", "1")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: --out {out}: holds an experiment with other settings (epochs 1 (now 2); "
                                "seeds 2 (now 1)); choose another --out, or pass --overwrite to replace its results")
    r = run_here(*base, "--epochs", "2", "--seeds", "1", "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.glob("*-seed*.safetensors")} == {"relu-seed0.safetensors", "tanh-seed0.safetensors"}
    assert json.loads((out / "results.json").read_text())["config"]["epochs"] == 2
    r = run_here(*base, "--epochs", "2", "--seeds", "1", "--json")  # the same settings again: continues
    assert r.returncode == 0 and r.stderr.count("done before, read from fits/") == 2, r.stderr


def test_data_that_is_not_cifar10_is_told_so(train_data, tmp_path):
    r = run_here("experiment", "relu-vs-tanh", "--data", train_data, "--out", tmp_path / "e", "--epochs", "1",
                 "--lrs", "relu=0.01,tanh=0.01", "--batch", "16", "--subset", "16", "--json")
    assert r.returncode == 0, r.stderr
    assert (f"warning: {train_data} holds 8 classes of 72x72 images; the paper's runs were on CIFAR-10 (10 classes "
            "of 32x32), so these results do not compare with its numbers") in r.stderr
