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


def page_name(path: Path) -> str: return re.sub(r'^\d+[a-zA-Z0-9]*_', '', path.stem.lower()) + '.html'   # as nbdev names pages


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


def test_widgets_are_pictures_or_work(site):
    "Explorers are shown as the picture their cell drew, with a line to run the notebook; no slider on any page moves without redrawing."
    page, url, outside = site
    load(page, f"{url}/widgets.html")
    notes = page.locator('.widget-picture-note')
    assert notes.count() >= 2, "the widgets page does not show the explorers as pictures with a line to run the notebook"
    notes.first.scroll_into_view_if_needed()
    screenshot(page, 'widgets')
    picture = notes.first.locator('xpath=preceding::img[1]')
    assert picture.evaluate('e => e.complete && e.naturalWidth > 100'), "the explorer's picture did not load"
    load(page, f"{url}/learner.html")      # no widgets there: no 3.6 MB widget bundle either
    assert page.locator('script[src*="embed-amd.js"]').count() == 0
    assert not outside, outside


def test_no_slider_that_lies(site):
    "On every page that carries widget state, moving a slider changes a picture of the page (a static page cannot redraw one)."
    page, url, outside = site
    for html in sorted(SITE.glob('*.html')):
        if 'application/vnd.jupyter.widget-state+json' not in html.read_text(): continue
        load(page, f"{url}/{html.name}")
        page.wait_for_timeout(1000)   # the widget manager renders the saved state
        for i in range(page.locator('.widget-slider, .widget-hslider').count()):
            slider = page.locator('.widget-slider, .widget-hslider').nth(i)
            before = page.eval_on_selector_all('article img', 'els => els.map(e => e.src)')
            slider.locator('.noUi-handle, .ui-slider-handle, input').first.focus()
            for _ in range(5): page.keyboard.press('ArrowRight')
            page.wait_for_timeout(500)
            after = page.eval_on_selector_all('article img', 'els => els.map(e => e.src)')
            assert after != before, f"{html.name}: slider {i} moves and no picture changes (a static page cannot redraw)"
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
    shown = page.inner_text('.md-search-result')
    assert 'Copied!' not in shown, "search results show the copy button's text"
    index = (SITE / 'search' / 'search_index.json').read_text()
    assert 'Copied!' not in index, "the search index holds the copy buttons' text (and with it a second copy of each cell's code)"
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
    assert not bars, f"transient progress bars saved in pages: {bars[:5]}"


LESSONS = ['index', 'core', 'data', 'callback', 'metrics', 'recorder', 'optimizer', 'schedule', 'learner', 'phases', 'lr_finder',
           'mixed_precision', 'demo', 'docs', 'tracking', 'training_extras', 'loss', 'rnn', 'distributed', 'widgets', 'checkpoint',
           'compile', 'fsdp', 'trackers', 'tutorial_phases', 'tutorial_schedule_anything', 'tutorial_own_model',
           'from_a_pytorch_loop']   # every page; coming_from is prose and tables, with no code cell
_CHECK_LINE = re.compile(r'\btest_(eq|fail|close|ne|is|warns|eq_type|stdout|shuffled)\(|^assert\b', re.M)


def test_home_page_keeps_the_install(site):
    "Every paragraph and set-up command of the index notebook's first cell is on the home page (nbdev's title step dropped them)."
    page, url, outside = site
    load(page, f"{url}/index.html")
    text = ' '.join(page.inner_text('article').split())
    first = ''.join(json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())['cells'][0]['source'])
    commands = re.findall(r'```sh\n(.*?)\n```', first, re.S)
    assert len(commands) == 2, commands
    for command in commands: assert ' '.join(command.split()) in text, f"set-up command missing from the home page: {command}"
    for words in ('From a clone of this repository', 'On a GPU machine'): assert words in text, words
    assert not outside, outside


@pytest.mark.parametrize('name', LESSONS)
def test_lessons_show_no_test_code(site, name):
    "Lesson pages show calls and their outputs; test_eq/test_fail/test_close/assert lines live in hidden cells."
    page, url, outside = site
    load(page, f"{url}/{name}.html")
    inputs = page.locator('.jp-CodeCell .jp-InputArea-editor').all_inner_texts()
    assert inputs, f"no code cell found on {name}.html"
    if page.locator('article img').count(): page.locator('article img').first.scroll_into_view_if_needed()   # its first plot
    screenshot(page, f"lesson_{name}")
    shown = [line for s in inputs for line in s.splitlines() if _CHECK_LINE.search(line)]
    assert not shown, f"{name}.html shows test code: {shown[:3]}"
    assert not outside, outside


def _machine_paths():
    import sys, tempfile
    paths = {str(ROOT), sys.prefix, os.path.realpath(sys.prefix), str(Path.home()), tempfile.gettempdir() + '/', '/site-packages/'}
    return sorted(p for p in paths if len(p) > 4)


_STDERR_OUTPUT = re.compile(r'<div[^>]*data-mime-type="application/vnd\.jupyter\.stderr"')


def test_no_stderr_box_and_no_machine_path():
    "No page renders a stderr output, and no page, Markdown copy or llms.txt names a path of the machine that built it."
    need(SITE.joinpath('index.html').exists(), f"no docs site in {SITE}: build it with `phaselearn_docs`")
    stderr, leaks = [], []
    for f in sorted(SITE.glob('*.html')) + sorted(SITE.glob('*.md')) + [SITE / 'llms.txt']:
        text = f.read_text(errors='replace')
        if _STDERR_OUTPUT.search(text): stderr.append(f.name)   # an output element, not the theme's CSS rule for one
        leaks += [(f.name, p) for p in _machine_paths() if p in text]
    assert not stderr, f"pages with a stderr box: {stderr}"
    assert not leaks, f"build-machine paths in pages: {leaks[:10]}"


def _show_docs(page):
    "(heading, signature, rows of the parameter table) of each show_doc on the page."
    return page.evaluate("""() => [...document.querySelectorAll('article h2, article h3, article h4')].map(h => {
        const out = h.closest('.jp-OutputArea-output, .jp-RenderedMarkdown') || h.parentElement;
        const pre = out.querySelector('pre'), table = out.querySelector('table');
        const rows = table ? [...table.querySelectorAll('tbody tr')].map(r => [...r.querySelectorAll('td')].map(c => c.innerText.trim())) : null;
        return [h.innerText.replace(/\\s*¶$/, '').trim(), pre ? pre.innerText : null, rows];
    }).filter(x => x[1] !== null && /^(class|def|async def) /.test(x[1]))""")


def _resolve(name: str):
    import phaselearn.all as everything
    obj = everything
    for part in name.split('.'):
        obj = getattr(obj, part, None)
        if obj is None: return None
    return obj


API_PAGES = ['learner', 'phases', 'optimizer', 'data', 'recorder', 'callback', 'mixed_precision', 'tracking', 'training_extras',
             'checkpoint', 'lr_finder', 'rnn', 'distributed', 'compile', 'schedule']


@pytest.mark.parametrize('name', API_PAGES)
def test_api_reference_classes_and_parameters(site, name):
    "show_doc renders classes as `class`, functions as `def`, signatures without inferred types, and a description for every parameter of a public class or Learner method."
    import inspect
    page, url, outside = site
    load(page, f"{url}/{name}.html")
    docs = _show_docs(page)
    assert docs, f"no show_doc signature on {name}.html"
    first = page.locator('article h3').first.inner_text()
    if name == 'learner':   # an exception documented before anything introduces it: the reference opened with LoadError
        opener = _resolve(first)
        assert not (inspect.isclass(opener) and issubclass(opener, BaseException)), f"{name}.html opens its reference with {first}"
    undocumented = []
    for heading, signature, rows in docs:
        obj = _resolve(heading)
        if obj is None: continue
        kind = 'class' if inspect.isclass(obj) else 'def'
        assert signature.split()[0] in (kind, 'async'), f"{heading} rendered as {signature.split('(')[0]!r}, it is a {kind}"
        assert 'NoneType' not in signature, f"{heading}: inferred types in the signature: {signature}"
        public = not heading.split('.')[-1].startswith('_') and (inspect.isclass(obj) or heading.startswith('Learner.'))
        if public and rows: undocumented += [f"{heading}({r[0]})" for r in rows if len(r) == 4 and not r[3]]
    assert not undocumented, f"parameters without a description on {name}.html: {undocumented}"
    assert not outside, outside


def test_help_shows_the_parameters():
    "help(Learner) documents the arguments, with the text of the site's table."
    from phaselearn.all import Learner
    import pydoc
    text = pydoc.render_doc(Learner)
    for name in ('dls', 'model', 'loss_func', 'opt_func', 'lr', 'metrics', 'cbs', 'wd'): assert f"    {name}: " in text, name


def test_llms_txt_lists_every_page():
    "llms.txt (nbdev's convention) links every page as Markdown, and each link resolves."
    need(SITE.joinpath('index.html').exists(), f"no docs site in {SITE}: build it with `phaselearn_docs`")
    text = (SITE / 'llms.txt').read_text()
    assert text.startswith('# phaselearn\n\n> ')
    links = re.findall(r'^- \[[^\]]+\]\(([^)]+\.md)\)', text, re.M)
    assert {Path(l).stem for l in links} >= {page_name(p)[:-5] for p in CHAPTERS}, links
    for l in links: assert (SITE / l).stat().st_size > 100, l
