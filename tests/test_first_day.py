"""A user's first day (issue 19): a regression monitored on its own metric, a first custom callback, and the mistakes
people make on day one. Each test failed on the main branch before this change: a monitor went the wrong way, a
message named nothing useful, or the mistake trained nothing without a word."""
import math, warnings
import numpy as np
import pytest
import torch
from torch import nn
from phaselearn.all import *

torch.set_num_threads(1)


def regression_learner(lr=0.05, bs=32, metrics=(mae,), **kwargs):
    set_seed(0)
    x = torch.randn(256, 3)
    y = x @ torch.tensor([[1.5], [-2.], [0.5]]) + 0.3 + 0.05 * torch.randn(256, 1)
    dls = DataLoaders.from_tensors(x[:192], y[:192], x[192:], y[192:], bs=bs)
    model = kwargs.pop('model', None) or nn.Linear(3, 1)
    kwargs.setdefault('opt_func', torch.optim.SGD)
    learn = Learner(dls, model, loss_func=nn.MSELoss(), lr=lr, metrics=metrics, **kwargs)
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


def column(learn, name):
    return [row[learn.recorder.names.index(name)] for row in learn.recorder.values]


# 1. Monitors know which way is better
@pytest.mark.parametrize('name', ['mae', 'mse', 'rmse', 'perplexity', 'error_rate'])
def test_library_metrics_say_lower_is_better(name):
    metric = as_metric(globals()[name])
    assert metric.lower_is_better is True and metric.name == name


def test_accuracy_and_torchmetrics_directions():
    assert as_metric(accuracy).lower_is_better is False
    torchmetrics = pytest.importorskip('torchmetrics')
    assert as_metric(torchmetrics.MeanAbsoluteError()).lower_is_better is True
    assert as_metric(torchmetrics.classification.MulticlassAccuracy(num_classes=3)).lower_is_better is False


@pytest.mark.parametrize('name', ['mae', 'mse', 'rmse'])
def test_save_model_keeps_the_lowest_error(tmp_path, name):
    "The issue's run: a regression monitored on an error metric keeps the epoch with the smallest error."
    learn = regression_learner(lr=0.55, bs=192, metrics=[mae, mse, rmse], path=tmp_path)
    save = SaveModelCallback(monitor=name)
    learn.fit(6, cbs=[save])
    values = column(learn, name)
    assert any(b > a for a, b in zip(values, values[1:]))            # not monotonic: the choice matters
    assert save.best_epoch == int(np.argmin(values))
    got = learn.validate()[1 + ['mae', 'mse', 'rmse'].index(name)]
    assert got == pytest.approx(min(values), rel=1e-5)


def test_early_stopping_and_plateau_follow_the_metric():
    learn = regression_learner(lr=0.05)
    early, plateau = EarlyStoppingCallback('mae'), ReduceLROnPlateau('mae')
    learn.fit(5, cbs=[early, plateau])
    values = column(learn, 'mae')
    assert len(values) == 5 and all(b < a for a, b in zip(values, values[1:]))   # still improving: no stop
    assert early.stopped_epoch is None and plateau.messages == [] and early.best_epoch == 4


def test_comp_overrides_and_unknown_direction_is_an_error():
    def r2(pred, targ): return 1 - ((pred - targ) ** 2).mean() / ((targ - targ.mean()) ** 2).mean()
    learn = regression_learner(metrics=[r2])
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match=r"monitor='r2': the metric does not say whether lower or higher is better"):
        learn.fit(1, cbs=[EarlyStoppingCallback('r2')])
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))   # before any batch
    tracker = TrackerCallback('r2', comp=np.greater)
    learn.fit(1, cbs=[tracker])
    assert tracker.lower_is_better is False
    learn = regression_learner(metrics=[AvgMetric(r2, lower_is_better=False)])
    tracker = TrackerCallback('r2')
    learn.fit(1, cbs=[tracker])
    assert tracker.comp is np.greater


def test_no_guess_from_the_name():
    "A metric named like a loss but declared higher-is-better is tracked as higher-is-better."
    def loss_of_margin(pred, targ): return (pred - targ).abs().mean()
    learn = regression_learner(metrics=[AvgMetric(loss_of_margin, lower_is_better=False)])
    tracker = TrackerCallback('loss_of_margin')
    learn.fit(1, cbs=[tracker])
    assert tracker.comp is np.greater


# 2. Errors that say what is wrong
def test_frozen_model():
    learn = regression_learner()
    for p in learn.model.parameters(): p.requires_grad_(False)
    with pytest.raises(ValueError, match=r'requires_grad=False \(all frozen\).*learn.unfreeze\(\)'): learn.fit(1)


def test_loss_class_instead_of_instance():
    with pytest.raises(TypeError, match=r'loss_func is the class MSELoss, not a loss: pass an instance, loss_func=MSELoss\(\)'):
        Learner(regression_learner().dls, nn.Linear(3, 1), loss_func=nn.MSELoss)


def test_loss_returning_a_float():
    learn = Learner(regression_learner().dls, nn.Linear(3, 1), loss_func=lambda pred, targ: 1.0, default_cbs=False)
    with pytest.raises(TypeError, match='loss_func must return a scalar tensor .* got float 1.0'): learn.fit(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_on_a_cpu_machine():
    with pytest.raises(ValueError, match=r"device='cuda' cannot be used here .*leave device=None"):
        Learner(regression_learner().dls, nn.Linear(3, 1), loss_func=nn.MSELoss(), device='cuda')


def test_plot_sched_before_any_fit():
    with pytest.raises(ValueError, match='no training batch has been recorded yet: run a fit first'):
        regression_learner().recorder.plot_sched()


def test_one_cycle_with_one_lr_per_layer_group():
    learn = regression_learner()
    with pytest.raises(ValueError, match=r'^lr_max has 2 values, one per layer group, but the optimizer has 1 layer group'):
        learn.fit_one_cycle(1, lr_max=[1e-3, 1e-2])
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    learn = Learner(learn.dls, model, loss_func=nn.MSELoss(), splitter=lambda m: [list(m[0].parameters()), list(m[2].parameters())])
    learn.progress.show_bar = learn.progress.show_table = False
    learn.fit_one_cycle(2, lr_max=[1e-3, 1e-2])   # a list is one peak per layer group, as in fit
    np.testing.assert_allclose(learn.recorder.hyper('lr').max(0), [1e-3, 1e-2], rtol=1e-3)


def test_one_cycle_at_lr_zero():
    with pytest.raises(ValueError, match='lr_max=0: the one-cycle schedule would be 0 throughout'):
        regression_learner().fit_one_cycle(1, lr_max=0)


def test_phase_value_checked_at_construction():
    with pytest.raises(TypeError, match=r"TrainingPhase\(lr='1e-3'\): .* \(write lr=1e-3\)"): TrainingPhase(epochs=1, lr='1e-3')


# 3. No silent no-ops
class Hollow:
    "An iterable whose len() says 3 but that yields nothing."
    def __len__(self): return 3
    def __iter__(self): return iter([])


def test_loader_yielding_less_than_its_len():
    learn = regression_learner()
    learn.dls = DataLoaders(Hollow(), None)
    with pytest.raises(ValueError, match=r'the training loader yielded 0 batches where its len\(\) promised 3'): learn.fit(1)


def test_model_reassigned_after_the_optimizer_exists():
    learn = regression_learner()
    learn.fit(1)
    new = nn.Linear(3, 1)
    start = [p.detach().clone() for p in new.parameters()]
    learn.model = new
    with pytest.warns(UserWarning, match='learn.model was replaced'): learn.fit(2)
    losses = column(learn, 'train_loss')
    assert losses[1] < losses[0]                                   # it trains: the two epochs differ
    assert not all(torch.equal(a, b) for a, b in zip(start, new.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter('error'); learn.fit(1)              # the same model again: no warning, same optimizer



def test_layer_replaced_after_the_optimizer_exists():
    "The same mistake one level down: `learn.model[1] = nn.Linear(...)` (a new head) after a fit."
    learn = regression_learner(model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)))
    learn.fit(1)
    learn.model[1] = head = nn.Linear(4, 1)
    start = head.weight.detach().clone()
    with pytest.warns(UserWarning, match=r'learn.model was replaced \(or a layer of it\)'): learn.fit(1)
    assert not torch.equal(start, head.weight)                      # the new head trains
    held = {id(p) for group in learn.opt.param_groups for p in group['params']}
    assert all(id(p) in held for p in learn.model.parameters())

# 4. A single metric
def test_single_metric():
    learn = regression_learner(metrics=mae)
    learn.fit(1)
    assert learn.recorder.names == ['epoch', 'train_loss', 'valid_loss', 'mae', 'time']


# 5. A first custom callback
class LastRow(Callback):
    "What a user writes first: read this epoch's row in after_epoch (default order)."
    def __init__(self): self.rows = []
    def after_epoch(self):
        recorder = self.learn.recorder
        self.rows.append(dict(zip(recorder.names, recorder.values[-1])))


def test_first_callback_sees_this_epochs_row():
    learn = regression_learner()
    cb = LastRow()
    learn.fit(2, cbs=[cb])
    assert [row['epoch'] for row in cb.rows] == [0, 1]
    assert [row['mae'] for row in cb.rows] == column(learn, 'mae')


def test_first_callback_inside_lr_find():
    learn = regression_learner()
    cb = LastRow()
    learn.add_cb(cb)
    suggestions = learn.lr_find(num_it=12, show_plot=False)          # 6 batches an epoch: two epochs of sweep
    assert all(math.isfinite(v) for v in suggestions)
    assert [row['epoch'] for row in cb.rows] == [0, 1] and 'valid_loss' not in cb.rows[0]
    cb.rows.clear()
    learn.fit(1)
    assert [row['epoch'] for row in cb.rows] == [0]


class PrintValidLoss(Callback):
    "The callbacks chapter's first callback (nbs/02_callback.ipynb, 'Your first callback'), as written there."
    def after_epoch(self):
        recorder = self.learn.recorder
        row = dict(zip(recorder.names, recorder.values[-1]))   # this epoch's row, by column name
        if 'valid_loss' in row:                                  # lr_find's sweep has no validation (below)
            print(f"epoch {self.epoch}: valid_loss {row['valid_loss']:.4f}")


def test_the_chapters_first_callback(capsys):
    learn = regression_learner()
    learn.fit(3, cbs=[PrintValidLoss()])
    expected = [f"epoch {i}: valid_loss {v:.4f}" for i, v in enumerate(column(learn, 'valid_loss'))]
    assert capsys.readouterr().out.splitlines() == expected
    learn.add_cb(PrintValidLoss())
    learn.lr_find(num_it=12, show_plot=False)                         # runs it, prints nothing, does not crash
    assert capsys.readouterr().out == ''


# Other day-one mistakes: the messages they give
def test_cross_entropy_with_float_targets_names_the_shapes():
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,)).float()
    learn = Learner(DataLoaders.from_tensors(x, y, x, y, bs=16), nn.Linear(8, 3), loss_func=nn.CrossEntropyLoss(),
                    default_cbs=False)
    with pytest.raises(RuntimeError, match=r'model output of shape \(16, 3\) and target\(s\) of shape \(16,\)'): learn.fit(1)


def test_single_callback_without_a_list():
    learn = regression_learner(cbs=EarlyStoppingCallback('mae'))
    assert isinstance(learn.early_stopping, EarlyStoppingCallback)
    tracker = TrackerCallback('mae')
    learn.fit(1, cbs=tracker)
    assert tracker.best_epoch == 0 and tracker not in learn.cbs


def test_metric_by_name_and_accuracy_of_one_column():
    with pytest.raises(TypeError, match=r"not names: got the str 'accuracy'; pass the function itself, metrics=\[accuracy\]"):
        regression_learner(metrics=['accuracy'])
    learn = regression_learner(metrics=[accuracy])     # one output column: an arg-max is always 0
    with pytest.raises(ValueError, match=r'accuracy compares the arg-max .* got predictions of shape \(64, 1\)'): learn.fit(1)   # the validation batch


def test_numpy_arrays_into_the_loader():
    x, y = np.random.randn(64, 3).astype('float32'), np.random.randn(64, 1).astype('float32')
    with pytest.raises(TypeError, match=r'tensor 0 is a numpy.ndarray: convert it with torch.as_tensor'):
        DataLoaders.from_tensors(x, y, x, y)


def test_tuple_output_names_its_structure():
    class RNNLike(nn.Module):   # returns (output, state), as nn.LSTM does
        def __init__(self): super().__init__(); self.lin = nn.Linear(3, 1)
        def forward(self, x): return self.lin(x), (x[:1], x[:1])
    learn = regression_learner()
    learn.model = RNNLike()
    with pytest.raises(AttributeError, match=r'model output of shape tuple\(\(32, 1\), tuple\(\(1, 3\), \(1, 3\)\)\) '
                                             r'and target\(s\) of shape \(32, 1\)'):
        learn.fit(1)


def test_loss_that_broadcasts_is_an_error():
    "MSELoss on outputs (N, 1) and targets (N,) compares every output with every target: torch only warns."
    learn = regression_learner()
    x, y = learn.dls.train.tensors
    learn.dls = DataLoaders.from_tensors(x, y[:, 0], x, y[:, 0], bs=32)   # targets of shape (N,)
    with pytest.raises(ValueError, match=r'model output of shape \(32, 1\) and target\(s\) of shape \(32,\): Using a target size'):
        learn.fit(1)
    with pytest.raises(ValueError, match='Using a target size'): learn.validate()
    with pytest.warns(UserWarning, match='Using a target size'):   # outside a fit torch's warning is left alone
        torch.nn.functional.mse_loss(torch.zeros(2, 1), torch.zeros(2))


def test_accuracy_with_targets_of_another_shape():
    "Targets of shape (N, 1) (a table's column) against predictions (N, C): the comparison would broadcast to (N, N)."
    pred, targ = torch.tensor([[2., 0.], [0., 2.], [2., 0.]]), torch.tensor([[0], [1], [1]])
    with pytest.raises(ValueError, match=r'predicted classes, of shape \(3,\), with targets of shape \(3, 1\)'):
        accuracy(pred, targ)
    assert accuracy(pred, targ[:, 0]) == pytest.approx(2 / 3)


def test_optimizer_instance_and_model_without_parameters():
    with pytest.raises(TypeError, match=r'got an optimizer already built \(Adam\): pass the class, opt_func=torch.optim.Adam'):
        regression_learner(opt_func=torch.optim.Adam(nn.Linear(3, 1).parameters()))
    learn = regression_learner()
    learn.model = nn.Identity()
    with pytest.raises(ValueError, match=r'the model \(Identity\) has no parameters'): learn.fit(1)
