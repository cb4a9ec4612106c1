"""Render a quality report's report.html in headless Chromium and save a screenshot.

Checks that the self-contained page opens offline and that its embedded figures display.
Chromium only takes a screenshot of its window, so the window is made tall enough for the
whole page (``--height``). The script then also cuts the screenshot into tiles of
``--tile-height`` pixels, which an image viewer shows at full resolution.

Usage::

    python scripts/render_report.py runs/demo/report/report.html --output /tmp/report.png

Needs a Chromium binary (Debian: ``apt-get install chromium``) and Pillow for the tiles.
The test suite does not use this script.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("render_report")

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags that keep headless Chromium from reaching the network or writing outside its
# temporary profile.
BROWSER_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--disable-extensions", "--mute-audio",
)


def find_browser(name: str | None) -> str:
    candidates = (name,) if name else BROWSER_NAMES
    for candidate in candidates:
        path = shutil.which(candidate)
        if path:
            return path
    raise SystemExit(f"no Chromium binary found (tried {', '.join(candidates)}); install it with "
                     "apt-get install -y chromium or pass --browser PATH")


def screenshot(html_path: Path, output: Path, browser: str, width: int, height: int, timeout_s: float) -> None:
    """Open ``html_path`` as a file:// URL in headless Chromium and write a PNG of the window."""
    with tempfile.TemporaryDirectory(prefix="render-report-") as profile:
        command = [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={output}", html_path.resolve().as_uri()]
        logger.info("running %s", " ".join(command))
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if completed.returncode != 0 or not output.is_file():
        raise SystemExit(f"Chromium failed with exit code {completed.returncode}: {completed.stderr.strip()[-2000:]}")


def cut_tiles(image_path: Path, tile_height: int) -> list[Path]:
    """Cut the screenshot into horizontal tiles, dropping trailing blank ones; return their paths."""
    from PIL import Image, ImageChops

    tiles = []
    with Image.open(image_path) as image:
        rgb = image.convert("RGB")
        background = Image.new("RGB", rgb.size, (255, 255, 255))
        box = ImageChops.difference(rgb, background).getbbox()
        content_bottom = box[3] if box else rgb.height
        for number, top in enumerate(range(0, content_bottom, tile_height), start=1):
            tile = rgb.crop((0, top, rgb.width, min(top + tile_height, content_bottom)))
            path = image_path.with_name(f"{image_path.stem}_part{number}.png")
            tile.save(path)
            tiles.append(path)
    return tiles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path, help="report.html to render")
    parser.add_argument("--output", type=Path, default=None,
                        help="screenshot PNG (default: report_screenshot.png next to the HTML file)")
    parser.add_argument("--browser", default=None, help="Chromium binary (default: first of %s on PATH)"
                        % ", ".join(BROWSER_NAMES))
    parser.add_argument("--width", type=int, default=1280, help="window width in pixels (default: 1280)")
    parser.add_argument("--height", type=int, default=9000,
                        help="window height in pixels; make it taller than the page (default: 9000)")
    parser.add_argument("--tile-height", type=int, default=1400,
                        help="height in pixels of each tile cut from the screenshot; 0 skips tiles (default: 1400)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds Chromium may take (default: 120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if not args.html.is_file():
        raise SystemExit(f"{args.html} not found; build it first with anomalyforge report RUN_DIR")
    output = args.output or args.html.with_name("report_screenshot.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    screenshot(args.html, output, find_browser(args.browser), args.width, args.height, args.timeout)
    print(output)
    if args.tile_height > 0:
        for tile in cut_tiles(output, args.tile_height):
            print(tile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
