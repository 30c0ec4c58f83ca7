"""An HTML page as headless Chromium lays it out: what is visible, at what size, and a screenshot.

`probe(page, width)` loads a copy of the page with a script appended that measures, once the
page has loaded, every table, image and heading as rendered (bounding boxes, computed styles,
decoded image sizes) and writes the figures into the page; Chromium's --dump-dom returns the
page after that script ran. Run as a script it writes a screenshot:
`python tests/render_page.py runs/offline/report/report.html shot.png [width]`.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
# --no-sandbox: Chromium refuses to run as root (CI containers) with its sandbox on.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
         "--no-first-run", "--disable-extensions", "--virtual-time-budget=15000"]

PROBE = """<script>
addEventListener("load", () => {
  const shown = el => { const r = el.getBoundingClientRect(), s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== "hidden" && s.display !== "none" && +s.opacity > 0; };
  const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top + scrollY, r.width, r.height]; };
  const probe = {
    viewport: innerWidth, page_width: document.documentElement.scrollWidth,
    page_height: document.documentElement.scrollHeight,
    body_font_px: parseFloat(getComputedStyle(document.body).fontSize),
    headings: [...document.querySelectorAll("h1, h2, h3")].map(h => [h.tagName, h.innerText, shown(h)]),
    tables: [...document.querySelectorAll("table")].map(t => ({
      shown: shown(t), box: box(t), scroll_box: t.parentElement.getBoundingClientRect().width,
      scrolls: getComputedStyle(t.parentElement).overflowX, cls: t.className,
      head: t.tHead ? [...t.tHead.rows[0].cells].map(c => c.innerText) : [],
      rows: [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.innerText)),
      cell_font_px: t.tBodies[0].rows.length ? parseFloat(getComputedStyle(t.tBodies[0].rows[0].cells[0]).fontSize) : 0})),
    images: [...document.images].map(i => ({shown: shown(i), box: box(i), natural: [i.naturalWidth, i.naturalHeight],
      decoded: i.complete && i.naturalWidth > 0, alt: i.alt})),
    links: [...document.querySelectorAll("nav a")].map(a => [a.innerText, !!document.getElementById(a.hash.slice(1))]),
  };
  const pre = document.createElement("pre");
  pre.id = "dalign-probe";
  pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
});
</script>"""


def _run(args: list[str], timeout: int = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing of another run's state
        done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def probe(page: Path, width: int = 1280, height: int = 900) -> dict:
    """The rendered page's figures (see PROBE) at a window of width x height."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "page.html"
        copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
        dom = _run([f"--window-size={width},{height}", "--dump-dom", copy.as_uri()])
    found = re.search(r'<pre id="dalign-probe">(.*?)</pre>', dom, re.S)
    if found is None:
        raise RuntimeError("the probe script did not run: the page did not finish loading")
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, width: int = 1280) -> Path:
    """The whole page, `width` pixels wide, as a PNG."""
    height = probe(page, width)["page_height"]
    _run([f"--window-size={width},{height}", f"--screenshot={out.resolve()}", page.resolve().as_uri()])
    return out


if __name__ == "__main__":
    print(screenshot(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1280))
