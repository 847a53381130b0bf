"""How much a checkpoint's response normalisation does: the LRN divisor on real inputs.

LRN divides each activation by (k + alpha * sum of squares of its neighbours)^beta. Where the
activations are small next to sqrt(k / alpha) the sum vanishes and LRN is the constant factor
k^-beta, i.e. no normalisation at all. This prints, for each normalisation layer (norm1, norm2)
of a checkpoint, the divisor relative to that constant, (input / output) / k^beta, at every
positive activation of N images of a split (centre patches, as eval feeds them): its median,
99th percentile and maximum. 1.000 everywhere means the layer only multiplies by k^-beta.

  .venv/bin/python scripts/lrn_divisor.py runs/demo/seed0/ckpt-e030.safetensors --data shards/demo
  .venv/bin/python scripts/lrn_divisor.py runs/cifar/lrn-seed0.safetensors --data shards/cifar10 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexcli.data import dataset, stream  # noqa: E402
from alexcli.evaluate import load_scored  # noqa: E402
from alexcli.transforms import model_input, to_float  # noqa: E402

NORMS = ("norm1", "norm2")


def lrn_constants(module: torch.nn.Module) -> tuple[float, float] | None:
    """(k, beta) of the LRN inside MODULE (AlexNet's per-column wrapper or a plain layer)."""
    for m in module.modules():
        if hasattr(m, "k") and hasattr(m, "beta"):
            return float(m.k), float(m.beta)
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, required=True, help="the prepared data set the checkpoint was trained on")
    p.add_argument("--split", default="val", help="split to draw the images from [default: %(default)s]")
    p.add_argument("--images", type=int, default=64, help="images [default: %(default)s]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if not args.checkpoint.is_file():
        p.error(f"{args.checkpoint}: no such checkpoint")
    scored = load_scored(args.checkpoint, "cpu")
    model = scored.model.eval()
    layers = {n: getattr(model, n) for n in NORMS if hasattr(model, n)}
    consts = {n: lrn_constants(m) for n, m in layers.items()}
    layers = {n: m for n, m in layers.items() if consts[n] is not None}
    if not layers:
        p.error(f"{args.checkpoint}: the network has no LRN layer (norm1/norm2 with k and beta)")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name):
        k, beta = consts[name]

        def record(_m, inputs, out):
            x = inputs[0].double()
            keep = x > 1e-6  # after ReLU: the positive activations, where input/output is defined
            seen[name].append((x[keep] / out.double()[keep]) / k ** beta)
        return record
    for name, m in layers.items():
        m.register_forward_hook(hook(name))
    split = dataset.open_split(args.data, args.split)
    n = 0
    with torch.no_grad():
        for images, _ in stream.batches(split, min(64, args.images), train=False, workers=0):
            x = images[: args.images - n]
            model(model_input(to_float(x), scored.mean_image, scored.crop))
            n += len(x)
            if n >= args.images:
                break
    result = {"checkpoint": str(args.checkpoint), "split": args.split, "images": n,
              "input_scale": scored.meta["arch"].get("input_scale", 1.0), "layers": {}}
    for name, parts in seen.items():
        d = torch.cat(parts)
        sample = d[torch.randperm(len(d), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        result["layers"][name] = {"k_beta": consts[name], "values": len(d),
                                  "median": float(sample.median()), "p99": float(sample.quantile(0.99)),
                                  "max": float(d.max())}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.checkpoint}: {n} {args.split} images, input scale {result['input_scale']:g}; "
              f"LRN divisor / k^beta at the positive activations:")
        for name, r in result["layers"].items():
            print(f"  {name}: median {r['median']:.4f}, 99th percentile {r['p99']:.4f}, max {r['max']:.4f} "
                  f"({r['values']:,} values)")
    return result


if __name__ == "__main__":
    main()
