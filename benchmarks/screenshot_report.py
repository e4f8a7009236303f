"""Screenshots of a search's outputs for the docs: report.html rendered by headless chromium, and pareto.png.

    python benchmarks/screenshot_report.py RUN_DIR [--out docs/images] [--width 1280] [--max-height 3600]

Writes OUT/report.png (the page, cropped to its content, at most --max-height pixels tall) and OUT/pareto.png
(the run's plot), both reduced to a 256-colour palette so they stay small (the README links them).
Needs chromium (`apt-get install -y chromium`) or google-chrome on PATH.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    raise SystemExit(f"error: no headless browser on PATH (tried {', '.join(BROWSERS)}); "
                     "install one, e.g. `apt-get install -y chromium`")


def screenshot(html: Path, out: Path, width: int, height: int) -> None:
    """Render `html` at width x height CSS pixels into the PNG `out` (headless, no sandbox: runs as root too)."""
    cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--screenshot={out}", f"--window-size={width},{height}", html.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    if not out.is_file():
        raise SystemExit(f"error: {cmd[0]} wrote no screenshot for {html}")


def shrink(src: Path, dst: Path, max_height: int | None = None) -> int:
    """Crop trailing white space (and to `max_height`), reduce to a 256-colour palette; returns the bytes."""
    from PIL import Image, ImageOps

    img = Image.open(src).convert("RGB")
    box = ImageOps.invert(img).getbbox()  # the non-white content
    if box is not None:
        img = img.crop((0, 0, img.width, min(img.height, box[3] + 24)))
    if max_height is not None and img.height > max_height:
        img = img.crop((0, 0, img.width, max_height))
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
    return dst.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--max-height", type=int, default=3600)
    args = ap.parse_args()
    report, plot = args.run_dir / "report.html", args.run_dir / "pareto.png"
    for f in (report, plot):
        if not f.is_file():
            print(f"error: {f} does not exist; run `slimformer report {args.run_dir}` first", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "report.png"
        screenshot(report, raw, args.width, args.max_height + 400)
        n = shrink(raw, args.out / "report.png", args.max_height)
    print(f"wrote {args.out / 'report.png'} ({n:,d} bytes)")
    n = shrink(plot, args.out / "pareto.png")
    print(f"wrote {args.out / 'pareto.png'} ({n:,d} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
