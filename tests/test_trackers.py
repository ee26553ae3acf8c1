"""Trackers and search against the real libraries: a real `mlflow server` (loopback, SQLite backend store) started and
stopped here, an MLflow file store, W&B runs in offline mode read back from their files, Optuna studies in SQLite,
and the throughput callback's FLOP count against a hand count."""
import contextlib, io, os, signal, socket, subprocess, sys, time, urllib.request
import pytest
import torch
from torch import nn
from phaselearn.all import *
from phaselearn.trackers import *

mlflow = pytest.importorskip('mlflow')
optuna = pytest.importorskip('optuna')
wandb = pytest.importorskip('wandb')
from mlflow import MlflowClient


def digits_learner(path, **kwargs):
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    learn = Learner(digits_dls(bs=64, seed=0), model, loss_func=nn.CrossEntropyLoss(), lr=1e-2, metrics=[accuracy], path=path, **kwargs)
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


def plan():
    return [TrainingPhase(epochs=1, lr=SchedLin(1e-4, 1e-2)), TrainingPhase(epochs=1, lr=SchedCos(1e-2, 1e-4))]


class Fail(Callback):
    "Raises `exc` at training batch `at` of epoch `epoch`."
    def __init__(self, exc, epoch=0, at=3): self.exc, self.epoch_, self.at = exc, epoch, at
    def after_batch(self):
        if self.learn.training and self.learn.epoch == self.epoch_ and self.learn.iter == self.at: raise self.exc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def mlflow_server(tmp_path_factory):
    "A real tracking server on 127.0.0.1 with a SQLite backend store; bounded start-up wait, always killed."
    root = tmp_path_factory.mktemp('mlflow_server')
    port = free_port()
    log = open(root / 'server.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'mlflow', 'server', '--backend-store-uri', f"sqlite:///{root / 'mlflow.db'}",
                             '--artifacts-destination', str(root / 'artifacts'), '--host', '127.0.0.1', '--port', str(port),
                             '--workers', '1'], cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None: pytest.fail(f"mlflow server exited ({proc.returncode}): {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + '/health', timeout=2) as r:
                    if r.status == 200: break
            except OSError: pass
            if time.monotonic() > deadline: pytest.fail(f"mlflow server not up in 150 s: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError): os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError): os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def test_module_imports_no_tracker_library():
    code = ("import sys, phaselearn.all, phaselearn.trackers; "
            "print(sorted(m for m in ('mlflow', 'wandb', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'optuna', None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError, match=r"pip install optuna"): OptunaPruningCallback(object())


def test_mlflow_server_run(mlflow_server, tmp_path):
    "Everything a fit logs, read back from the server through MlflowClient and compared with the recorder."
    learn = digits_learner(tmp_path)
    cb = MLflowCallback(tracking_uri=mlflow_server, experiment='phaselearn-test', run_name='digits', log_every=0,
                        log_checkpoints=True, log_model=True)
    tp = ThroughputCallback()
    learn.fit_phases(plan(), cbs=[cb, tp, CheckpointCallback()])
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(cb.run_id)
    assert run.info.status == 'FINISHED' and run.info.run_name == 'digits'
    assert client.get_experiment(run.info.experiment_id).name == 'phaselearn-test'
    params = run.data.params
    assert params['n_phases'] == '2' and params['phase_0'].startswith('TrainingPhase(epochs=1, lr=SchedLin(')
    assert params['opt_func'] == 'Adam' and params['metrics'] == 'accuracy' and params['n_params'] == '2410'
    # per-step hyperparameters at every batch (log_every=0): step n is the lr after n training batches
    lrs = client.get_metric_history(cb.run_id, 'lr')
    recorded = learn.recorder.hyper('lr')[:, 0]
    assert [m.step for m in sorted(lrs, key=lambda m: m.step)] == list(range(1, len(recorded) + 1))
    assert all(abs(m.value - recorded[m.step - 1]) <= 1e-12 * max(1, recorded[m.step - 1]) for m in lrs)
    smooth = {m.step: m.value for m in client.get_metric_history(cb.run_id, 'smooth_loss')}
    assert abs(smooth[len(recorded)] - learn.recorder.losses[-1]) < 1e-6
    # epoch metrics under the recorder's column names, step = epoch
    names = learn.recorder.names
    for column in ('train_loss', 'valid_loss', 'accuracy', 'samples_per_s', 'tflops_per_s'):
        history = sorted(client.get_metric_history(cb.run_id, column), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1], column
        expected = ([row[names.index(column)] for row in learn.recorder.values] if column in names else
                    [epoch[column] for epoch in tp.history])  # the throughput columns left the table with their callback
        assert [m.value for m in history] == pytest.approx(expected), column
    artifacts = {a.path for a in client.list_artifacts(cb.run_id)}
    assert {'phase_preview.png', 'checkpoints', 'model'} <= artifacts, artifacts
    assert [a.path for a in client.list_artifacts(cb.run_id, 'model')] == ['model/model.pt']
    assert 'checkpoints/checkpoint.pt' in {a.path for a in client.list_artifacts(cb.run_id, 'checkpoints')}
    local = client.download_artifacts(cb.run_id, 'model/model.pt', str(tmp_path))
    weights = torch.load(local, weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in learn.model.state_dict().items())


def test_mlflow_resumed_fit_continues_its_run(mlflow_server, tmp_path):
    "Ctrl-C in epoch 1: the run is KILLED; the fit resumed from the checkpoint goes on in the same run and ends FINISHED."
    client = MlflowClient(tracking_uri=mlflow_server)
    learn = digits_learner(tmp_path)
    cb = MLflowCallback(tracking_uri=mlflow_server, experiment='resume', log_every=0)
    with pytest.raises(KeyboardInterrupt): learn.fit(3, cbs=[cb, CheckpointCallback(), Fail(KeyboardInterrupt(), epoch=1)])
    assert client.get_run(cb.run_id).info.status == 'KILLED'
    learn2 = digits_learner(tmp_path)
    cb2 = MLflowCallback(tracking_uri=mlflow_server, experiment='resume', log_every=0)
    learn2.fit(3, cbs=[cb2, CheckpointCallback()], resume='checkpoint')
    assert cb2.run_id == cb.run_id
    assert client.get_run(cb.run_id).info.status == 'FINISHED'
    assert len(client.search_runs([client.get_experiment_by_name('resume').experiment_id])) == 1
    history = client.get_metric_history(cb.run_id, 'valid_loss')
    assert sorted(m.step for m in history) == [0, 1, 2]
    steps = sorted(m.step for m in client.get_metric_history(cb.run_id, 'lr'))
    n = len(learn.dls.train)  # every batch logged (log_every=0): up to Ctrl-C in epoch 1, then from the checkpoint (end of epoch 0) on
    assert set(steps) == set(range(1, 3 * n + 1)) and steps.count(n + 1) == 2 and steps.count(3 * n) == 1


def test_mlflow_file_store_failed_and_lr_find(tmp_path, monkeypatch):
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')  # MLflow 3 keeps its file store only on request
    uri = (tmp_path / 'mlruns').as_uri()
    client = MlflowClient(tracking_uri=uri)
    learn = digits_learner(tmp_path)
    cb = MLflowCallback(tracking_uri=uri)
    learn.add_cb(cb)
    learn.lr_find(num_it=20, show_plot=False)  # a child run of the callback's run, which the next fit then uses
    parent = cb.run_id
    children = [r for r in client.search_runs([client.get_run(parent).info.experiment_id]) if r.info.run_id != parent]
    assert len(children) == 1 and children[0].data.tags['mlflow.parentRunId'] == parent
    assert children[0].info.status == 'FINISHED' and children[0].info.run_name == 'lr_find'
    assert len(client.get_metric_history(children[0].info.run_id, 'lr')) == len(learn.lr_find_result.lrs)
    with pytest.raises(ValueError, match='boom'): learn.fit(1, cbs=[Fail(ValueError('boom'))])
    assert cb.run_id == parent and client.get_run(parent).info.status == 'FAILED'
    assert len(learn.cbs) and learn.validate()  # the learner is usable
    learn.fit(1)  # a new fit is a new run
    assert cb.run_id != parent and client.get_run(cb.run_id).info.status == 'FINISHED'


class FailEarly(Callback):
    "Fails in `before_fit`, before the trackers' own `before_fit` ran (the loop still runs every `after_fit`)."
    order = -100
    def before_fit(self): raise ValueError('early')


def test_fit_failing_before_the_trackers_start(tmp_path, monkeypatch):
    """The first error propagates (not an AttributeError from a tracker's after_fit), no run is opened or ended twice, and a
    pruning callback that pruned the last fit does not raise TrialPruned for a fit that never ran."""
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    uri = (tmp_path / 'mlruns').as_uri()
    learn = digits_learner(tmp_path)
    cb = MLflowCallback(tracking_uri=uri, experiment='early')
    with pytest.raises(ValueError, match='early'): learn.fit(1, cbs=[cb, FailEarly()])
    assert cb.run_id is None and MlflowClient(tracking_uri=uri).get_experiment_by_name('early') is None
    learn.fit(1, cbs=[cb])
    first = cb.run_id
    with pytest.raises(ValueError, match='early'): learn.fit(1, cbs=[cb, FailEarly()])
    assert MlflowClient(tracking_uri=uri).get_run(first).info.status == 'FINISHED'  # not ended again as FAILED
    study = optuna.create_study(direction='minimize', pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    pruning = OptunaPruningCallback(study.ask())
    with pytest.raises(optuna.TrialPruned): learn.fit(2, cbs=[pruning])
    with pytest.raises(ValueError, match='early'): learn.fit(1, cbs=[pruning, FailEarly()])


def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_SILENT', 'true')
    learn = digits_learner(tmp_path)
    cb = WandbCallback(project='phaselearn-test', run_name='digits', mode='offline', dir=tmp_path / 'wb', log_every=0,
                       log_checkpoints=True, log_model=True)
    learn.fit_phases(plan(), cbs=[cb, ThroughputCallback(), CheckpointCallback()])
    # failing in epoch 0, before any checkpoint of its own: the first fit's checkpoint file is not this run's
    with pytest.raises(ValueError, match='boom'): learn.fit(1, cbs=[cb, CheckpointCallback(), Fail(ValueError('boom'))])
    first, failed = [read_wandb_run(d) for d in wandb_run_dirs(tmp_path / 'wb')]
    assert first['project'] == 'phaselearn-test' and first['name'] == 'digits' and first['exit_code'] == 0
    assert first['summary']['status'] == 'FINISHED' and failed['summary']['status'] == 'FAILED' and failed['exit_code'] == 1
    assert first['artifacts'] == {f"checkpoints-{first['id']}": ['checkpoint.pt'], f"model-{first['id']}": ['model.pt']}
    assert failed['artifacts'] == {}  # (and no final model from a failed fit)
    assert first['config']['n_phases'] == '2' and first['config']['phase_1'].startswith('TrainingPhase(epochs=1, lr=SchedCos(')
    steps = {row['_step']: row for row in first['history']}
    n = 2 * len(learn.dls.train)
    assert all(step in steps and 'lr' in steps[step] for step in range(1, n + 1))
    assert 'phase_preview/path' in steps[0]
    epochs = [row for row in first['history'] if 'valid_loss' in row]
    assert [row['epoch'] for row in epochs] == [0, 1] and all('samples_per_s' in row for row in epochs)
    assert [row['_step'] for row in epochs] == [len(learn.dls.train), n]
    image = tmp_path / 'wb' / 'wandb' / wandb_run_dirs(tmp_path / 'wb')[0].name / 'files' / steps[0]['phase_preview/path']
    assert image.stat().st_size > 1000
    # runs begun within one second: their names' random ids do not give the order, their recorded starts do
    import shutil
    started = [(d, read_wandb_run(d)['id']) for d in wandb_run_dirs(tmp_path / 'wb')]
    for case, suffixes in enumerate((('zzzzzzzz', 'aaaaaaaa'), ('aaaaaaaa', 'zzzzzzzz'))):  # either way round
        for (folder, _), suffix in zip(started, suffixes):
            shutil.copytree(folder, tmp_path / f'same{case}' / 'wandb' / f'offline-run-20260101_000000-{suffix}')
        assert [read_wandb_run(d)['id'] for d in wandb_run_dirs(tmp_path / f'same{case}')] == [run_id for _, run_id in started]


def test_optuna_reports_and_prunes(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name='s', direction='minimize', pruner=optuna.pruners.NopPruner())
    learns = {}
    def objective(trial):
        learn = learns[trial.number] = digits_learner(tmp_path)
        learn.fit(2, cbs=[OptunaPruningCallback(trial)])
        return learn.recorder.values[-1][2]
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.intermediate_values == {0: learns[0].recorder.values[0][2], 1: learns[0].recorder.values[1][2]}
    # a pruner that prunes any value above 0 after the first epoch: the fit stops there, cleanly
    pruning = optuna.create_study(storage=storage, study_name='p', direction='minimize',
                                  pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    pruning.optimize(objective, n_trials=1)
    trial = pruning.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [0]
    learn = learns[0]
    assert len(learn.recorder.values) == 1 and not learn.training
    assert not any(isinstance(cb, OptunaPruningCallback) for cb in learn.cbs)
    assert len(learn.validate()) == 2 and learn.fit(1) is None  # usable after the pruned fit


def test_optuna_direction_checks(tmp_path):
    learn = digits_learner(tmp_path)
    maximize = optuna.create_study(direction='maximize')
    with pytest.raises(ValueError, match=r"lower valid_loss is better, but the study maximizes.*direction='minimize'"):
        learn.fit(1, cbs=[OptunaPruningCallback(maximize.ask())])
    with pytest.raises(ValueError, match=r"monitor='accuracy_x' is not a column.*valid names: train_loss, valid_loss, accuracy"):
        learn.fit(1, cbs=[OptunaPruningCallback(maximize.ask(), monitor='accuracy_x')])
    metric = AvgMetric(lambda p, y: (p.argmax(-1) != y).float().mean())
    metric.lower_is_better = True  # what issue 19 gives every metric
    learn.metrics = [metric]
    with pytest.raises(ValueError, match='study maximizes'):
        learn.fit(1, cbs=[OptunaPruningCallback(maximize.ask(), monitor=metric.name)])
    metric.lower_is_better = False
    learn.fit(1, cbs=[OptunaPruningCallback(maximize.ask(), monitor=metric.name)])  # agrees: no error
    multi = optuna.create_study(directions=['minimize', 'minimize'])
    with pytest.raises(ValueError, match='single-objective'): learn.fit(1, cbs=[OptunaPruningCallback(multi.ask())])


def test_throughput_flops_against_a_hand_count(tmp_path):
    learn = digits_learner(tmp_path)
    cb = ThroughputCallback(peak_flops=1e12)
    learn.add_cb(cb)
    learn.fit(2)
    # forward: two matmuls; backward: the second layer's input and weight gradients, the first layer's weight gradient only
    forward = 2 * (64 * 32 + 32 * 10)
    backward = 2 * (32 * 10) * 2 + 2 * 64 * 32
    assert cb.flops_per_sample == forward + backward
    names = learn.recorder.names
    assert names[4:7] == ['samples_per_s', 'tflops_per_s', 'mfu']
    for row, last in zip(learn.recorder.values, cb.history):
        assert row[4] == pytest.approx(last['samples_per_s']) and row[4] > 0
        assert row[5] == pytest.approx(row[4] * cb.flops_per_sample / 1e12)
        assert row[6] == pytest.approx(row[5] * 1e12 / 1e12)
    learn.remove_cb(cb)
    assert learn.recorder.names[-2] == 'accuracy'  # the columns leave with the callback, from the rows too
    assert [len(row) for row in learn.recorder.values] == [5, 5] and cb.history[1]['mfu'] > 0


def test_throughput_counts_tokens(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (256, 12), generator=g)
    y = x[:, 0] % 2
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(96, 2))
    learn = Learner(DataLoaders.from_tensors(x[:192], y[:192], x[192:], y[192:], bs=32, seed=0), model,
                    loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    learn.progress.show_bar = learn.progress.show_table = False
    cb = ThroughputCallback(count_flops=False)
    learn.add_cb(cb)
    learn.fit(1)
    assert learn.recorder.names == ['epoch', 'train_loss', 'valid_loss', 'samples_per_s', 'tokens_per_s', 'time']
    assert cb.history[0]['tokens_per_s'] == pytest.approx(12 * cb.history[0]['samples_per_s'])
    with pytest.raises(ValueError, match='peak_flops'): ThroughputCallback(peak_flops=-1)


def test_mfu_needs_a_known_peak():
    assert known_peak_flops('cpu') is None
    assert PEAK_FLOPS['H100'] == 989e12


def test_only_rank_zero_opens_a_run(tmp_path, monkeypatch):
    "Under torch.distributed every rank runs the callback; ranks other than 0 log nothing, so a job makes one run, not one per rank."
    import phaselearn.trackers as trackers
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    uri = (tmp_path / 'mlruns').as_uri()
    monkeypatch.setattr(trackers, 'is_main_process', lambda: False)   # this process plays rank 1
    learn = digits_learner(tmp_path)
    cb = MLflowCallback(tracking_uri=uri, experiment='ranks', log_every=0)
    learn.fit(1, cbs=[cb])
    assert cb.run_id is None and MlflowClient(tracking_uri=uri).get_experiment_by_name('ranks') is None
    monkeypatch.setattr(trackers, 'is_main_process', lambda: True)    # rank 0
    learn.fit(1, cbs=[cb])
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name('ranks').experiment_id])
    assert [r.info.run_id for r in runs] == [cb.run_id] and runs[0].info.status == 'FINISHED'


def test_mlflow_metrics_go_out_from_the_callbacks_thread_and_a_failed_log_fails_the_run(tmp_path, monkeypatch):
    """Metrics are sent by the callback's own thread with synchronous `log_batch` calls, never through MLflow's asynchronous
    queue (ending a run that used it waited for the queue worker's one-second poll, every fit); every value lands, no thread
    is left behind; a log that fails in that thread fails the run, after the fit, with the store's error."""
    import threading
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    uri = (tmp_path / 'mlruns').as_uri()
    client = MlflowClient(tracking_uri=uri)
    real, calls = MlflowClient.log_batch, []
    def spy(self, run_id, metrics=(), params=(), tags=(), synchronous=None, **kwargs):
        calls.append((threading.current_thread().name, bool(metrics), synchronous))
        if any(m.key == 'valid_loss' and m.step == 0 for m in metrics) and fail: raise RuntimeError('store is full')
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)
    monkeypatch.setattr(MlflowClient, 'log_batch', spy)
    learn, fail = digits_learner(tmp_path), False
    cb = MLflowCallback(tracking_uri=uri, log_every=0)  # a log after every batch: many queue up while one is written
    learn.fit(2, cbs=[cb])
    assert client.get_run(cb.run_id).info.status == 'FINISHED'
    assert [m.step for m in client.get_metric_history(cb.run_id, 'valid_loss')] == [0, 1]
    assert len(client.get_metric_history(cb.run_id, 'smooth_loss')) == sum(learn.epoch_lengths)
    metric_calls = [c for c in calls if c[1]]
    assert metric_calls and all(name == 'phaselearn-mlflow' and synchronous is not False for name, _, synchronous in metric_calls)
    assert not [t for t in threading.enumerate() if t.name == 'phaselearn-mlflow']
    fail = True
    with pytest.raises(RuntimeError, match='store is full'): learn.fit(1, cbs=[cb])
    assert client.get_run(cb.run_id).info.status == 'FAILED'
    assert learn.validate() is not None  # the learner is usable


def test_metric_writer_merges_what_queued_up_per_run_in_calls_of_at_most_1000():
    "While one `log_batch` call runs, what is queued goes out in the next call, per run, 1000 metrics at most per call."
    import threading
    from phaselearn.trackers import _MetricWriter
    class Client:
        def __init__(self): self.calls, self.release = [], threading.Event()
        def log_batch(self, run_id, metrics):
            self.calls.append((run_id, list(metrics)))
            if len(self.calls) == 1: self.release.wait(10)  # the first call blocks until everything else is queued
    client = Client(); writer = _MetricWriter(client)
    writer.put('a', [0])
    while not client.calls: time.sleep(0.001)
    writer.put('a', [1, 2]); writer.put('b', [10]); writer.put('a', list(range(3, 1503)))
    client.release.set(); writer.close()
    assert [(run, len(m)) for run, m in client.calls] == [('a', 1), ('a', 1000), ('a', 502), ('b', 1)]
    assert [x for run, m in client.calls if run == 'a' for x in m] == list(range(1503))  # in order, nothing lost
    assert writer.thread is None
