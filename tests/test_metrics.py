"""Metrics through a real Learner, checked against the same quantity computed over the whole validation set at once.

The validation sets are cut so that the last batch is partial: an epoch value that weighted batches equally, or
averaged batch roots for rmse, would fail these tests.
"""
import contextlib, io, math, sys, warnings
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from phaselearn.all import *
from phaselearn.recorder import quiet

torchmetrics = pytest.importorskip('torchmetrics')


def fit_quietly(learn, n_epoch=1):
    with quiet(learn), contextlib.redirect_stderr(io.StringIO()): learn.fit(n_epoch)
    return learn

def validate_quietly(learn):
    with quiet(learn), contextlib.redirect_stderr(io.StringIO()): return learn.validate()

def whole_set(learn):
    "Predictions and targets over the whole validation set in one forward pass."
    x = torch.cat([b[0] for b in learn.dls.valid]); y = torch.cat([b[1] for b in learn.dls.valid])
    learn.model.eval()
    with torch.no_grad(): return learn.model(x.to(learn.device)), y.to(learn.device)


# ---------------------------------------------------------------- classification on the digits

def digits_learner(bs, metrics, device=None):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    dls = digits_dls(bs=bs, seed=0)
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), lr=1e-2, metrics=metrics, device=device)

@pytest.mark.parametrize('bs', [7, 50, 64, 500])
def test_classification_metrics_equal_whole_set(bs):
    tm_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average='micro')
    learn = fit_quietly(digits_learner(bs, [accuracy, error_rate, tm_acc]))
    n_valid, valid_bs = len(learn.dls.valid.tensors[0]), learn.dls.valid.bs
    assert n_valid % valid_bs != 0 or bs == 500, "the last validation batch should be partial"
    loss, acc, err, tm_value = validate_quietly(learn)
    preds, targets = whole_set(learn)
    assert math.isclose(loss, F.cross_entropy(preds, targets).item(), rel_tol=1e-5)
    expected_acc = (preds.argmax(1) == targets).double().mean().item()
    assert math.isclose(acc, expected_acc, abs_tol=1e-6)
    assert math.isclose(err, 1 - expected_acc, abs_tol=1e-6)
    assert math.isclose(tm_value, expected_acc, abs_tol=1e-6)
    # the epoch table holds the same numbers (the model has not changed since the end of the fit)
    assert np.allclose(learn.recorder.values[-1][2:5], [loss, acc, err], atol=1e-6)

def test_train_loss_and_smooth_loss_are_exact():
    "train_loss: the batch losses weighted by batch size; smoothed loss: the debiased EMA of those losses."
    class Log(Callback):
        order = 70
        def before_fit(self): self.losses, self.sizes = [], []
        def after_batch(self):
            if self.training: self.losses.append(self.loss.item()); self.sizes.append(len(self.yb[0]))
    log = Log()
    learn = digits_learner(100, [accuracy])
    learn.add_cb(log)
    fit_quietly(learn, 3)
    per_epoch = len(learn.dls.train)
    losses, sizes = np.array(log.losses), np.array(log.sizes)
    assert sizes[per_epoch - 1] != sizes[0]  # partial last training batch
    for epoch in range(3):
        part = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        expected = (losses[part] * sizes[part]).sum() / sizes[part].sum()
        assert math.isclose(learn.recorder.values[epoch][1], expected, rel_tol=1e-6)
    beta, raw, smooth = 0.98, 0., []
    for t, loss in enumerate(losses, 1):
        raw = beta * raw + (1 - beta) * loss; smooth.append(raw / (1 - beta ** t))
    assert np.allclose(learn.recorder.losses, smooth, rtol=1e-6)


# ---------------------------------------------------------------- regression

def regression_learner(metrics, torch_loaders=False, bs=16):
    set_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g)
    y = x @ torch.tensor([[1.], [-2.], [0.5], [3.], [0.]]) + 0.1 * torch.randn(300, 1, generator=g)
    y[250:] *= 5  # make the batches of the validation set differ a lot: batch-wise averaging would show
    x_train, y_train, x_valid, y_valid = x[:200], y[:200], x[200:], y[200:]  # 100 valid samples in batches of 32: 32,32,32,4
    if torch_loaders:
        dls = DataLoaders(DataLoader(TensorDataset(x_train, y_train), batch_size=bs, shuffle=True),
                          DataLoader(TensorDataset(x_valid, y_valid), batch_size=2 * bs))
    else: dls = DataLoaders.from_tensors(x_train, y_train, x_valid, y_valid, bs=bs, seed=0)
    return Learner(dls, nn.Linear(5, 1), loss_func=nn.MSELoss(), lr=1e-2, metrics=metrics)

@pytest.mark.parametrize('torch_loaders', [False, True])
def test_regression_metrics_equal_whole_set(torch_loaders):
    metrics = [rmse, mae, torchmetrics.MeanSquaredError(squared=False), torchmetrics.MeanAbsoluteError()]
    learn = fit_quietly(regression_learner(metrics, torch_loaders))
    loss, rmse_value, mae_value, tm_rmse, tm_mae = validate_quietly(learn)
    preds, targets = whole_set(learn)
    err = (preds - targets).double()
    assert math.isclose(loss, (err ** 2).mean().item(), rel_tol=1e-5)
    assert math.isclose(rmse_value, (err ** 2).mean().sqrt().item(), rel_tol=1e-5)
    assert math.isclose(mae_value, err.abs().mean().item(), rel_tol=1e-5)
    assert math.isclose(tm_rmse, rmse_value, rel_tol=1e-5) and math.isclose(tm_mae, mae_value, rel_tol=1e-5)
    # a mean of per-batch roots is measurably different here: the test can tell the two apart
    roots = [((p - t) ** 2).mean().sqrt().item() * len(t) for p, t in zip(preds.split(32), targets.split(32))]
    assert abs(sum(roots) / len(targets) - rmse_value) > 1e-3 * rmse_value

def test_metric_names_in_table():
    learn = fit_quietly(regression_learner([rmse, mae, torchmetrics.MeanAbsoluteError()]))
    assert learn.recorder.names == ['epoch', 'train_loss', 'valid_loss', 'rmse', 'mae', 'mean_absolute_error', 'time']


# ---------------------------------------------------------------- faulty metrics and inputs

def test_raising_metric_names_itself():
    def shape_bug(pred, targ): return (pred @ targ).mean()  # (bs, 1) @ (bs, 1): a shape error
    learn = regression_learner([mae, shape_bug])
    with pytest.raises(RuntimeError, match="metric 'shape_bug' \\(AvgMetric\\) failed in accumulate"): fit_quietly(learn)

def test_metric_failing_in_value_names_itself():
    class Broken(Metric):
        @property
        def value(self): raise KeyError('missing state')
        @property
        def name(self): return 'broken_metric'
    with pytest.raises(KeyError, match="metric 'broken_metric' \\(Broken\\) failed in value"):
        validate_quietly(regression_learner([Broken()]))

def test_non_scalar_metric_is_reported_by_name():
    def per_sample(pred, targ): return (pred - targ).abs().reshape(-1)[:4]
    with pytest.raises(ValueError, match="metric 'per_sample' must be a scalar.*shape \\(4,\\)"):
        validate_quietly(regression_learner([per_sample]))

def test_nan_metric_is_reported_by_name_once_per_epoch():
    calls = []
    def sometimes_nan(pred, targ): calls.append(1); return torch.tensor(float('nan'))
    learn = regression_learner([sometimes_nan])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fit_quietly(learn, 2)
    nan_warnings = [w for w in caught if "metric 'sometimes_nan' is NaN" in str(w.message)]
    assert len(nan_warnings) == 2 and len(calls) == 2 * len(learn.dls.valid)
    assert math.isnan(learn.recorder.values[-1][3])

def test_bad_metric_arguments():
    with pytest.raises(TypeError, match='pass an instance'): as_metric(torchmetrics.MeanAbsoluteError)
    with pytest.raises(TypeError, match='metrics must be'): as_metric('accuracy')
    with pytest.raises(ValueError, match='beta must be'): AvgSmoothLoss(beta=-0.1)

def test_missing_torchmetrics_message(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torchmetrics', None)
    with pytest.raises(ImportError, match='pip install torchmetrics'): TorchMetric(object())
    assert isinstance(as_metric(rmse), AvgMetric)  # plain metrics do not need torchmetrics


# ---------------------------------------------------------------- devices

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchmetric_on_cpu_moves_to_the_gpu():
    metric = torchmetrics.MeanAbsoluteError()  # state on the CPU
    set_seed(0)
    learn = regression_learner([metric, mae])
    learn.to('cuda')
    fit_quietly(learn)
    loss, tm_mae, our_mae = validate_quietly(learn)
    assert metric.device.type == 'cuda'
    assert math.isclose(tm_mae, our_mae, rel_tol=1e-5)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_gpu_equal_whole_set():
    learn = fit_quietly(digits_learner(50, [accuracy], device='cuda'))
    loss, acc = validate_quietly(learn)
    preds, targets = whole_set(learn)
    assert math.isclose(acc, (preds.argmax(1) == targets).double().mean().item(), abs_tol=1e-6)
    assert math.isclose(loss, F.cross_entropy(preds, targets).item(), rel_tol=1e-5)
