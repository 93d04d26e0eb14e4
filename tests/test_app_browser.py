"""`musicgpt app` end to end in a real headless browser: upload a primer, Generate, hear it, download it.

Debian's chromium (/usr/bin/chromium) driven by playwright (pip); skipped where either, or gradio, is absent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pretty_midi
import pytest
from conftest import make_piece

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; playwright cannot download browsers in CI
ROOT = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

pytest.importorskip("gradio", reason="gradio not installed: pip install 'musicgpt[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install playwright")
if not CHROMIUM.is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until the page answers; fail early if the server died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer at {url} in {seconds:g} s")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python -m musicgpt app` on a free port, in an empty folder (so only the shipped model is offered)."""
    folder = tmp_path_factory.mktemp("app")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MUSICGPT_CACHE": str(folder / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "musicgpt", "app", "--no-browser", "--port", str(port)],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture
def page():
    """A headless chromium page that records every request leaving this machine."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.outside = []
            page.on("request", lambda r: page.outside.append(r.url)
                    if urlparse(r.url).scheme in ("http", "https", "ws", "wss")
                    and urlparse(r.url).hostname not in LOCAL_HOSTS else None)
            yield page
        finally:
            browser.close()


def test_upload_generate_listen_download(app_url, page, tmp_path):
    expect = sync_api.expect
    primer = make_piece(tmp_path / "primer.mid", seconds=6)
    page.goto(app_url)
    page.locator("input[type=file]").first.set_input_files(str(primer))
    expect(page.locator("#status")).to_contain_text("Primer: 5.9 s kept", timeout=60_000)
    seconds = page.get_by_label("length to generate (s)").first  # the slider's number box
    seconds.fill("3")
    seconds.press("Enter")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Generated: 1 variation", timeout=180_000)
    expect(page.locator("#audio-0 audio[src]")).to_have_count(1, timeout=30_000)  # the player has loaded the WAV
    expect(page.locator("#files-0 a[href$='.wav']")).to_be_visible()
    link = page.locator("#files-0 a[href$='.mid']")
    expect(link).to_be_visible()
    with page.expect_download() as download:
        link.click()
    midi = pretty_midi.PrettyMIDI(str(download.value.path()))
    notes = [n for inst in midi.instruments for n in inst.notes]
    assert notes and 6 < midi.get_end_time() <= 6 + 3 + 1  # the primer, then about 3 s of the model
    assert page.outside == []  # nothing fetched from the internet
