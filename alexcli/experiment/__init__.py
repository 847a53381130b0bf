"""`alexcli experiment`: the paper's CIFAR-10 side experiments, rerun on a prepared data set held
in memory. `plans` says what each compares (and imports no torch), `fit` trains one net with
alexcli's training step, `run` sweeps, repeats over seeds, keeps every finished fit and writes
the summary."""

RESULTS = "results.json"  # an experiment folder's summary, written last
FITS = "fits"             # its finished training runs, one JSON file each
MARKER = "experiment.json"  # what the folder holds: the experiment, its data set and settings (written first)
