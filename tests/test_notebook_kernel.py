"""In a real Jupyter kernel (nbclient starts one, as Jupyter does), `in_notebook()` is True and a fit shows its epoch table
as HTML, displayed once and updated in place; in a plain process `in_notebook()` is False and the table is text."""
import os, subprocess, sys
import nbformat
from nbclient import NotebookClient
from phaselearn.all import *
from phaselearn.recorder import in_notebook

CELLS = ["""from phaselearn.all import *
from phaselearn.recorder import in_notebook
print('in_notebook:', in_notebook())""",
         """import torch
from torch import nn
set_seed(0)
dls = DataLoaders.from_tensors(torch.randn(64, 4), torch.randint(0, 2, (64,)), torch.randn(32, 4), torch.randint(0, 2, (32,)), bs=16)
learn = Learner(dls, nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss(), metrics=[accuracy])
learn.fit(2)"""]


def run_in_kernel(cells, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    env_path = os.environ.get('PYTHONPATH', '')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (root, env_path) if p)  # the kernel imports this phaselearn
    try: NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    finally: os.environ['PYTHONPATH'] = env_path
    return nb


def test_in_notebook_in_a_real_kernel_and_the_html_table(tmp_path):
    nb = run_in_kernel(CELLS, tmp_path)
    first = ''.join(o.get('text', '') for o in nb.cells[0].outputs if o.output_type == 'stream')
    assert 'in_notebook: True' in first, nb.cells[0].outputs
    outputs = nb.cells[1].outputs
    tables = [o for o in outputs if o.output_type in ('display_data', 'update_display_data') and 'text/html' in o.get('data', {})
              and '<table' in o['data']['text/html']]
    assert tables, [o.output_type for o in outputs]
    assert tables[0].output_type == 'display_data' and all(o.output_type == 'update_display_data' for o in tables[1:])
    final = tables[-1]['data']['text/html']
    for column in ('epoch', 'train_loss', 'valid_loss', 'accuracy', 'time'): assert f'<th>{column}</th>' in final
    assert final.count('<tr>') == 2  # one row per epoch, in one table updated in place
    plain = tables[-1]['data']['text/plain']   # what a viewer without HTML shows: the table as text, not '<IPython...HTML object>'
    assert plain.split('\n')[0].split() == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time'] and len(plain.split('\n')) == 3, plain
    bars = [o for o in outputs if 'application/vnd.jupyter.widget-view+json' in o.get('data', {})]
    assert len(bars) == 1, f"{len(bars)} progress-bar widgets saved for one fit of 2 epochs (one bar per fit, reset per pass)"
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    assert 'train_loss' not in text  # no text table besides the HTML one


def test_not_in_notebook_in_a_plain_process():
    out = subprocess.run([sys.executable, '-c', 'import sys; from phaselearn.recorder import in_notebook; '
                          'print(in_notebook(), "IPython" in sys.modules)'], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False']  # and asking did not import IPython
    assert not in_notebook()  # pytest is no kernel either
