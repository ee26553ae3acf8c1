"""DistributedCallback with real processes: 2 CPU ranks joined by gloo on 127.0.0.1 (spawn_gloo), and torchrun.

One spawned group runs every scenario (spawning costs more than training on the digits), the single-process
references run here, and the tests compare. Reference: DDP averages the ranks' gradients, each rank holds an equal
share of every global batch and the loss is a mean, so a 2-rank run with SGD (no momentum, no batch norm) is the
single-process run with the same global batch size.
"""
import contextlib, io, os, shutil, subprocess, sys, tempfile, time, warnings
from pathlib import Path
import pytest, torch
from torch import nn
from torch.utils.data import Dataset
from phaselearn.all import *
from phaselearn.recorder import quiet
from phaselearn.distributed import spawn_gloo

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
REPO = Path(__file__).resolve().parents[1]
N_TRAIN, BS, EPOCHS = 1436, 64, 2   # an even training set: no padding, so the 2-rank run is exactly the 1-process run


class Net(nn.Module):
    "A small MLP whose second input, the sample indices, it ignores (they let a callback see which samples a rank got)."
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    def forward(self, x, idx): return self.body(x)


class Digits(Dataset):
    "The digits as a map-style dataset (not a TensorDataset): the DataLoader + EpochSampler path."
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], i, self.y[i]


class SeenIndices(Callback):
    "The indices of the training samples of every batch, per epoch."
    order = 70
    def before_fit(self): self.epochs = []
    def before_train(self): self.epochs.append([])
    def after_batch(self):
        if self.training: self.epochs[-1].append(self.xb[1].tolist())


def mse_of_probs(pred, targ): return ((pred.softmax(-1) - nn.functional.one_hot(targ, 10)) ** 2).mean()


def samples_counter():
    "A torchmetrics metric that counts the validation samples (summed across ranks when it synchronises)."
    import torchmetrics
    class CountSamples(torchmetrics.Metric):
        def __init__(self):
            super().__init__()
            self.add_state('n', default=torch.tensor(0.), dist_reduce_fx='sum')
        def update(self, pred, target): self.n += len(target)
        def compute(self): return self.n
    return CountSamples()


def make_learner(kind: str, n_train: int, path, distributed: bool, bs: int = BS):
    set_seed(0)
    x, y, xv, yv = digits_tensors()
    x, y = x[:n_train], y[:n_train]
    if kind == 'tensor':
        dls = DataLoaders(TensorLoader(x, torch.arange(len(x)), y, bs=bs, shuffle=True, seed=0),
                          TensorLoader(xv, torch.arange(len(xv)), yv, bs=2 * bs))
    else:
        dls = DataLoaders.from_datasets(Digits(x, y), Digits(xv, yv), bs=bs, seed=0)
    import torchmetrics   # synchronises itself across ranks: the callback must let it (sharded) or stop it (whole set)
    metrics = [accuracy, AvgMetric(mse_of_probs, name='rms_prob', finalize=torch.sqrt),
               TorchMetric(torchmetrics.classification.MulticlassF1Score(num_classes=10, average='macro'), name='f1'),
               TorchMetric(samples_counter(), name='n_samples')]   # a sum: double counting would show
    cbs = [SeenIndices()] + ([DistributedCallback()] if distributed else [])
    learn = Learner(dls, Net(), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.2, metrics=metrics,
                    n_inp=2, cbs=cbs, path=path)
    learn.progress.show_bar = False
    return learn


def state(learn): return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


def run_scenario(kind, n_train, path, distributed, train):
    "Train as `train(learn)` says; what it printed, its weights, the table, the samples seen, a validate()."
    learn = make_learner(kind, n_train, path, distributed)
    out = io.StringIO()
    with contextlib.redirect_stdout(out): train(learn)
    return dict(printed=out.getvalue(), state=state(learn), values=[row[:-1] for row in learn.recorder.values],
                seen=learn.seen_indices.epochs, model_type=type(learn.model).__name__, validate=learn.validate(),
                dls_type=type(learn.dls.train).__name__)


def fit_plain(learn): learn.fit(EPOCHS)
def fit_phased(learn):
    learn.fit_phases([TrainingPhase(epochs=1, lr=SchedCos(0.2, 0.02)), TrainingPhase(epochs=1.5, lr=0.05, bs=128)])
SCENARIOS = {'tensor': ('tensor', N_TRAIN, fit_plain), 'dataloader': ('dataloader', N_TRAIN, fit_plain),
             'phases': ('tensor', N_TRAIN, fit_phased), 'odd': ('tensor', N_TRAIN + 1, fit_plain)}


def worker(rank, path):
    "Runs on each rank of a 2-process gloo group."
    os.environ.pop('PHASELEARN_QUIET', None)   # these tests check who prints
    results = {name: run_scenario(kind, n, path, True, train) for name, (kind, n, train) in SCENARIOS.items()}
    learn = make_learner('tensor', N_TRAIN, path, True)
    with quiet(learn), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        results['lr_find'] = learn.lr_find(num_it=30, show_plot=False)
        results['after_lr_find'] = (type(learn.model).__name__, type(learn.dls.train).__name__)
        learn.fit(1)
    model_file = Path(path) / 'models' / 'ddp_model.pt'
    existed_before = model_file.exists()
    file = learn.save('ddp_model')
    results['save'] = (existed_before, Path(file) == model_file, model_file.exists())   # rank 0 wrote before the barrier
    return results


@pytest.fixture(scope='module')
def runs():
    "Each rank's results from one 2-process group, and the single-process references."
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        ranks = spawn_gloo(worker, world_size=2, args=(d,), timeout=300)
        spawn_seconds = time.perf_counter() - start
        os.environ.pop('PHASELEARN_QUIET', None)
        single = {name: run_scenario(kind, n, d, False, train) for name, (kind, n, train) in SCENARIOS.items()}
        learn = make_learner('tensor', N_TRAIN, d, False)
        with quiet(learn), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            single['lr_find'] = learn.lr_find(num_it=30, show_plot=False)
    print(f"2-process group: {spawn_seconds:.1f} s")
    return ranks, single


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize('name', ['tensor', 'dataloader', 'phases', 'odd'])
def test_ranks_end_with_identical_weights(runs, name):
    ranks, _ = runs
    assert_same_weights(ranks[0][name]['state'], ranks[1][name]['state'], atol=0)
    for r in ranks:   # after the fit: the plain model and the learner's own, unsharded, data
        assert r[name]['model_type'] == 'Net' and r[name]['dls_type'] in ('TensorLoader', 'DataLoader')


@pytest.mark.parametrize('name', ['tensor', 'dataloader', 'phases'])
def test_two_ranks_equal_one_process_with_the_global_batch(runs, name):
    ranks, single = runs
    assert_same_weights(ranks[0][name]['state'], single[name]['state'], atol=1e-5)
    # the table agrees too: train loss (reduced across ranks), validation loss and metrics (sharded, then reduced)
    torch.testing.assert_close(torch.tensor(ranks[0][name]['values']), torch.tensor(single[name]['values']),
                               atol=1e-5, rtol=0, check_dtype=False)
    torch.testing.assert_close(torch.tensor(ranks[1][name]['values']), torch.tensor(ranks[0][name]['values']),
                               atol=0, rtol=0, check_dtype=False)
    # validate() after the fit: the whole validation set on every rank
    for r in ranks: torch.testing.assert_close(torch.tensor(r[name]['validate']), torch.tensor(single[name]['validate']), atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', ['tensor', 'dataloader', 'phases'])
def test_each_rank_sees_a_disjoint_half_of_every_batch(runs, name):
    ranks, single = runs
    seen0, seen1, whole = ranks[0][name]['seen'], ranks[1][name]['seen'], single[name]['seen']
    assert len(seen0) == len(seen1) == len(whole)
    for epoch0, epoch1, epoch in zip(seen0, seen1, whole):
        assert len(epoch0) == len(epoch1) == len(epoch)          # as many batches as one process
        a, b = sum(epoch0, []), sum(epoch1, [])
        assert not set(a) & set(b)                               # disjoint
        assert sorted(a + b) == sorted(sum(epoch, []))           # together: the whole epoch
        assert len(a) == len(b)                                  # halves
        for batch0, batch1, batch in zip(epoch0, epoch1, epoch):
            assert batch0 == batch[0::2] and batch1 == batch[1::2]
    if name == 'tensor': assert seen0[0] != seen0[1]               # a new order each epoch


def test_validation_counts_every_sample_once(runs):
    "Sharded in the fit (each rank half, summed), whole in validate() afterwards (not summed): 359 samples either way."
    ranks, _ = runs
    for r in ranks:
        assert [row[-1] for row in r['tensor']['values']] == [359.] * EPOCHS
        assert r['tensor']['validate'][-1] == 359.


def test_odd_epoch_is_padded_and_ranks_stay_in_step(runs):
    ranks, _ = runs
    seen0, seen1 = ranks[0]['odd']['seen'], ranks[1]['odd']['seen']
    for epoch0, epoch1 in zip(seen0, seen1):
        a, b = sum(epoch0, []), sum(epoch1, [])
        assert len(a) == len(b) == (N_TRAIN + 2) // 2
        assert set(a) | set(b) == set(range(N_TRAIN + 1)) and len(set(a) & set(b)) == 1   # one sample padded in


def test_only_rank_zero_prints_the_table(runs):
    ranks, single = runs
    for name in SCENARIOS:
        assert ranks[1][name]['printed'] == ''
        printed = ranks[0][name]['printed'].splitlines()
        assert printed[0].split()[:5] == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'rms_prob']
        assert len(printed) == len(single[name]['printed'].splitlines())


def test_lr_find_agrees_across_ranks_and_with_one_process(runs):
    ranks, single = runs
    assert tuple(ranks[0]['lr_find']) == tuple(ranks[1]['lr_find'])
    torch.testing.assert_close(torch.tensor(tuple(ranks[0]['lr_find'])), torch.tensor(tuple(single['lr_find'])), rtol=1e-3, atol=0)
    assert ranks[0]['after_lr_find'] == ('Net', 'TensorLoader')


def test_save_writes_on_rank_zero_and_waits(runs):
    ranks, _ = runs
    for r in ranks: assert r['save'] == (False, True, True)   # after the barrier the file is there for every rank


def test_sync_bn_on_cpu_fails_early(monkeypatch):
    "SyncBatchNorm runs on GPUs only: on the CPU the callback says so before wrapping anything (no group needed)."
    import phaselearn.distributed as module
    learn = make_learner('tensor', 64, '.', False)
    learn.add_cb(DistributedCallback(sync_bn=True))
    monkeypatch.setattr(module, 'rank_and_world_size', lambda: (0, 2))
    with pytest.raises(ValueError, match='sync_bn=True needs CUDA'): learn.fit(1)
    assert type(learn.model) is Net


def test_torchrun_example_runs_on_cpu():
    env = {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'CUDA_VISIBLE_DEVICES': ''}
    env.pop('PHASELEARN_QUIET', None)
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                                 str(REPO / 'bench' / 'ddp_digits.py'), '--epochs', '2', '--path', d],
                                capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        seconds = time.perf_counter() - start
        errors = [line for line in result.stderr.splitlines() if 'Error' in line or 'error' in line or 'what()' in line]
        assert result.returncode == 0, result.stdout[-2000:] + '\n'.join(errors[:40]) + result.stderr[-2000:]
        assert result.stdout.count('train_loss') == 1                 # one table: rank 0's
        assert 'same weights on every rank: True' in result.stdout
        assert (Path(d) / 'models' / 'ddp_digits.pt').exists()
    print(f"torchrun example: {seconds:.1f} s")
    assert seconds < 60


def test_a_failing_rank_ends_the_torchrun_job_within_seconds():
    "bench/ddp_digits.py (the recommended pattern, `with distributed_job():`) with rank 1 raising at its 3rd batch under torchrun."
    import signal, threading
    env = {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'CUDA_VISIBLE_DEVICES': ''}
    with tempfile.TemporaryDirectory() as d:
        process = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                                    str(REPO / 'bench' / 'ddp_digits.py'), '--epochs', '2', '--path', d, '--fail-rank', '1',
                                    '--fail-at', '3'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                   cwd=REPO, start_new_session=True)
        lines, failed = [], threading.Event()
        def read():
            for line in process.stderr:
                lines.append(line)
                if 'injected failure on rank 1' in line: failed.set()
        reader = threading.Thread(target=read, daemon=True); reader.start()
        try:
            assert failed.wait(timeout=240), 'rank 1 never raised:\n' + ''.join(lines)[-3000:]
            seen = time.monotonic()
            process.wait(timeout=30)   # the bound: a job that waits in a barrier (30 min by default) fails here
            print(f"failing rank: the job ended {time.monotonic() - seen:.1f} s after rank 1's error was printed")
        finally:
            if process.poll() is None: os.killpg(process.pid, signal.SIGKILL)
            reader.join(timeout=5)
    stderr = ''.join(lines)
    assert process.returncode != 0
    assert '[rank 1/2] failed with RuntimeError: injected failure on rank 1 at training batch 3' in stderr
    assert 'Traceback (most recent call last)' in stderr and 'rank      : 1' in stderr   # ours, and torchrun's summary


FREED_SCRIPT = '''
import os, sys, weakref
import torch, torch.distributed as dist
from torch import nn
from phaselearn.all import *
out = sys.argv[1]
def freed(rank):
    with open(os.path.join(out, f"rank{rank}"), "w") as f: f.write(f"group alive when freed: {dist.is_initialized()}")
with distributed_job() as (rank, world_size):
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    learn = Learner(DataLoaders.from_tensors(x, y, bs=8), nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss(),
                    cbs=[DistributedCallback()])
    learn.progress.show_bar = learn.progress.show_table = False
    learn.fit(1, lr=1e-2)
    weakref.finalize(learn.model, freed, rank)
    del learn   # the learner and its callbacks refer to each other: only the cycle collector can free them
'''


def test_a_finished_learner_is_freed_while_the_group_exists(tmp_path):
    """`teardown_distributed` collects garbage before destroying the group: a learner left in a reference cycle (with its
    model: under FSDP, sharded parameters and a device mesh) is freed while its process group exists, not at interpreter
    exit after it (where a rank could abort after a successful run)."""
    script = tmp_path / 'freed.py'
    script.write_text(FREED_SCRIPT)
    env = {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'CUDA_VISIBLE_DEVICES': ''}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for rank in (0, 1): assert (tmp_path / f'rank{rank}').read_text() == 'group alive when freed: True'
