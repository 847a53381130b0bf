"""The networks: `arch` (the `Arch` every checkpoint stores), `registry` (an Arch -> a module, from
the registered architecture and layer variants), `alexnet` (section 3.5), `cifar` (the CIFAR-10 net
of Figure 1 and section 3.3), `columns` (the paper's two-GPU split) and `layers` (the built-in
layer variants). Nothing is imported here, so `alexcli.model.arch` stays free of torch."""
