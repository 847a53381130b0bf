"""Defaults of the commands whose settings have no config dataclass (eval, ensemble, predict,
kernels, neighbors, verify): the command line's options and the library functions' signatures both
read them here, so the two cannot drift apart. (train, prepare and experiment keep theirs in
`TrainConfig`, `PrepareConfig` and `ExperimentConfig`.) No imports: `--help` stays fast."""

EVAL_SPLIT = "val"        # eval and ensemble score the held-out split
BATCH = 128               # images per forward pass in eval, ensemble and neighbors (x10 patches with --crops ten)
AUTO_WORKERS = -1         # decoding processes: -1 lets alexcli.data.stream.loader_workers choose
PREDICT_TOP = 5           # predict's classes per image (the paper's top-5)
NEIGHBORS_K = 6           # neighbours per query (Figure 4 shows six)
NEIGHBORS_SPLIT = "train"  # Figure 4 searches the training set
