"""No host-device synchronisation per batch in the default loop.

Reading a tensor's value on the host (`.item()`, `float(t)`, `int(t)`, `bool(t)`, `.tolist()`, `.numpy()`, indexing a
list with a tensor) makes the host wait for the device. On a CPU machine nothing waits, so these tests count the calls
themselves: every such call made during a fit is recorded with the code that made it, and the library's own calls must
be O(epochs), not O(batches). Where CUDA is available, a second test asks CUDA itself (`torch.cuda.set_sync_debug_mode`).
"""
import contextlib, io
import pytest
import torch
from torch import nn
from phaselearn.all import *

from syncs import SyncCounter, cuda_sync_warnings


def digits_learner(**kwargs):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return Learner(digits_dls(bs=64, seed=0, device=kwargs.pop('data_device', None)), model,
                   loss_func=nn.CrossEntropyLoss(), lr=1e-2, metrics=[accuracy], **kwargs)


def test_counter_sees_every_kind_of_read():
    t = torch.tensor(2.)
    with SyncCounter() as counter:
        t.item(); float(t); int(t); bool(t); t.tolist(); [0, 1, 2][torch.tensor(1)]; f"{t:.2f}"
        if t: pass
    assert counter.total() == 8, counter.calls
    assert counter.by_origin(__file__.replace('\\', '/')) == 8, counter.calls
    assert torch.Tensor.item is torch._C.TensorBase.item  # restored


def fit_and_count(n_epoch=2, **progress):
    learn = digits_learner()
    learn.progress.refresh = progress.get('refresh', 1e9)
    learn.progress.bar_interval = progress.get('bar_interval', 0.1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        learn.fit(1)  # first fit: the optimizer state is created outside the counted fit
        with SyncCounter() as counter: learn.fit(n_epoch)
    return learn, counter


def test_default_loop_syncs_per_epoch_not_per_batch():
    n_epoch = 2
    learn, counter = fit_and_count(n_epoch)
    n_batches = len(learn.dls.train) + len(learn.dls.valid)
    assert len(learn.dls.train) == 23
    ours = counter.total(exclude=('torch.optim',))
    assert ours < 5 * n_epoch, f"{ours} host reads in {n_epoch} epochs of {n_batches} batches: {dict(counter.calls)}"
    assert counter.by_origin('phaselearn') == ours, dict(counter.calls)  # nothing else (tqdm, fastcore) reads tensors
    # torch's own optimizer reads only its `step` counters, which live on the CPU even when training on a GPU
    steps = {id(state['step']) for state in learn.opt.opt.state.values()}
    assert counter.tensor_ids['torch.optim'] <= steps, "torch.optim read tensors other than its step counters"


def test_syncs_do_not_grow_with_batches():
    "Four times the epochs, at most four times the reads: they scale with epochs, whatever the batch count."
    _, two = fit_and_count(2)
    _, eight = fit_and_count(8)
    assert eight.total(exclude=('torch.optim',)) <= 4 * two.total(exclude=('torch.optim',))


def test_validate_reads_once():
    learn = digits_learner()
    with contextlib.redirect_stderr(io.StringIO()), SyncCounter() as counter: learn.validate()
    assert counter.total(exclude=('torch.optim',)) <= 2, dict(counter.calls)


def test_refresh_throttles_the_postfix():
    "With refresh=0 the bar reads the smoothed loss after every training batch; that is the only per-batch read."
    learn, counter = fit_and_count(1, refresh=0, bar_interval=0)
    n_train = len(learn.dls.train)
    ours = counter.total(exclude=('torch.optim',))
    assert n_train <= ours < n_train + 5, dict(counter.calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sync_debug_mode():
    "On a GPU, CUDA itself reports every synchronising call: a fit must trigger O(epochs) of them."
    n_epoch = 3
    learn = digits_learner(device='cuda', data_device='cuda')
    learn.progress.refresh = 1e9
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        learn.fit(1)
        syncs = cuda_sync_warnings(lambda: learn.fit(n_epoch))
    n_batches = n_epoch * (len(learn.dls.train) + len(learn.dls.valid))
    assert len(syncs) < 5 * n_epoch, f"{len(syncs)} syncs for {n_batches} batches: {[str(w.message)[:100] for w in syncs[:5]]}"


def test_trackers_add_no_per_batch_sync(tmp_path, monkeypatch):
    "MLflow, W&B (offline), throughput and Optuna pruning attached: a few reads per fit and epoch more, none per batch."
    optuna, _, _ = (pytest.importorskip(m) for m in ('optuna', 'mlflow', 'wandb'))
    from phaselearn.trackers import MLflowCallback, WandbCallback, ThroughputCallback, OptunaPruningCallback
    monkeypatch.setenv('WANDB_SILENT', 'true')
    def count(n_epoch, trackers):
        learn = digits_learner(path=tmp_path)
        learn.progress.refresh = 1e9  # the loggers read the loss at the progress display's rate: per epoch here
        cbs = [MLflowCallback(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=tmp_path / 'artifacts'), WandbCallback(mode='offline', dir=tmp_path),
               ThroughputCallback(), OptunaPruningCallback(optuna.create_study().ask())] if trackers else []
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            learn.fit(1)
            with SyncCounter() as counter: learn.fit(n_epoch, cbs=cbs)
        return counter
    plain, tracked = count(2, False), count(2, True)
    extra = tracked.total(exclude=('torch.optim',)) - plain.total(exclude=('torch.optim',))
    assert 0 <= extra <= 2 + 2 * 2, (dict(plain.calls), dict(tracked.calls))  # the first step's loss, then per epoch
    assert tracked.by_origin('phaselearn') == tracked.total(exclude=('torch.optim',)), dict(tracked.calls)  # no library reads tensors
    longer = count(6, True)
    assert longer.total(exclude=('torch.optim',)) <= 3 * tracked.total(exclude=('torch.optim',))
