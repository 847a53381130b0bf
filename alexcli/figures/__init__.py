"""The paper's qualitative results (section 6.1) and the pictures of runs, from any checkpoint:
`predict` (Figure 4, left), `kernels` (Figure 3), `neighbors` (Figure 4, right) and `plot` (the
matplotlib side every picture shares: training curves, the experiments' figures). Nothing here
prints; every picture is written atomically as PNG."""
