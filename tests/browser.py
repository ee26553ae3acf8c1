"""Shared by the browser tests: headless Chromium (Debian's `chromium`) driven by Playwright, or a clear skip.

Locally the tests skip when Chromium or Playwright is missing. CI sets PHASELEARN_REQUIRE_BROWSER=1 (see .ci/run),
which turns that skip into a failure: a browser test that CI did not run is a failed check, not a green one."""
import contextlib, functools, http.server, os, shutil, socket, threading
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / '_docs' / 'shots'
REQUIRED = os.environ.get('PHASELEARN_REQUIRE_BROWSER') == '1'


def need(condition: bool, why: str):
    "Skip (fail under PHASELEARN_REQUIRE_BROWSER=1) unless `condition`."
    if condition: return
    if REQUIRED: pytest.fail(f"{why} (PHASELEARN_REQUIRE_BROWSER=1 says this test must run)")
    pytest.skip(why)


def chromium_path() -> str:
    path = os.environ.get('PHASELEARN_CHROMIUM') or shutil.which('chromium') or shutil.which('chromium-browser')
    need(path is not None, "no Chromium: apt-get install chromium (Debian's browser; `playwright install` is not used)")
    return path


@contextlib.contextmanager
def chromium():
    "A headless Chromium browser (Playwright's `Browser`), closed afterwards."
    try: from playwright.sync_api import sync_playwright
    except ImportError: need(False, 'Playwright is not installed: pip install -e ".[docs]"')
    path = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=['--no-sandbox', '--disable-gpu'])
        try: yield browser
        finally: browser.close()


@contextlib.contextmanager
def serve(directory: Path):
    "Serve `directory` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try: yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown(); server.server_close(); thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def screenshot(page, name: str, **kwargs) -> Path:
    "Save a screenshot of `page` (or of `kwargs['element']`) to _docs/shots/NAME.png."
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    element = kwargs.pop('element', None)
    (element or page).screenshot(path=str(path), **kwargs)
    return path
