"""The docs site in a real browser, and nbdev's doc processor on every chapter.

The site tests read `_docs/site/` as `phaselearn_docs` built it (CI builds it first), serve it on 127.0.0.1 and load
pages in headless Chromium: navigation, show_doc signatures, plots, widgets, search, and no request leaving the site.
Screenshots go to _docs/shots/."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
from browser import ROOT, need, chromium, serve, screenshot

SITE = ROOT / '_docs' / 'site'
CHAPTERS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if p.stem != 'index')


def page_name(path: Path) -> str: return re.sub(r'^\d+_', '', path.stem) + '.html'


def test_proc_nbs_every_chapter(tmp_path):
    "nbdev's `proc_nbs` (what `nbdev_docs` runs before Quarto) processes every notebook without an error."
    shutil.copytree(ROOT / 'nbs', tmp_path / 'nbs')
    shutil.copy(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'MPLBACKEND': 'Agg'}
    code = "from nbdev.serve import proc_nbs; proc_nbs(n_workers=2, force=True)"
    run = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    done = {p.name for p in (tmp_path / '_proc').glob('*.ipynb')}
    assert done == {p.name for p in (ROOT / 'nbs').glob('*.ipynb')}, done
    learner = json.loads((tmp_path / '_proc' / '07_learner.ipynb').read_text())
    shown = [''.join(o['data']['text/markdown']) for c in learner['cells'] for o in c.get('outputs', [])
             if 'text/markdown' in o.get('data', {})]
    assert any('### Learner.fit' in s for s in shown), "show_doc of Learner.fit was not rendered by nbdev's processor"


@pytest.fixture(scope='module')
def site():
    need(SITE.joinpath('index.html').exists(), f"no docs site in {SITE}: build it with `phaselearn_docs`")
    outside = []
    with chromium() as browser, serve(SITE) as url:
        page = browser.new_page(viewport={'width': 1280, 'height': 900})
        page.on('request', lambda r: None if r.url.startswith(('http://127.0.0.1', 'data:', 'blob:')) else outside.append(r.url))
        yield page, url, outside
        page.close()


def load(page, url):
    page.goto(url, wait_until='load')
    page.wait_for_load_state('networkidle')


def test_navigation_lists_every_chapter(site):
    page, url, outside = site
    load(page, f"{url}/index.html")
    screenshot(page, 'index')
    links = page.eval_on_selector_all('nav.md-nav--primary a.md-nav__link', 'els => els.map(e => e.getAttribute("href"))')
    missing = [page_name(p) for p in CHAPTERS if not any(l and l.endswith(page_name(p)) for l in links)]
    assert not missing, f"chapters missing from the navigation: {missing}"
    order = [next(i for i, l in enumerate(links) if l and l.endswith(page_name(p))) for p in CHAPTERS]
    assert order == sorted(order), "the navigation does not list the chapters in order"
    assert 'A first fit' in page.inner_text('article'), "the home page is not the README's content"
    assert not outside, outside


def test_show_doc_signature_and_anchor(site):
    page, url, outside = site
    load(page, f"{url}/learner.html#learner.fit")
    heading = page.locator('h3', has_text='Learner.fit').first
    heading.scroll_into_view_if_needed()
    screenshot(page, 'learner')
    text = page.inner_text('article')
    assert re.search(r'def fit\(\s*n_epoch', text), "no show_doc signature for Learner.fit"
    assert page.locator('[id="learner.fit"]').count() == 1, "no anchor named as nbdev's doc links name it"
    from phaselearn.docs import is_test_cell
    inputs = page.locator('.jp-CodeCell .jp-InputArea-editor').all_inner_texts()
    assert inputs, "no code cell found on the Learner page"
    shown_tests = [s for s in inputs if is_test_cell(s)]
    assert not shown_tests, f"test-only cells are shown in the docs: {shown_tests[:2]}"
    assert not outside, outside


def test_plots_load(site):
    page, url, outside = site
    load(page, f"{url}/phases.html")
    sizes = page.eval_on_selector_all('article img', 'els => els.map(e => [e.complete, e.naturalWidth])')
    assert any(done and width > 0 for done, width in sizes), f"no plot image loaded on the phases page: {sizes}"
    page.locator('article img').first.scroll_into_view_if_needed()
    screenshot(page, 'phases')
    assert not outside, outside


def test_widgets_render_from_saved_state(site):
    page, url, outside = site
    load(page, f"{url}/widgets.html")
    slider = page.locator('.widget-hslider').first
    slider.wait_for(state='visible', timeout=60_000)
    slider.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    screenshot(page, 'widgets')
    assert page.locator('.widget-hslider').count() >= 3
    assert 'cannot redraw' in page.inner_text('article'), "the widgets page does not say what a static page cannot do"
    assert page.locator('script[src*="embed-amd.js"]').count() == 1
    load(page, f"{url}/learner.html")      # no widgets there: no 3.6 MB widget bundle either
    assert page.locator('script[src*="embed-amd.js"]').count() == 0
    assert not outside, outside


def test_search_finds_onecycle(site):
    page, url, outside = site
    load(page, f"{url}/index.html")
    page.click('label.md-search__icon, .md-search__input', timeout=10_000)
    box, result = page.locator('input.md-search__input'), page.locator('.md-search-result__link').first
    for attempt in range(3):  # the search worker answers only queries typed after its index is built: type again until then
        box.fill('')
        box.press_sequentially('OneCycle', delay=50)
        try: result.wait_for(state='visible', timeout=10_000); break
        except Exception:
            if attempt == 2: raise
    screenshot(page, 'search')
    hrefs = page.eval_on_selector_all('.md-search-result__link', 'els => els.map(e => e.getAttribute("href"))')
    assert any('phases.html' in h for h in hrefs), hrefs
    assert not outside, outside


def test_no_page_names_a_cdn():
    need(SITE.joinpath('index.html').exists(), f"no docs site in {SITE}: build it with `phaselearn_docs`")
    from phaselearn.docs import cdn_references
    assert cdn_references(SITE) == []


def test_no_transient_progress_bar_in_pages():
    "tqdm bars made with leave=False (hidden when done, or stopped short and red) are not saved into any page."
    need(SITE.joinpath('index.html').exists(), f"no docs site in {SITE}: build it with `phaselearn_docs`")
    from phaselearn.docs import _transient_bar
    pattern = re.compile(r'<script type="application/vnd.jupyter.widget-state\+json">(.*?)</script>', re.S)
    bars, pages_with_state = [], 0
    for page in SITE.glob('*.html'):
        for blob in pattern.findall(page.read_text()):
            pages_with_state += 1
            state = json.loads(blob)['state']
            bars += [(page.name, mid) for mid in state if _transient_bar(state, mid)]
    assert pages_with_state >= 1, "no page carries widget state: the widgets chapter was not executed with store_widget_state"
    assert not bars, f"transient progress bars saved in pages: {bars[:5]}"
