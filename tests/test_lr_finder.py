"The learning-rate finder: suggestions against known answers, exact restore of the learner, interruption, bad input."
import copy, math, os, random, warnings
import numpy as np, pytest, torch
from torch import nn
from torch.utils.data import Dataset
from phaselearn.all import *
from phaselearn.core import to_device
from phaselearn.lr_finder import minimum, steep, valley


@pytest.fixture(autouse=True)
def _quiet_and_closed(monkeypatch):
    "No progress bars in test logs; close the figures a test opened."
    import matplotlib.pyplot as plt
    monkeypatch.setenv('PHASELEARN_QUIET', '1')
    yield
    plt.close('all')


def same(a, b) -> bool:
    "Bitwise equality of nested dicts/lists/tuples of tensors, arrays and plain values."
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device \
               and torch.equal(a, b)
    if isinstance(a, np.ndarray): return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) == type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def draws():
    "One draw from every stream training uses."
    out = (random.random(), np.random.rand(), torch.rand(4))
    return out + ((torch.rand(4, device='cuda').cpu(),) if torch.cuda.is_available() else ())


def state_of(learn) -> dict:
    "Everything lr_find promises to put back, copied."
    model = learn.model
    return dict(model=copy.deepcopy(model.state_dict()), buffers=[b.clone() for b in model.buffers()],
                grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
                requires_grad=[p.requires_grad for p in model.parameters()],
                modes=[m.training for m in model.modules()],
                opt=learn.opt, opt_state=None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
                cbs=list(learn.cbs), dls=learn.dls, loss_func=learn.loss_func,
                epochs=(getattr(learn.dls.train, 'epoch', None), getattr(getattr(learn.dls.train, 'sampler', None), 'epoch', None)),
                rng=rng_state_dict())


def assert_restored(learn, before):
    after = state_of(learn)
    assert same(after['model'], before['model']), 'weights or buffers changed'
    assert same(after['buffers'], before['buffers']), 'buffers (non-persistent ones included) changed'
    assert same(after['grads'], before['grads']), 'gradients changed'
    assert after['requires_grad'] == before['requires_grad'] and after['modes'] == before['modes']
    assert after['opt'] is before['opt'], 'learn.opt is another object'
    assert same(after['opt_state'], before['opt_state']), 'optimizer state changed'
    assert all(a is b for a, b in zip(after['cbs'], before['cbs'])) and len(after['cbs']) == len(before['cbs'])
    assert all(cb.learn is learn for cb in learn.cbs)
    assert after['dls'] is before['dls'] and after['loss_func'] is before['loss_func']
    assert after['epochs'] == before['epochs'], 'loader epoch counters changed'
    load_rng_state_dict(before['rng']); expected = draws()
    load_rng_state_dict(after['rng']); assert same(draws(), expected), 'a random stream moved'


# ---------------------------------------------------------------------------------------------------------- learners

def digits_learner(cbs=None, lr=1e-2, **kwargs):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
    return Learner(digits_dls(bs=64, seed=0), model, loss_func=nn.CrossEntropyLoss(), lr=lr, metrics=[accuracy],
                   cbs=cbs or [], **kwargs)


def curvature_learner(seed=0, n=256, d=8, spread=4., opt_func=torch.optim.SGD):
    "Full-batch linear regression: gradient descent diverges exactly above 2/L, L the top eigenvalue of 2/n X^T X."
    set_seed(seed)
    x = torch.randn(n, d) * torch.linspace(1., spread, d) / math.sqrt(spread)
    y = x @ torch.randn(d, 1) + 0.1 * torch.randn(n, 1)
    learn = Learner(DataLoaders.from_tensors(x, y, bs=n), nn.Linear(d, 1, bias=False), loss_func=nn.MSELoss(),
                    opt_func=opt_func, wd=0., cbs=[], default_cbs=False)
    return learn, 2 / torch.linalg.eigvalsh(2 / n * x.T @ x).max().item()


class Noisy(Dataset):
    "A map-style dataset (so the data goes through a torch DataLoader with an EpochSampler) with random augmentation."
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        return self.x[i] + 0.01 * float(np.random.randn()) + 0.01 * random.random(), self.y[i]


def sampler_learner(**kwargs):
    set_seed(1)
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    dls = DataLoaders.from_datasets(Noisy(x[:160], y[:160]), Noisy(x[160:], y[160:]), bs=32)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=[accuracy], cbs=[], **kwargs)


# ------------------------------------------------------------------------------------------------------ suggestions

@pytest.mark.parametrize('seed,spread,d', [(0, 4., 8), (1, 1., 4), (2, 10., 16), (3, 2., 32)])
def test_suggestions_below_divergence_of_gradient_descent(seed, spread, d):
    "Every suggestion lies below 2/L (where gradient descent diverges) and above 2/(100 L)."
    learn, divergence = curvature_learner(seed, d=d, spread=spread)
    suggestions = learn.lr_find(start_lr=1e-5, end_lr=10, show_plot=False)
    assert learn.lr_find_result.diverged
    for name, lr in suggestions._asdict().items():
        assert divergence / 100 < lr < divergence, (name, lr, divergence)


def test_suggestions_are_the_rules_applied_to_the_recorded_curve():
    "The returned numbers are the suggestion functions applied to the curve from num_it // 10 on."
    learn, _ = curvature_learner()
    suggestions = learn.lr_find(start_lr=1e-5, end_lr=10, num_it=60, show_plot=False)
    result = learn.lr_find_result
    lrs, losses = result.lrs[6:], result.losses[6:]
    assert suggestions == (minimum(lrs, losses), steep(lrs, losses), valley(lrs, losses))
    np.testing.assert_allclose(result.lrs, SchedExp(1e-5, 10).values(60)[:len(result.lrs)], rtol=1e-12)


def test_valley_against_brute_force():
    "valley's decreasing run has the length of the longest strictly decreasing subsequence, found by brute force."
    import itertools
    rng = np.random.default_rng(0)
    for _ in range(30):
        losses = rng.normal(size=9).cumsum()
        lrs = np.logspace(-5, 0, 9)
        best = max(len(c) for r in range(1, 10) for c in itertools.combinations(range(9), r)
                   if all(losses[a] > losses[b] for a, b in zip(c, c[1:])))
        # the chosen valley is one of the longest runs: find it back from the answer's position
        answer = int(np.flatnonzero(lrs == valley(lrs, losses))[0])
        runs = [c for c in itertools.combinations(range(9), best)
                if all(losses[a] > losses[b] for a, b in zip(c, c[1:])) and c[0] + round(2 / 3 * (c[-1] - c[0])) == answer]
        assert runs, (losses, answer)


def test_custom_suggestion_functions():
    learn, _ = curvature_learner()
    def twice_valley(lrs, losses): return 2 * valley(lrs, losses)
    suggestions = learn.lr_find(start_lr=1e-5, num_it=40, suggest_funcs=(valley, twice_valley), show_plot=False)
    assert suggestions._fields == ('valley', 'twice_valley') and type(suggestions).__name__ == 'SuggestedLRs'
    assert suggestions.twice_valley == 2 * suggestions.valley
    only = learn.lr_find(start_lr=1e-5, num_it=40, suggest_funcs=steep, show_plot=False)
    assert only._fields == ('steep',)
    generated = learn.lr_find(start_lr=1e-5, num_it=40, suggest_funcs=(f for f in (minimum, valley)), show_plot=False)
    assert generated._fields == ('minimum', 'valley') and not math.isnan(generated.valley)


# ---------------------------------------------------------------------------------------------------------- restore

def test_training_after_lr_find_is_the_same_as_without():
    "fit, lr_find, fit gives bit for bit the weights, BN statistics, Adam state and metrics of fit, fit."
    results = []
    for with_find in (False, True):
        learn = sampler_learner()
        learn.fit(1)
        if with_find: learn.lr_find(show_plot=False)
        learn.fit(1)
        results.append((copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict()),
                        learn.recorder.values[-1][1:-1], draws()))
    assert same(results[0], results[1])


class CountCalls(nn.ReLU):
    "A ReLU that counts its training calls in a non-persistent buffer (not in the state_dict)."
    def __init__(self):
        super().__init__()
        self.register_buffer('calls', torch.zeros(()), persistent=False)
    def forward(self, x):
        if self.training: self.calls += 1
        return super().forward(x)


def test_state_restored_bit_for_bit():
    "Weights, BN buffers, gradients, module modes, Adam state and object, RNGs, loader epochs, callbacks."
    learn = digits_learner()
    learn.fit(1)
    learn.model[0].eval()                                     # unusual modes are kept too
    xb, yb = to_device(next(iter(learn.dls.train)), learn.device)
    learn.loss_func(learn.model(xb), yb).backward()           # leave gradients behind
    learn.model[2] = CountCalls()                             # a non-persistent buffer that the sweep changes
    before = state_of(learn)
    assert before['grads'][0] is not None and before['opt_state']['opt']['state']
    learn.lr_find(show_plot=False)
    assert_restored(learn, before)


def test_sampler_epoch_and_all_streams_restored():
    learn = sampler_learner()
    learn.fit(1)
    before = state_of(learn)
    assert before['epochs'][1] == 1
    learn.lr_find(num_it=30, show_plot=False)
    assert_restored(learn, before)


def test_frozen_learner_stays_frozen():
    learn = digits_learner(splitter=sequential_splitter)
    learn.freeze()
    before = state_of(learn)
    learn.lr_find(num_it=20, show_plot=False)
    assert_restored(learn, before)
    assert learn.opt.frozen_idx == learn.opt.n_groups - 1


def test_learner_without_optimizer_gets_none_back():
    learn = digits_learner()
    assert learn.opt is None
    learn.lr_find(num_it=20, show_plot=False)
    assert learn.opt is None
    learn.fit(1)                                              # and trains normally afterwards
    assert learn.validate()[1] > 0.8


def test_no_file_left_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    learn = digits_learner(path=tmp_path)
    learn.lr_find(num_it=20, show_plot=False)
    assert list(tmp_path.iterdir()) == []


def test_callback_state_restored_and_skipped_callbacks():
    class Counter(Callback):
        def __init__(self): self.n = 0
        def after_batch(self): self.n += 1
        def state_dict(self): return {'n': self.n}
        def load_state_dict(self, state): self.n = state['n']

    class Saver(Callback):
        run_in_lr_find = False
        def __init__(self): self.events = 0
        def after_epoch(self): self.events += 1

    counter, saver = Counter(), Saver()
    learn = digits_learner(cbs=[counter, saver])
    learn.fit(1)
    n, events = counter.n, saver.events
    before = state_of(learn)
    learn.lr_find(num_it=30, show_plot=False)
    assert counter.n == n and saver.events == events
    assert_restored(learn, before)


def test_torch_compile_model():
    learn = digits_learner()
    learn.model = torch.compile(learn.model, backend='eager')
    learn.fit(1)
    before = state_of(learn)
    learn.lr_find(num_it=20, show_plot=False)
    assert_restored(learn, before)


# ------------------------------------------------------------------------------------------- the sweep itself

def test_discriminative_groups_keep_their_ratios():
    class Log(Callback):
        order = 100
        def before_fit(self): self.lrs = []
        def before_step(self): self.lrs.append(self.opt.get_hyper('lr'))

    learn = digits_learner(splitter=sequential_splitter, lr=slice(1e-5, 1e-3))
    learn.create_opt()
    learn.opt.set_hyper('lr', [2e-5, 1e-4, 1e-3])
    log = Log()
    learn.lr_find(start_lr=1e-6, end_lr=1., num_it=40, stop_div=False, cbs=[log], show_plot=False)
    lrs = np.array(log.lrs)
    assert lrs.shape == (40, 3)
    np.testing.assert_allclose(lrs[:, -1], SchedExp(1e-6, 1.).values(40), rtol=1e-13)
    np.testing.assert_allclose(lrs / lrs[:, -1:], np.broadcast_to([0.02, 0.1, 1.], lrs.shape), rtol=1e-12)
    np.testing.assert_allclose(learn.lr_find_result.lrs, lrs[:, -1], rtol=0)
    assert learn.opt.get_hyper('lr') == [2e-5, 1e-4, 1e-3]


def test_zero_lr_group_is_refused():
    learn = digits_learner(splitter=sequential_splitter)
    learn.create_opt(); learn.opt.set_hyper('lr', [0., 1e-3, 1e-2])
    before = state_of(learn)
    with pytest.raises(ValueError, match='layer group 0 has lr 0.0'): learn.lr_find(show_plot=False)
    assert_restored(learn, before)


def test_short_loader_runs_several_epochs_without_validation():
    "A 23-batch loader gives 5 passes for 100 iterations; no validation batch runs, no table row is printed."
    class Events(Callback):
        def before_fit(self): self.train_batches, self.valid_batches, self.epochs = 0, 0, 0
        def after_batch(self):
            if self.training: self.train_batches += 1
            else: self.valid_batches += 1
        def after_epoch(self): self.epochs += 1

    events = Events()
    learn = digits_learner()
    learn.lr_find(stop_div=False, cbs=[events], show_plot=False)
    assert (events.train_batches, events.valid_batches, events.epochs) == (100, 0, 5)
    assert len(learn.lr_find_result.lrs) == 100


def test_no_epoch_table_row(capsys, monkeypatch):
    monkeypatch.delenv('PHASELEARN_QUIET')
    learn = digits_learner()
    progress = [cb for cb in learn.cbs if isinstance(cb, ProgressCallback)][0]
    progress.show_bar, progress.html = False, False
    learn.lr_find(num_it=30, show_plot=False)
    assert capsys.readouterr().out == ''
    assert progress.show_table
    learn.fit(1)                                              # the table is back for training
    assert 'train_loss' in capsys.readouterr().out


def test_no_nan_metric_warnings():
    learn = digits_learner()
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        learn.lr_find(num_it=30, show_plot=False)


def test_loss_that_never_diverges_records_every_point():
    learn, _ = curvature_learner()
    learn.loss_func = lambda pred, y: (pred * 0).sum() + 1.
    learn.lr_find(num_it=70, show_plot=False)
    assert not learn.lr_find_result.diverged and len(learn.lr_find_result.lrs) == 70


def test_negative_loss_is_not_divergence():
    "A constant negative loss: '4x the best' would fire at once; the rise is measured from the best value."
    learn, _ = curvature_learner()
    learn.loss_func = lambda pred, y: (pred * 0).sum() - 1.
    learn.lr_find(num_it=30, show_plot=False)
    assert not learn.lr_find_result.diverged and len(learn.lr_find_result.lrs) == 30


@pytest.mark.parametrize('bad', [float('inf'), float('nan')])
def test_non_finite_loss_is_divergence(bad):
    learn, _ = curvature_learner()
    learn.loss_func = lambda pred, y: (pred * 0).sum() + bad
    with pytest.warns(RuntimeWarning, match='the loss diverged after 1 of 100 iterations'):
        suggestions = learn.lr_find(show_plot=True)
    assert learn.lr_find_result.diverged and len(learn.lr_find_result.lrs) == 1
    assert all(math.isnan(lr) for lr in suggestions)


def test_failing_callback_restore_still_restores_the_rest():
    "restore attempts every part: a callback whose load_state_dict fails does not keep the weights from coming back."
    class BadState(Callback):
        def state_dict(self): return {'x': 1}
        def load_state_dict(self, state): raise RuntimeError('cannot load')

    learn = digits_learner(cbs=[BadState()])
    learn.fit(1)
    weights, rng = copy.deepcopy(learn.model.state_dict()), rng_state_dict()
    with pytest.raises(RuntimeError, match='cannot load'): learn.lr_find(num_it=20, show_plot=False)
    assert same(learn.model.state_dict(), weights)
    after = draws(); load_rng_state_dict(rng); assert same(after, draws())


def test_diverges_at_once_returns_nan_and_warns():
    learn, divergence = curvature_learner()
    before = state_of(learn)
    with pytest.warns(RuntimeWarning, match='lower start_lr'):
        suggestions = learn.lr_find(start_lr=100 * divergence, end_lr=1e6, show_plot=True)
    result = learn.lr_find_result
    assert result.diverged and len(result.lrs) < 10
    assert all(math.isnan(lr) for lr in suggestions)
    assert result.fig is not None                             # plotting a short curve does not crash
    assert_restored(learn, before)


def test_without_stop_div_a_diverging_loss_runs_to_the_end():
    "The loss overflows to inf/NaN; all num_it points are recorded and the suggestions use the finite part."
    learn, divergence = curvature_learner()
    suggestions = learn.lr_find(start_lr=1e-5, end_lr=1e8, num_it=120, stop_div=False, show_plot=True)
    result = learn.lr_find_result
    assert len(result.lrs) == 120 and not result.diverged
    assert not np.isfinite(result.losses).all()
    for lr in suggestions: assert math.isfinite(lr) and lr < divergence
    assert torch.isfinite(learn.model.weight).all()


# ------------------------------------------------------------------------------------------------ interruption

@pytest.mark.parametrize('exception', [KeyboardInterrupt, RuntimeError('callback bug')])
@pytest.mark.parametrize('where', ['learner', 'cbs'])
def test_interrupted_sweep_restores_everything(exception, where):
    class Interrupt(Callback):
        def after_batch(self):
            if self.learn.training and self.learn.train_iter == 30: raise exception

    interrupt = Interrupt()
    learn = sampler_learner()
    learn.fit(1)
    if where == 'learner': learn.add_cb(interrupt)
    before = state_of(learn)
    expected = exception if isinstance(exception, type) else type(exception)
    with pytest.raises(expected): learn.lr_find(show_plot=False, cbs=[interrupt] if where == 'cbs' else None)
    assert_restored(learn, before)
    if where == 'learner': learn.remove_cb(interrupt)
    learn.fit(1)                                              # still trains
    assert learn.validate()[0] < 2


# ---------------------------------------------------------------------------------------------------- plotting

def test_plot():
    learn = digits_learner()
    suggestions = learn.lr_find(num_it=60)
    fig = learn.lr_find_result.fig
    ax = fig.axes[0]
    assert ax.get_xscale() == 'log'
    labels = ax.get_legend_handles_labels()[1]
    assert [label.split(':')[0] for label in labels] == list(suggestions._fields)
    ax2 = learn.plot_lr_find()
    assert ax2 is not ax and ax2.get_xscale() == 'log'


# --------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('kwargs,message', [
    (dict(start_lr=1., end_lr=0.1), 'start_lr must be smaller than end_lr'),
    (dict(start_lr=0.1, end_lr=0.1), 'start_lr must be smaller than end_lr'),
    (dict(start_lr=0.), 'start_lr must be a finite learning rate > 0, got 0.0'),
    (dict(start_lr=-1e-3), 'start_lr must be a finite learning rate > 0'),
    (dict(end_lr=0), 'end_lr must be a finite learning rate > 0, got 0'),
    (dict(end_lr=float('nan')), 'end_lr must be a finite'),
    (dict(start_lr=True), 'start_lr must be a finite'),
    (dict(start_lr='1e-3'), 'start_lr must be a finite'),
    (dict(num_it=1), 'num_it must be an integer >= 2'),
    (dict(num_it=0), 'got 0'),
    (dict(num_it=-5), 'got -5'),
    (dict(num_it=50.0), 'num_it must be an integer'),
    (dict(suggest_funcs=[minimum, 'steep']), 'suggest_funcs must be functions'),
])
def test_bad_arguments(kwargs, message):
    learn = digits_learner()
    before = state_of(learn)
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.').replace('+', r'\+')):
        learn.lr_find(show_plot=False, **kwargs)
    assert_restored(learn, before)


def test_no_training_data():
    learn = digits_learner()
    learn.dls.train = None
    with pytest.raises(ValueError, match=r'dls\.train is None'): learn.lr_find(show_plot=False)
    learn = digits_learner()
    learn.dls.train = TensorLoader(torch.zeros(10, 64), torch.zeros(10, dtype=torch.long), bs=64, drop_last=True)
    with pytest.raises(ValueError, match='training loader is empty'): learn.lr_find(show_plot=False)
    learn = digits_learner()
    learn.dls = None
    with pytest.raises(ValueError, match='dls.train is None'): learn.lr_find(show_plot=False)


def test_no_loss_func():
    learn = digits_learner()
    learn.loss_func = None
    with pytest.raises(ValueError, match='no loss_func'): learn.lr_find(show_plot=False)


def test_plot_before_any_sweep():
    with pytest.raises(ValueError, match=r'run learn\.lr_find\(\) first'): digits_learner().plot_lr_find()


# ---------------------------------------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_state_and_streams_restored():
    learn = sampler_learner(device='cuda')
    learn.fit(1)
    before = state_of(learn)
    assert before['model']['0.weight'].is_cuda
    learn.lr_find(show_plot=False)
    assert_restored(learn, before)
    results = []
    for with_find in (False, True):
        learn = sampler_learner(device='cuda')
        learn.fit(1)
        if with_find: learn.lr_find(show_plot=False)
        learn.fit(1)
        results.append((copy.deepcopy(learn.model.state_dict()), draws()))
    assert same(results[0], results[1])


def test_lr_find_restores_a_loss_with_state():
    "A SwitchLoss that switches during the sweep is put back to its step before the sweep."
    set_seed(0)
    switch = SwitchLoss([(nn.CrossEntropyLoss(), None),
                         (nn.CrossEntropyLoss(label_smoothing=0.1), lambda learn: learn.train_iter >= 5)], verbose=False)
    learn = Learner(digits_dls(), nn.Sequential(nn.Linear(64, 10)), loss_func=switch)
    learn.progress.show_bar = learn.progress.show_table = False
    learn.lr_find(num_it=20, show_plot=False)
    assert switch.current == 0
    learn.fit(1)
    assert switch.current == 1  # it does switch when training for real
