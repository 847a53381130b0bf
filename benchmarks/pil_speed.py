"""How fast is the PIL in this environment at prepare's kind of work? Run it in two environments
(one with pillow-simd, one with plain Pillow) over the same photos and compare the rates:

  .venv/bin/python benchmarks/pil_speed.py DIR            # pillow-simd (scripts/setup.sh)
  /path/to/pillow-venv/bin/python benchmarks/pil_speed.py DIR   # needs only Pillow

DIR is an extracted train/<class>/<image> tree (e.g. the ImageNet sample archive, extracted), or
such a tree as an archive (extracted to a temporary folder first); without DIR, the archive
$ALEXCLI_SAMPLE_TAR names.
Two pipelines, one core, sources in memory, best of --repeat: "obvious" (open, convert, resize the
shorter side to 256 with the default filter, centre crop, JPEG q90) and "decode+encode" (the
floor: decode, encode a 256x256 crop). Needs nothing but PIL, so any environment can run it;
benchmarks/prepare.py imports the same two functions, and times `pil_speed.py --script SRC OUT`
(the obvious loop as a whole program that writes the images) against `alexcli prepare`.
"""

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from _data import SAMPLE_ENV, source_tree  # (benchmarks/_data.py: the standard library only)

S = 256


def obvious(data: bytes) -> bytes:
    """Decode, resize so the shorter side is 256 with the default filter (bicubic), centre crop, encode."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = S / min(w, h)
    im = im.resize((max(S, round(w * s)), max(S, round(h * s))))
    w, h = im.size
    left, top = (w - S) // 2, (h - S) // 2
    buf = io.BytesIO()
    im.crop((left, top, left + S, top + S)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def floor(data: bytes) -> bytes:
    """Decode fully (convert forces it) and encode a 256x256 crop (padded black if smaller); no resize."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    buf = io.BytesIO()
    im.crop((0, 0, S, S)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def obvious_script(src: Path, out: Path) -> int:
    """The obvious whole program: walk SRC/train/<class>/*, obvious() each file, write
    OUT/<class>/<stem>.JPEG; files PIL cannot read are skipped. Returns the images written."""
    n = 0
    for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir()):
            try:
                jpg = obvious(f.read_bytes())
            except OSError:
                continue
            (out / cls.name / (f.stem + ".JPEG")).write_bytes(jpg)
            n += 1
    return n


def main() -> None:
    if sys.argv[1:2] == ["--script"]:  # benchmarks/prepare.py times this as a whole process
        print(obvious_script(Path(sys.argv[2]), Path(sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, nargs="?",
                    help=f"train/<class>/<image> photos: a folder or an archive [default: ${SAMPLE_ENV}]")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="alexcli-pil-speed-"))
    try:
        # a folder is taken as it is (any tree of images); an archive must hold train/<class>/<image>
        root, why = (args.dir, "") if args.dir and args.dir.is_dir() else source_tree(args.dir, SAMPLE_ENV, "DIR", tmp)
        if root is None:
            sys.exit(f"error: {why}: give DIR (the ImageNet sample, extracted) or set ${SAMPLE_ENV}")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        datas = [p.read_bytes() for p in files]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"PIL {Image.__version__} ({'pillow-simd' if 'post' in Image.__version__ else 'Pillow'}), "
          f"Python {sys.version.split()[0]}, {len(datas)} images")
    for name, fn in (("obvious", obvious), ("decode+encode", floor)):
        best = 0.0
        for _ in range(args.repeat):
            t = time.perf_counter()
            for d in datas:
                fn(d)
            best = max(best, len(datas) / (time.perf_counter() - t))
        print(f"{name:<14} {best:8.1f} images/s")


if __name__ == "__main__":
    main()
