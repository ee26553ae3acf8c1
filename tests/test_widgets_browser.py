"""The widgets chapter in a real frontend: JupyterLab on 127.0.0.1, driven in headless Chromium.

A copy of nbs/18_widgets.ipynb, with three cells added at the end (a `schedule_widget`, an `lr_find_widget`, and a cell
that prints the objects they hold), is opened in JupyterLab and run whole. The test then moves the `lr_max` slider of
the schedule explorer and the `lr` slider of the lr finder with the keyboard, as a user would, and checks that each
plot is redrawn and that the Python objects follow the sliders (read back by running the printing cell)."""
import json, os, re, secrets, shutil, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest
from browser import ROOT, need, chromium, free_port, screenshot

ADDED = [
    "check_schedule = schedule_widget(OneCycle, lr_max=1e-2, n_epoch=4, n_iter_per_epoch=20)\ncheck_schedule",
    "set_seed(0)\ncheck_learn = Learner(digits_dls(bs=64, seed=0), nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),\n"
    "                      loss_func=nn.CrossEntropyLoss())\ncheck_lr = lr_find_widget(check_learn, num_it=30)\ncheck_lr",
    "print(f'lr_max={check_schedule.policy.lr_max!r} lr={check_lr.lr!r} done')",
]


def _notebook(dest: Path) -> Path:
    nb = json.loads((ROOT / 'nbs' / '18_widgets.ipynb').read_text())
    for source in ADDED:
        nb['cells'].append({'cell_type': 'code', 'execution_count': None, 'id': secrets.token_hex(4), 'metadata': {},
                            'outputs': [], 'source': source})
    nb['metadata']['kernelspec'] = {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'}
    path = dest / 'widgets_check.ipynb'
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    need(_has_module('jupyterlab'), 'JupyterLab is not installed: pip install -e ".[docs]"')   # it is started as sys.executable -m jupyterlab
    tmp = tmp_path_factory.mktemp('lab')
    work, home = tmp / 'work', tmp / 'home'
    work.mkdir(); home.mkdir()
    _notebook(work)
    settings = home / 'lab-settings' / '@jupyterlab' / 'notebook-extension'
    settings.mkdir(parents=True)
    (settings / 'tracker.jupyterlab-settings').write_text(json.dumps({'windowingMode': 'none'}))  # render every cell
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, 'HOME': str(home), 'JUPYTER_CONFIG_DIR': str(home / 'config'), 'JUPYTER_DATA_DIR': str(home / 'data'),
           'JUPYTER_RUNTIME_DIR': str(home / 'runtime'), 'JUPYTERLAB_SETTINGS_DIR': str(home / 'lab-settings'),
           'JUPYTERLAB_WORKSPACES_DIR': str(home / 'workspaces'), 'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
           'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    log = open(tmp / 'lab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ServerApp.ip=127.0.0.1',
                             f'--ServerApp.port={port}', '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}',
                             f'--ServerApp.root_dir={work}', '--LabApp.news_url=', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate'],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5); break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush(); pytest.fail("JupyterLab did not start:\n" + (tmp / 'lab.log').read_text()[-3000:])
                time.sleep(0.5)
        _start_kernel(base, token, 'widgets_check.ipynb')
        yield base, token
    finally:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()


def _api(base, token, path, body=None):
    request = urllib.request.Request(f"{base}{path}", method='GET' if body is None else 'POST',
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={'Authorization': f'token {token}', 'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=30) as response: return json.loads(response.read())


def _start_kernel(base, token, notebook: str):
    """Start the notebook's session and kernel through the REST API, before the page opens: the page then attaches to
    this one kernel. Left to the page, JupyterLab once started two kernels for the notebook and shut the first within
    80 ms, and Run All queued the cells on the dead one (a 900 s wait, nothing run). The server reports the kernel
    'starting' until a client talks to it, so the page's own idle indicator is what the test waits for."""
    session = _api(base, token, '/api/sessions', {'path': notebook, 'name': notebook, 'type': 'notebook', 'kernel': {'name': 'python3'}})
    sessions = _api(base, token, '/api/sessions')
    assert [s['kernel']['id'] for s in sessions] == [session['kernel']['id']], sessions


def _has_module(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _cell(page, text):
    return page.locator('.jp-CodeCell').filter(has_text=text).last


def _output_text(cell) -> str:
    return cell.locator('.jp-OutputArea').inner_text()


def _move(page, cell, description: str, presses: int):
    "Press ArrowRight `presses` times on the handle of the slider labelled `description` in `cell`'s output."
    slider = cell.locator('.widget-hslider').filter(has=page.locator('label', has_text=re.compile(f'^{re.escape(description)}$'))).first
    handle = slider.locator('.noUi-handle')
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(presses): page.keyboard.press('ArrowRight'); page.wait_for_timeout(100)
    return slider


def _plot_src(cell) -> str:
    img = cell.locator('.jp-OutputArea img').last
    img.wait_for(state='visible', timeout=60_000)
    return img.get_attribute('src')


def _wait_change(cell, before: str, what: str, timeout=60.):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _plot_src(cell) != before: return
        time.sleep(0.25)
    pytest.fail(f"the {what} plot was not redrawn after the slider moved")


def _readout(slider) -> float:
    return float(slider.locator('.widget-readout').inner_text().strip())


def _accept_dialog(page, name):
    "Accept an open JupyterLab dialog (the kernel picker, a restart question), saying what it was."
    dialog = page.locator('.jp-Dialog')
    if dialog.count():
        screenshot(page, name)
        print('JupyterLab dialog:', dialog.first.inner_text()[:300])
        page.locator('.jp-Dialog .jp-mod-accept').first.click()


def _menu(page, menu: str, item: str):
    page.click(f'.lm-MenuBar-itemLabel:text-is("{menu}")', timeout=10_000)
    page.click(f'.lm-Menu-itemLabel:text-is("{item}")', timeout=10_000)


def _run_all(page, tries=4):
    """Run > Run All Cells, until the first code cell has run (its prompt shows a number). A click before the kernel is
    wired up is lost: click again. Cells queued on a kernel that never answers stay `[*]`: restart the kernel and run all."""
    first = page.locator('.jp-CodeCell .jp-InputPrompt').first
    started = page.locator('.jp-CodeCell .jp-InputPrompt').filter(has_text=re.compile(r'\[(\*|\d+)\]'))
    ran = page.locator('.jp-CodeCell .jp-InputPrompt').filter(has_text=re.compile(r'\[\d+\]'))
    for attempt in range(tries):
        _accept_dialog(page, f'lab_dialog_{attempt}')
        try:   # a dialog that opens in between makes a click time out: then look again
            if attempt and started.count():   # queued, never run
                _menu(page, 'Kernel', 'Restart Kernel and Run All Cells…')
                page.locator('.jp-Dialog').wait_for(timeout=10_000); _accept_dialog(page, f'lab_restart_{attempt}')
            else: _menu(page, 'Run', 'Run All Cells')
            started.first.wait_for(timeout=20_000)
            ran.first.wait_for(timeout=180_000); return   # the first cell imports torch and phaselearn: seconds
        except Exception:
            print(f'Run All, try {attempt + 1}: the first cell shows {first.inner_text()!r}')
            if not page.locator('.jp-Dialog').count(): page.keyboard.press('Escape')   # close a menu left open
            page.wait_for_timeout(2_000)
    screenshot(page, 'lab_not_started')
    pytest.fail("Run All Cells did not run the notebook's first cell in JupyterLab")


def test_sliders_drive_plots_and_objects_in_jupyterlab(lab):
    base, token = lab
    with chromium() as browser:
        page = browser.new_page(viewport={'width': 1400, 'height': 1000})
        outside = []
        page.on('request', lambda r: None if r.url.startswith(('http://127.0.0.1', 'ws://127.0.0.1', 'data:', 'blob:')) else outside.append(r.url))
        page.goto(f"{base}/lab/tree/widgets_check.ipynb?token={token}", wait_until='load')
        page.locator('.jp-Notebook .jp-Cell').first.wait_for(state='visible', timeout=120_000)
        page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(timeout=120_000)
        _run_all(page)
        done = _cell(page, 'lr_max={check_schedule.policy.lr_max!r}')
        try: done.locator('.jp-OutputArea', has_text='done').wait_for(timeout=900_000)
        except Exception:
            screenshot(page, 'lab_failed', full_page=True)
            errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
            pytest.fail(f"the widgets chapter did not run to the end in JupyterLab; errors shown: {errors[:3]}")
        first = dict(re.findall(r'(\w+)=([0-9.e+-]+)', _output_text(done)))

        schedule = _cell(page, 'check_schedule = schedule_widget')
        before = _plot_src(schedule)
        slider = _move(page, schedule, 'lr_max', 6)
        _wait_change(schedule, before, 'schedule')
        screenshot(page, 'lab_schedule_widget', element=schedule)
        lr_max_shown = _readout(slider)

        finder = _cell(page, 'check_lr = lr_find_widget')
        before = _plot_src(finder)
        slider = _move(page, finder, 'lr', 10)
        _wait_change(finder, before, 'lr finder')
        screenshot(page, 'lab_lr_find_widget', element=finder)
        lr_shown = _readout(slider)

        prompt = done.locator('.jp-InputPrompt').first
        before = prompt.inner_text()
        done.locator('.jp-InputArea-editor').click()
        page.keyboard.press('Shift+Enter')
        deadline = time.monotonic() + 120
        while prompt.inner_text() in (before, '[*]:') and time.monotonic() < deadline: time.sleep(0.25)
        screenshot(page, 'lab_objects', element=done)
        assert prompt.inner_text() not in (before, '[*]:'), f"the printing cell did not run again ({before} -> {prompt.inner_text()})"
        now = dict(re.findall(r'(\w+)=([0-9.e+-]+)', _output_text(done)))
        assert float(now['lr_max']) != float(first['lr_max']) and float(now['lr']) != float(first['lr']), (first, now)
        assert float(now['lr_max']) == pytest.approx(lr_max_shown, rel=1e-2), (now, lr_max_shown)   # readout: 3 digits
        assert float(now['lr']) == pytest.approx(lr_shown, rel=1e-2), (now, lr_shown)
        assert not outside, f"JupyterLab requested outside hosts: {outside[:5]}"
        page.close()
