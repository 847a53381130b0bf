"""A run that sits at chance is told so: the watch, and what `alexcli train` prints and records."""

import json
import math

import pytest

from alexcli.train.chance import ChanceWatch
from conftest import TINY_TRAIN, run_here

LN8 = math.log(8)


def test_watch_records_the_first_window_below_095_ln_classes():
    w = ChanceWatch(8, after=30)
    assert w.threshold == pytest.approx(0.95 * LN8)
    assert [w.update(s, loss) for s, loss in ((10, 2.2), (20, 2.08), (30, 1.99))] == [None, None, "stuck"]
    assert w.at_chance and w.left_step is None
    assert w.row() == {"left_chance_step": None, "at_chance": True}
    assert w.update(40, 2.5) is None  # told once
    assert w.update(50, 0.95 * LN8 - 1e-9) == "left"
    assert w.row() == {"left_chance_step": 50, "at_chance": False}
    assert w.update(60, 3.0) is None and w.left_step == 50  # the first crossing is kept


def test_watch_state_round_trips_and_zero_never_warns():
    w = ChanceWatch(10, after=5)
    w.update(10, 2.3)
    again = ChanceWatch(10, after=5)
    again.load_state_dict(json.loads(json.dumps(w.state_dict())))
    assert again.warned and again.at_chance and again.update(20, 2.3) is None
    quiet = ChanceWatch(10, after=0)
    assert quiet.update(10_000, 2.3) is None and not quiet.at_chance


def tiny_at_chance(data, out, *extra):
    """A run that cannot leave chance: the paper's biases make every logit alike and lr 1e-9 keeps them so."""
    args = [a for a in TINY_TRAIN if a not in ("--init", "kaiming")]
    return run_here("train", "--data", data, "--out", out, *args, "--init", "paper", "--lr", "1e-9",
                    "--chance-steps", "8", *extra)


def test_a_run_at_chance_is_told_so_once_and_its_rows_say_so(train_data, tmp_path):
    r = tiny_at_chance(train_data, tmp_path / "flat", "--epochs", "3")
    assert r.returncode == 0, r.stderr
    line = "the training loss has not fallen below chance (ln 8 = 2.079) in 12 steps"
    assert r.stderr.count(line) == 1, r.stderr  # 6 steps per epoch: told at the check after step 8 (step 12)
    assert "Try another --init (it is paper; kaiming leaves chance within the first steps)" in r.stderr
    rows = [json.loads(x) for x in (tmp_path / "flat" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["left_chance_step"], m["at_chance"]) for m in rows] == [(None, False), (None, True), (None, True)]
    assert all(m["train_loss"] > 0.95 * LN8 for m in rows)
    assert any(ln.startswith("epoch   3") and ln.endswith("(at chance)") for ln in r.stderr.splitlines()), r.stderr

    # resumed, the run remembers it was told: no second warning, the same rows
    part = tmp_path / "part"
    assert tiny_at_chance(train_data, part, "--epochs", "2").returncode == 0
    r = tiny_at_chance(train_data, part, "--epochs", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert line not in r.stderr
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [(m["left_chance_step"], m["at_chance"]) for m in resumed] == [(m["left_chance_step"], m["at_chance"])
                                                                        for m in rows]
