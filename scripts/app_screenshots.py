"""Screenshots of `musicgpt app` before and after Generate, and the time from pressing Generate to playable audio.

Starts the app on a free port, opens it in headless chromium (playwright, `--chromium` path),
drops a shipped primer, sets the length, presses Generate --runs times and prints each time from
the click to the audio player holding the rendered WAV. Run from the repository root:

    python scripts/app_screenshots.py [--seconds 30] [--runs 2] [--out samples]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

PRIMER = "musicgpt/primers/Beethoven_Piano_Sonata_No_3_Op_2_No_3_3asWeutbY0c_cut_midi-first40s.mid"


def start_app() -> tuple[subprocess.Popen, str]:
    """`python -m musicgpt app` on a free port, once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "musicgpt", "app", "--no-browser", "--port", str(port)])
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not start")


def fill(page, label: str, value: float) -> None:
    box = page.get_by_label(label).first
    box.fill(str(value))
    box.press("Enter")


def generate_once(page, seconds: float, seed: int) -> float:
    """Press Generate with `seed` and wait for that result's status line and audio player; the seconds it took."""
    fill(page, "length to generate (s)", seconds)
    page.get_by_text("decoding knobs and musical limits").click()
    fill(page, "seed (-1: a new one)", seed)
    page.get_by_text("decoding knobs and musical limits").click()
    start = time.perf_counter()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text(f"seed {seed}.", timeout=600_000)
    expect(page.locator("#audio-0 audio[src]")).to_have_count(1, timeout=60_000)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("samples"))
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    proc, url = start_app()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(PRIMER)
            expect(page.locator("#status")).to_contain_text("Primer:", timeout=60_000)
            page.screenshot(path=str(args.out / "app-before.png"), full_page=True)
            times = []
            for _ in range(args.runs):
                times.append(generate_once(page, args.seconds, 1000 + len(times)))
                page.wait_for_timeout(1500)  # let the waveform draw before the picture
            page.screenshot(path=str(args.out / "app-after.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"Generate to playable audio, {args.seconds:g} s of music: "
          + ", ".join(f"{t:.1f} s" for t in times)
          + f" ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})")


if __name__ == "__main__":
    main()
