#!/usr/bin/env python3
"""Render a steercmp report.html in headless Chromium and check that every chart drew.

Usage: python scripts/check_report_render.py RUN_DIR/report/report.html [--screenshot OUT.png]

Loads the file offline (network disabled), lets the page's JavaScript run under a virtual time
budget, dumps the DOM and checks that every ``<div class="vega-chart">`` holds an ``<svg>``
(or ``<canvas>``) with drawn marks and no ``data-error``. Exits 0 when all charts drew,
1 when some did not, 2 when Chromium is missing or fails. Installs Debian's ``chromium`` with
apt-get if it is not on PATH (needs root and the Debian mirror).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-features=NetworkService", "--hide-scrollbars",
]
#: data marks (not axes, legends or group containers): e.g. class="mark-rect role-mark ..."
MARK_CLASS = re.compile(r"\bmark-(?!group\b)\w+\b.*\brole-mark\b")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if path:
            return path
    return None


def ensure_chromium() -> str:
    path = find_chromium()
    if path:
        return path
    print("chromium not found; installing with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False)
    path = find_chromium()
    if not path:
        print("error: chromium is not installed; fix: apt-get install -y chromium", file=sys.stderr)
        sys.exit(2)
    return path


def run_chromium(chromium: str, html: Path, extra: list[str], budget_ms: int) -> str:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", *extra, html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        print(f"error: chromium exited {proc.returncode}: {proc.stderr[-2000:]}", file=sys.stderr)
        sys.exit(2)
    return proc.stdout


class ChartScanner(HTMLParser):
    """Collects, per ``vega-chart`` div, whether it holds an svg/canvas and how many marks."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict] = {}
        self._stack: list[str | None] = []  # chart id owning each open div, else None
        self._current: str | None = None
        self._g_stack: list[bool] = []  # per open <g>: is it a data-mark group?

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        a = dict(attrs)
        if tag == "div":
            cls = a.get("class") or ""
            if "vega-chart" in cls.split():
                cid = a.get("id") or f"chart-{len(self.charts)}"
                self.charts[cid] = dict(svg=False, canvas=False, marks=0, items=0,
                                        error=a.get("data-error"))
                self._stack.append(cid)
                self._current = cid
            else:
                self._stack.append(None)
            return
        if self._current is None:
            return
        info = self.charts[self._current]
        if tag == "svg":
            info["svg"] = True
        elif tag == "canvas":
            info["canvas"] = True
        if any(self._g_stack) and tag in ("path", "rect", "circle", "line", "text", "g"):
            info["items"] += 1  # a drawn item inside a data mark
        if tag == "g":
            is_mark = bool(MARK_CLASS.search(a.get("class") or ""))
            info["marks"] += is_mark
            self._g_stack.append(is_mark)

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag == "g" and self._g_stack:
            self._g_stack.pop()
        if tag == "div" and self._stack:
            cid = self._stack.pop()
            if cid is not None:
                self._current = next((c for c in reversed(self._stack) if c), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--screenshot", type=Path, help="also save a full-page PNG here")
    ap.add_argument("--width", type=int, default=1300)
    ap.add_argument("--height", type=int, default=6000)
    ap.add_argument("--budget-ms", type=int, default=15000)
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html} not found; fix: run `steercmp report RUN_DIR` first",
              file=sys.stderr)
        return 2
    chromium = ensure_chromium()
    dom = run_chromium(chromium, args.html, ["--dump-dom"], args.budget_ms)
    scanner = ChartScanner()
    scanner.feed(dom)
    if not scanner.charts:
        print("FAIL: no vega-chart containers found in the rendered DOM")
        return 1
    failed = []
    for cid, info in scanner.charts.items():
        drew = (info["canvas"] or (info["svg"] and info["marks"] > 0 and info["items"] > 0)) \
            and not info["error"]
        status = "ok" if drew else "FAIL"
        print(f"{status:4s} {cid}: svg={info['svg']} canvas={info['canvas']} "
              f"data marks={info['marks']} items={info['items']}" + (f" error={info['error']}" if info["error"] else ""))
        if not drew:
            failed.append(cid)
    if args.screenshot:
        run_chromium(chromium, args.html,
                     [f"--screenshot={args.screenshot.resolve()}",
                      f"--window-size={args.width},{args.height}"], args.budget_ms)
        print(f"screenshot: {args.screenshot}")
    if failed:
        print(f"FAIL: {len(failed)} of {len(scanner.charts)} charts did not draw: {', '.join(failed)}")
        return 1
    print(f"OK: all {len(scanner.charts)} charts drew")
    return 0


if __name__ == "__main__":
    sys.exit(main())
