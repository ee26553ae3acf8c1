"Widgets: every knob of every built-in policy against a hand-built reference, learner previews, the lr picker, script use."
import math, os, subprocess, sys, textwrap
import numpy as np
import pytest
import torch
from torch import nn
import ipywidgets as widgets
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

from phaselearn.all import *
from phaselearn.widgets import knob_ranges
from phaselearn.lr_finder import minimum, steep, valley
import phaselearn.widgets as W


def plotted(explorer) -> dict:
    "panel title -> array (n_iter, n_groups) of the plotted lines (phase-boundary lines, 2 points each, left out)."
    out = {}
    for ax in explorer.figure.axes:
        lines = [l for l in ax.lines if len(l.get_ydata()) > 2]
        out[ax.get_title()] = np.stack([np.asarray(l.get_ydata(), dtype=float) for l in lines], axis=1)
    return out


# The built-in policies with their documented defaults, written out by hand (the reference the widget is checked against).
DEFAULTS = {
    OneCycle: dict(lr_max=1e-2, div=25., div_final=1e5, pct_start=0.25, moms=(0.95, 0.85, 0.95)),
    SGDR: dict(lr_max=1e-2, cycle_len=1, cycle_mult=2),
    FlatCos: dict(lr=1e-2, pct_start=0.75, div_final=1e5),
    WarmupCosine: dict(lr_max=1e-2, warmup_pct=0.1, div_final=1e5),
}
# A new value for each knob, inside its slider's range.
NEW = dict(lr_max=3e-4, lr=2e-3, div=7., div_final=300., pct_start=0.6, warmup_pct=0.35, cycle_len=2, cycle_mult=3)
NEW_MOMS = (0.9, 0.7, 0.99)


def knob_cases():
    for cls, defaults in DEFAULTS.items():
        for name in defaults:
            if name == 'moms':
                for i in range(3): yield cls, f'moms[{i}]'
            else: yield cls, name


@pytest.mark.parametrize('cls,control', list(knob_cases()), ids=lambda x: getattr(x, '__name__', x))
def test_every_knob_moves_the_policy_and_the_plot(cls, control):
    lr_name = 'lr' if cls is FlatCos else 'lr_max'
    n, n_iter = (2, 8) if cls is SGDR else (3, 20)
    explorer = schedule_widget(cls, n_epoch=n, n_iter_per_epoch=n_iter, **{lr_name: 1e-2})
    kwargs = dict(DEFAULTS[cls])
    if control.startswith('moms['):
        i = int(control[5])
        value = NEW_MOMS[i]
        moms = list(kwargs['moms']); moms[i] = value; kwargs['moms'] = tuple(moms)
    else:
        value = NEW[control]; kwargs[control] = value
    explorer.controls[control].value = value
    assert explorer.error is None
    for name, expected in kwargs.items(): assert getattr(explorer.policy, name) == expected, name
    reference = Phases(cls(**kwargs).phases(n)).preview(n_iter)
    lines = plotted(explorer)
    assert set(lines) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(lines[name], reference[name])
        np.testing.assert_array_equal(explorer.values[name], reference[name])
    np.testing.assert_array_equal(explorer.phases.preview(n_iter)['lr'], reference['lr'])


@pytest.mark.parametrize('cls', list(DEFAULTS))
def test_length_controls(cls):
    explorer = schedule_widget(cls, n_iter_per_epoch=10)
    length = 'n_cycles' if cls is SGDR else 'n_epoch'
    assert list(explorer.controls)[-2:] == [length, 'n_iter_per_epoch']
    explorer.set(**{length: 2, 'n_iter_per_epoch': 7})
    expected = 7 * (1 + 2) if cls is SGDR else 7 * 2
    assert explorer.n_epoch == 2 and explorer.n_iter_per_epoch == 7
    assert plotted(explorer)['lr'].shape == (expected, 1)


def test_ranges_grow_to_include_the_start():
    explorer = schedule_widget(OneCycle, lr_max=100., div=5000., pct_start=0.995, moms=(0.3, 0.2, 0.3))
    assert explorer.controls['lr_max'].value == 100. and explorer.controls['lr_max'].max >= 2
    assert explorer.controls['div'].value == 5000.
    assert explorer.controls['pct_start'].value == 0.995
    assert explorer.controls['moms[1]'].value == 0.2
    assert explorer.policy.lr_max == 100. and explorer.policy.moms == (0.3, 0.2, 0.3)
    for name, (kind, low, high, step) in knob_ranges.items():
        assert low < high and step > 0, name


def test_policy_object_and_fixed_knobs():
    policy = OneCycle(slice(1e-5, 1e-3), div=10., pct_start=0.3, moms=None)
    explorer = schedule_widget(policy, n_groups=3, n_iter_per_epoch=10, n_epoch=2)
    assert 'lr_max' not in explorer.controls and not any(n.startswith('moms') for n in explorer.controls)
    explorer.controls['div'].value = 20.
    reference = Phases(OneCycle(slice(1e-5, 1e-3), div=20., pct_start=0.3, moms=None).phases(2)).preview(10, n_groups=3)
    np.testing.assert_array_equal(plotted(explorer)['lr'], reference['lr'])
    assert list(plotted(explorer)) == ['lr']


def test_hold_redraws_once():
    explorer = schedule_widget(OneCycle, n_iter_per_epoch=10)
    figures = []
    original = explorer.update
    def counting_update():
        original()
        if not explorer._holding: figures.append(explorer.figure)
    explorer.update = counting_update
    explorer.set(div=10., pct_start=0.5, n_epoch=2)
    assert len(figures) == 1
    assert (explorer.policy.div, explorer.policy.pct_start, explorer.n_epoch) == (10., 0.5, 2)


def test_names_restricts_panels():
    explorer = schedule_widget(OneCycle, names=['mom'], n_iter_per_epoch=10)
    assert [ax.get_title() for ax in explorer.figure.axes] == ['mom']


def digits_learner(**kwargs):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    return Learner(digits_dls(bs=64, seed=0), model, loss_func=nn.CrossEntropyLoss(), default_cbs=False, **kwargs)


def test_learner_preview_with_batch_size_phases_and_groups():
    learn = digits_learner(splitter=sequential_splitter)
    phases = [TrainingPhase(epochs=1, lr=SchedLin(slice(1e-5, 1e-3), slice(1e-4, 1e-2)), mom=0.9),
              TrainingPhase(epochs=1, bs=256, lr=SchedCos(1e-2, 0.))]
    explorer = schedule_widget(phases, learn=learn)
    assert explorer.controls == {}
    reference = learn.preview(phases)
    n_iter = len(learn.dls.train) + len(learn.dls.new(bs=256).train)
    assert reference['lr'].shape == (n_iter, 3)
    np.testing.assert_array_equal(plotted(explorer)['lr'], reference['lr'])
    np.testing.assert_array_equal(plotted(explorer)['mom'], reference['mom'])


def test_learner_defaults_lr_max_to_learn_lr():
    learn = digits_learner(lr=4e-3)
    explorer = schedule_widget(OneCycle, learn=learn, n_epoch=1)
    assert explorer.policy.lr_max == 4e-3 and 'n_iter_per_epoch' not in explorer.controls
    explorer.controls['lr_max'].value = 2e-2
    np.testing.assert_array_equal(plotted(explorer)['lr'], learn.preview(OneCycle(2e-2).phases(1))['lr'])


def test_bad_inputs():
    with pytest.raises(TypeError, match='needs a policy class'): schedule_widget('OneCycle')
    with pytest.raises(TypeError, match='needs a policy class'): schedule_widget(Phases)
    with pytest.raises(TypeError, match='needs a policy class'): schedule_widget([])
    with pytest.raises(TypeError, match='needs a policy class'): schedule_widget([TrainingPhase(iters=2), 3])
    with pytest.raises(ValueError, match='n_groups must be a positive integer'): schedule_widget(OneCycle, n_groups=0)
    with pytest.raises(ValueError, match='n_iter_per_epoch must be'): schedule_widget(OneCycle, n_iter_per_epoch=2.5)
    with pytest.raises(ValueError, match='n_cycles must be a positive number'): schedule_widget(SGDR, n_epoch=-1)
    with pytest.raises(ValueError, match='cycle_len and cycle_mult must be positive'): schedule_widget(SGDR, cycle_len=0)
    with pytest.raises(ValueError, match="no knob 'lr_max'; its knobs are lr, pct_start, div_final"): schedule_widget(FlatCos, lr_max=1e-3)
    with pytest.raises(ValueError, match='n_epoch only applies to a policy'): schedule_widget(TrainingPhase(iters=3, lr=0.1), n_epoch=2)
    explorer = schedule_widget(OneCycle)
    with pytest.raises(ValueError, match='no control named'): explorer.set(bogus=1)


def test_refused_change_keeps_the_last_valid_state():
    class Picky:
        def __init__(self, lr, low=0.2, high=0.8):
            if not low < high: raise ValueError(f"low must be below high, got {low} and {high}")
            self.lr, self.low, self.high = lr, low, high
        def phases(self, n_epoch):
            return [TrainingPhase(epochs=n_epoch, lr=SchedLin(self.lr * self.low, self.lr * self.high))]
    explorer = schedule_widget(Picky, lr=1e-2, n_epoch=1, n_iter_per_epoch=10)
    figure, policy = explorer.figure, explorer.policy
    explorer.controls['low'].value = 0.9
    assert 'low must be below high' in explorer.error and explorer.policy is policy and explorer.figure is figure
    explorer.controls['high'].value = 1.5
    assert explorer.error is None and (explorer.policy.low, explorer.policy.high) == (0.9, 1.5)
    np.testing.assert_allclose(plotted(explorer)['lr'][:, 0], SchedLin(9e-3, 1.5e-2).values(10))


def test_no_figures_leak():
    before = plt.get_fignums()
    explorer = schedule_widget(OneCycle, n_iter_per_epoch=10)
    for value in np.linspace(0.1, 0.9, 9): explorer.controls['pct_start'].value = float(value)
    result = LRFindResult(np.logspace(-6, 0, 50), np.linspace(2, 1, 50), 50, False, (minimum, steep, valley))
    picker = LRFinderExplorer(result)
    for lr in np.logspace(-5, -1, 5): picker.lr = float(lr)
    assert plt.get_fignums() == before


def test_kernel_redraw_displays_into_the_output(monkeypatch):
    shown = []
    import IPython.display
    monkeypatch.setattr(W, '_in_kernel', lambda: True)
    monkeypatch.setattr(IPython.display, 'display', lambda obj, **kw: shown.append(obj))
    monkeypatch.setattr(IPython.display, 'clear_output', lambda wait=False: shown.append('clear'))
    explorer = schedule_widget(OneCycle, n_iter_per_epoch=10)
    explorer.controls['div'].value = 10.
    assert shown[-2:] == ['clear', explorer.figure] and shown.count('clear') == 2


# --- lr picker

def parabola_result():
    lrs = np.logspace(-7, 1, 81)
    return lrs, LRFindResult(lrs, (np.log10(lrs) + 3) ** 2, 81, False, (minimum, steep, valley))


def test_lr_slider_marker_and_buttons():
    lrs, result = parabola_result()
    picker = LRFinderExplorer(result, lr=1e-5)
    assert picker.lr == 1e-5 and picker.slider.value == 1e-5
    for i in (10, 33, 47, 80):
        picker.slider.value = lrs[i]
        assert picker.lr == lrs[i]
        assert picker.marker.get_xdata()[0] == lrs[i] and picker.line.get_xdata()[0] == lrs[i]
        np.testing.assert_allclose(picker.marker.get_ydata()[0], (np.log10(lrs[i]) + 3) ** 2, atol=1e-12)
    for name, button in picker.buttons.items():
        button.click()
        assert picker.lr == getattr(result.suggestions, name) and picker.marker.get_xdata()[0] == picker.lr
    assert np.isclose(picker.slider.min, -7) and np.isclose(picker.slider.max, 1)


def test_lr_picker_starts_at_first_usable_suggestion_then_middle():
    lrs = np.logspace(-4, -2, 5)
    rising = LRFindResult(lrs, [1., 2., 3., 4., 5.], 5, False, (minimum,))
    assert rising.suggestions.minimum < lrs[0]            # a tenth of the first lr: outside the sweep
    picker = LRFinderExplorer(rising)
    np.testing.assert_allclose(picker.lr, 1e-3)             # the middle of the sweep, on the log scale
    assert picker.buttons == {}
    falling = LRFindResult(lrs, [5., 4., 3., 2., 1.], 5, False, (steep, minimum))
    assert LRFinderExplorer(falling).lr == falling.suggestions.steep   # no valley: the first usable one


def test_lr_find_widget_on_a_learner():
    learn = digits_learner(splitter=sequential_splitter)
    learn.create_opt(); learn.opt.set_hyper('lr', slice(1e-4, 1e-2))
    picker = lr_find_widget(learn, num_it=20, start_lr=1e-5, end_lr=1.)
    result = learn.lr_find_result
    assert picker.result is result and len(result.lrs) <= 20
    assert lr_find_widget(learn).result is result
    picker.lr = 1e-2
    np.testing.assert_allclose(picker.lrs, [1e-4, 1e-3, 1e-2], rtol=1e-12)
    keep = np.isfinite(result.losses)
    np.testing.assert_allclose(picker.loss, np.interp(np.log(1e-2), np.log(result.lrs[keep]), result.losses[keep]))
    again = lr_find_widget(learn, rerun=True, lr=1e-3)
    assert again.result is learn.lr_find_result and again.result is not result and again.lr == 1e-3
    fresh = digits_learner()
    assert 'lr_find_result' not in fresh.__dict__
    assert lr_find_widget(fresh).result is fresh.lr_find_result   # no result yet: a sweep runs


def test_lr_picker_bad_inputs():
    lrs, result = parabola_result()
    with pytest.raises(TypeError, match='needs an LRFindResult'): LRFinderExplorer(None)
    with pytest.raises(TypeError, match='needs a Learner or an LRFindResult'): lr_find_widget('learn')
    with pytest.raises(ValueError, match='need a Learner'): lr_find_widget(result, rerun=True)
    with pytest.raises(ValueError, match='within the sweep'): LRFinderExplorer(result, lr=0.)
    picker = LRFinderExplorer(result)
    for bad in (1e-9, 20., 'a', True, float('inf')):
        with pytest.raises(ValueError, match='within the sweep'): picker.lr = bad
    empty = LRFindResult([], [], 100, True, (minimum,))
    with pytest.raises(ValueError, match='0 usable point'): LRFinderExplorer(empty)


def test_plain_script_use(tmp_path):
    "In a plain python process: no kernel, no output on stdout, figures saved, display() returns the figure."
    script = textwrap.dedent(f"""
        import matplotlib; matplotlib.use('Agg')
        import numpy as np
        from phaselearn.all import *
        explorer = schedule_widget(OneCycle, lr_max=1e-2)
        explorer.controls['pct_start'].value = 0.5
        assert explorer.display() is explorer.figure
        explorer.figure.savefig(r'{tmp_path}/schedule.png')
        result = LRFindResult(np.logspace(-6, 0, 50), np.linspace(2, 1, 50), 50, False, (suggest_minimum, suggest_steep, suggest_valley))
        picker = lr_find_widget(result)
        picker.lr = 1e-3
        picker.display().savefig(r'{tmp_path}/lr.png')
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(W.__file__))))
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ''
    for name in ('schedule.png', 'lr.png'): assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
