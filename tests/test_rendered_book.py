"""The rendered book as a reader sees it: every page in headless Chromium with the network off.

Builds the book first (tools/build_book.py; a no-op when the build is current), serves _build/html on
127.0.0.1, and checks each page listed in _toc.yml: it loads, math is typeset by the vendored MathJax (no raw
TeX left in the text), every image loads, nothing is requested from outside, no console errors, and every
internal link (page and anchor) resolves, no code block is wider than the page at a 1280-px window (no horizontal
scrolling, hidden inputs opened), and no internal equation label (``eq-...``) reaches the text. Screenshots of the
landing page and the MNIST chapter are written to _build/screenshots/ as artifacts. Skipped only where Chromium is
absent; .ci/run installs it.
"""

import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

from tests.test_notebooks import toc_files

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_book", ROOT / "tools" / "build_book.py")
build_book = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_book)
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
PAGES = [f for f in toc_files()]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic",
        # network off: every host name but the local server's fails to resolve
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    missing: list[str] = []

    def log_message(self, *args):
        pass

    def send_error(self, code, *args, **kwargs):
        self.missing.append(f"{code} {self.path}")
        super().send_error(code, *args, **kwargs)


def book_env() -> dict[str, str]:
    """The environment of the book builds. `make test` runs nbval on another CPU code path (Makefile: OTHER_CPU);
    the book (and the student edition, which shares its execution cache) is built on this machine's own path, so
    every chapter runs on two paths. `make test CPU=other` builds on the other path as well."""
    env = dict(os.environ)
    if env.get("BNLIB_BOOK_CPU") != "other":
        for var in build_book.CPU_CODE_PATH_VARS:
            env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def site():
    build = subprocess.run([sys.executable, "tools/build_book.py"], cwd=ROOT, capture_output=True, text=True,
                           env=book_env())
    assert build.returncode == 0, f"book build failed:\n{build.stdout[-6000:]}\n{build.stderr[-3000:]}"
    handler = functools.partial(_Quiet, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


VISIBLE_TEXT = """() => { const c = document.querySelector('main') || document.body; const d = c.cloneNode(true);
  d.querySelectorAll('pre, code, script, style, .highlight, mjx-container, .cell_output').forEach(e => e.remove());
  return d.innerText; }"""


# Code blocks that scroll sideways at the viewport: inputs of code cells, literal blocks and outputs (outputs wrap
# by CSS, tools/sphinx_bnlib.py; code is wrapped in the source, 77 columns). Hidden blocks have zero width.
OVERFLOWING_CODE = """() => [...new Set(document.querySelectorAll('div.highlight pre, .cell_input pre'))]
  .filter(p => p.scrollWidth > p.clientWidth)
  .map(p => { const lines = p.textContent.split('\\n');
              const longest = lines.reduce((a, b) => b.length > a.length ? b : a, '');
              const sec = p.closest('section[id]');
              return `#${sec ? sec.id : '?'}: ${p.scrollWidth} > ${p.clientWidth} px, ` +
                     `longest line (${longest.length} chars): ${longest.trim().slice(0, 60)}`; })"""
MAIN_TEXT = "() => (document.querySelector('main') || document.body).innerText"


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(site, browser, page):
    url = urljoin(site, f"{page}.html")
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, outside = [], []
    tab.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    tab.on("request", lambda r: outside.append(r.url) if urlparse(r.url).hostname not in ("127.0.0.1", None) else None)
    tab.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    response = tab.goto(url, wait_until="load")
    assert response is not None and response.ok, f"{url}: HTTP {response and response.status}"

    n_math = tab.locator(".math").count()
    if n_math:
        tab.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=15000)
        tab.evaluate("() => MathJax.startup.promise")
        assert tab.locator("mjx-container").count() >= n_math, f"{page}: math not typeset by MathJax"
    text = tab.evaluate(VISIBLE_TEXT)
    raw_tex = [t for t in ("$$", "\\frac", "\\hat", "\\begin{") if t in text]
    assert not raw_tex, f"{page}: raw TeX left in the rendered text: {raw_tex}"

    broken = tab.evaluate("() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    assert not broken, f"{page}: images that did not load: {broken}"

    # every internal link resolves to a built page, and its anchor exists there
    hrefs = tab.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    bad = []
    for href in set(hrefs):
        u = urlparse(href)
        if u.hostname != "127.0.0.1":
            continue
        target = HTML / unquote(u.path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            bad.append(href)
        elif u.fragment and target.suffix == ".html":
            ids = set(re.findall(r'id="([^"]+)"', target.read_text(encoding="utf-8")))
            if unquote(u.fragment) not in ids:
                bad.append(href)
    assert not bad, f"{page}: links that do not resolve: {sorted(bad)[:10]}"

    assert not outside, f"{page}: requests to outside hosts: {outside[:5]}"
    assert not errors, f"{page}: {errors[:5]}"
    assert not _Quiet.missing, f"server 404s: {_Quiet.missing[:5]}"

    if page in ("index", "chapters/07_mnist"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(SHOTS / f"{Path(page).name}.png"), full_page=page != "index")

    # with every collapsed block opened (hide-input cells, dropdowns): code fits the page, and the text a reader
    # sees, code and outputs included, shows equation numbers, never the labels behind them
    tab.evaluate("() => document.querySelectorAll('details').forEach(d => { d.open = true; })")
    wide = tab.evaluate(OVERFLOWING_CODE)
    labels = sorted(set(re.findall(r"\beq-[\w-]+", tab.evaluate(MAIN_TEXT))))
    tab.close()
    assert not labels, f"{page}: internal equation labels in the page text: {labels}"
    assert not wide, f"{page}: {len(wide)} code blocks scroll sideways at 1280 px: {wide[:8]}"


def test_sidebar_lists_every_page(site, browser):
    tab = browser.new_page()
    tab.goto(urljoin(site, "index.html"))
    hrefs = tab.evaluate("() => [...document.querySelectorAll('nav.bd-links a[href]')].map(a => a.getAttribute('href'))")
    listed = {h.split("#")[0].removesuffix(".html") for h in hrefs}
    missing = [p for p in PAGES[1:] if p not in listed]
    assert not missing, f"the navigation does not link {missing}"
    tab.close()


def test_student_edition_has_exercises_but_no_solutions(site):
    """`make student` (tools/build_book.py --student): same exercises, every solution gone, code included."""
    build = subprocess.run([sys.executable, "tools/build_book.py", "--student"], cwd=ROOT, capture_output=True,
                           text=True, env=book_env())
    assert build.returncode == 0, f"student build failed:\n{build.stdout[-6000:]}\n{build.stderr[-3000:]}"
    student = ROOT / "_build" / "student" / "_build" / "html"
    for page in [p for p in PAGES if re.fullmatch(r"chapters/0\d_\w+", p)]:
        full, stud = (d.joinpath(f"{page}.html").read_text(encoding="utf-8") for d in (HTML, student))
        n_ex = full.count('class="exercise')
        assert n_ex >= 4, f"{page}: {n_ex} exercises in the book (4-8 per chapter)"
        assert stud.count('class="exercise') == n_ex, f"{page}: the student edition lost exercises"
        assert full.count('class="solution') == n_ex, f"{page}: every exercise has a solution in the book"
        assert 'class="solution' not in stud and "solution-content" not in stud, f"{page}: solution in student edition"
