"""Training: `config` (every setting and its default), `optim` (the paper's SGD and schedules),
`step` (one SGD step and one epoch, shared with `alexcli experiment` and the benchmarks), `loop`
(one rank's run, top to bottom) and `launch` (the run folder and the ranks)."""
