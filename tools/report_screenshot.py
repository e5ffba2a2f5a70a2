"""Screenshot a dissection report (OUT_DIR/index.html) in headless Chromium, to look at it without a desktop.

    python tools/report_screenshot.py /tmp/report_demo docs/report.png
    python tools/report_screenshot.py /tmp/report_demo /tmp/lower.png --top 2000   # a view further down

Needs a Chromium binary (``apt-get install -y chromium``). The PNG is re-saved with PIL (optimised, and
reduced to a 256-colour palette when it is over ``--max-kb``), so a screenshot can be committed as docs.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(f"no Chromium found (looked for {', '.join(BROWSERS)}); install it: apt-get install -y chromium")


def screenshot(out_dir: Path, png: Path, size: str = "1400,1000", top: int = 0, max_kb: int = 400) -> Path:
    """Render ``out_dir/index.html`` at ``size`` (width,height), ``top`` pixels down the page, and write
    ``png``; returns its path.

    Scrolling is done by rendering a taller window and cropping: headless Chromium paints nothing for a
    page opened at a ``#fragment`` further down.
    """
    page = Path(out_dir).resolve() / "index.html"
    if not page.is_file():
        raise SystemExit(f"{page} does not exist; write a report first, e.g. python dissect.py describe ... "
                         f"--output_dir {out_dir}")
    try:
        width, height = (int(v) for v in size.split(","))
    except ValueError:
        raise SystemExit(f"--size must be WIDTH,HEIGHT in pixels, e.g. 1400,1000; got {size!r}") from None
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        # --virtual-time-budget: wait for the images and the script before painting
        cmd = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=10000", f"--user-data-dir={tmp}/profile",
               f"--window-size={width},{height + top}", f"--screenshot={shot}", page.as_uri()]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if not shot.is_file():
            raise SystemExit(f"Chromium wrote no screenshot (exit {run.returncode}):\n{run.stderr[-2000:]}")
        data = _compress(shot.read_bytes(), max_kb, top)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp_png = png.with_name(f".{png.name}.tmp")
    tmp_png.write_bytes(data)
    os.replace(tmp_png, png)
    return png


def _compress(data: bytes, max_kb: int, top: int = 0) -> bytes:
    """The shot below ``top`` as an optimised PNG; a 256-colour palette version if still over ``max_kb``."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    img = img.crop((0, top, img.width, img.height))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if buf.tell() > max_kb * 1024:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="report folder holding index.html")
    p.add_argument("png", type=Path, help="screenshot to write")
    p.add_argument("--size", default="1400,1000", help="window width,height in pixels")
    p.add_argument("--top", type=int, default=0, help="start this many pixels down the page")
    p.add_argument("--max-kb", type=int, default=400, help="palette-reduce PNGs larger than this")
    a = p.parse_args(argv)
    path = screenshot(a.out_dir, a.png, a.size, a.top, a.max_kb)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
