"""Render a zar report (report.html) to a PNG in headless Chromium, as a reader's browser shows it.

    python scripts/render_report.py report.html report.png [--width 1200] [--height 7000]

The page is drawn in a window of the given size, then the blank space under its end is cut off.
Chromium comes from Debian's ``chromium`` package (or $CHROMIUM). The README's picture of the
digits study's report was made this way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageChops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_ui import find_chromium, render  # noqa: E402


def trim_bottom(path: Path, margin: int = 24) -> tuple[int, int]:
    """Cut the blank rows under the page's last content; returns the new size."""
    image = Image.open(path).convert("RGB")
    background = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    box = ImageChops.difference(image, background).getbbox()
    if box is not None:
        image = image.crop((0, 0, image.width, min(image.height, box[3] + margin)))
    image.save(path)
    return image.size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=7000, help="the window: taller than the page")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found: apt-get install chromium (or set CHROMIUM)", file=sys.stderr)
        return 1
    if not args.report.is_file():
        print(f"no report at {args.report}", file=sys.stderr)
        return 1
    render(chromium, args.report.resolve().as_uri(), args.png, budget_ms=2000, window=(args.width, args.height))
    width, height = trim_bottom(args.png)
    print(f"{args.png}: {width}x{height} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
