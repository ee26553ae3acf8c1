"""FSDPCallback with real processes: tests/fsdp_worker.py under torchrun on CPU (gloo), 1, 2 and 4 processes.

The worker fits a residual MLP sharded per block through a two-phase plan (decoupled decay, two layer groups, then SGD:
the optimizer is rebuilt over the shards) with gradient clipping and accumulation, checkpointing every 4 batches. The
runs are made once (a module fixture) and compared:

- FSDP on 2 ranks against one process with the same global batch: FSDP averages the ranks' gradients by a reduce-scatter,
  so the weights agree to float rounding (compared, not assumed: PyTorch had gloo reduce-scatter bugs that summed instead
  of averaging, its issue 162338);
- a 2-rank run killed with SIGKILL after its checkpoint at batch 12, resumed on 2 ranks: bit-identical to the uninterrupted;
- the same checkpoint resumed on 4 ranks (killed again at batch 20) and that one resumed in 1 process: each resumed fit
  starts from exactly the saved weights and at exactly the saved schedule position;
- a raising rank ends the job within seconds, with `distributed_job()` and with a `finally: teardown_distributed()`;
- HSDP (FSDPCallback over a 2x2 replicate/shard mesh, 4 ranks) trains the one-process model;
- two simulated nodes (two torchrun launches, --nnodes 2, a c10d rendezvous on 127.0.0.1) train with DDP and FSDP.
Every launch is bounded by a timeout.
"""
import os, re, shutil, socket, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest, torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / 'tests' / 'fsdp_worker.py'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', **({'GLOO_SOCKET_IFNAME': 'lo'} if os.path.exists('/sys/class/net/lo') else {})}


def launch(out, *args, n=None, timeout=240, extra=()):
    "Run the worker (under torchrun with `n` processes, or as one plain process); the finished process."
    launcher = [] if n is None else ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n), *extra]
    cmd = [sys.executable, *launcher, str(WORKER), str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


def result(out, rank=0): return torch.load(Path(out) / f"rank{rank}.pt", weights_only=False)


def ok(run):
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    from phaselearn.fsdp import dcp_to_weights
    base = tmp_path_factory.mktemp('fsdp')
    paths = {name: base / name for name in ('single', 'whole', 'cut', 'cut4')}
    for p in paths.values(): p.mkdir()
    ok(launch(paths['single']))
    ok(launch(paths['whole'], n=2))
    killed = launch(paths['cut'], '--kill-at', '12', n=2)
    assert killed.returncode != 0 and 'SIGKILL' in killed.stderr, killed.stderr[-3000:]
    shutil.copytree(paths['cut'] / 'models', paths['cut4'] / 'models')
    dcp_to_weights(paths['cut'] / 'models' / 'ckpt.dcp', base / 'w12.pt')   # the weights after batch 12
    ok(launch(paths['cut'], '--resume', n=2))
    killed = launch(paths['cut4'], '--resume', '--kill-at', '20', n=4)
    assert killed.returncode != 0 and 'SIGKILL' in killed.stderr, killed.stderr[-3000:]
    dcp_to_weights(paths['cut4'] / 'models' / 'ckpt.dcp', base / 'w20.pt')
    ok(launch(paths['cut4'], '--resume'))
    return base


def max_diff(a, b): return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_fit_equals_one_process_with_the_global_batch(runs):
    single, fsdp = result(runs / 'single'), result(runs / 'whole')
    assert single['world_size'] == 1 and fsdp['world_size'] == 2
    assert set(fsdp['final']) == set(single['final'])
    diff = max_diff(fsdp['final'], single['final'])
    assert diff < 1e-5, diff   # measured: 3e-8 (float rounding of the reduce-scatter's sum and division)
    np.testing.assert_allclose(np.array(fsdp['values'])[:, 1:4], np.array(single['values'])[:, 1:4], rtol=1e-4)
    assert fsdp['exempt'] == single['exempt']   # the no-decay rule sees the model's own names under FSDP
    assert 'blocks.0.norm.weight' in fsdp['exempt'] and 'blocks.0.fc.weight' not in fsdp['exempt']


def test_recorded_hypers_equal_the_preview_under_fsdp(runs):
    for name in ('whole', 'single'):
        r = result(runs / name)
        for hyper in ('lr', 'wd'):   # GradientAccumulation(2): a step after every odd batch
            np.testing.assert_array_equal(np.array(r['log'][hyper]), r['preview'][hyper][1::2])


def test_no_gradient_sync_on_micro_batches_that_do_not_step(runs):
    "GradientAccumulation(2) under FSDP: the odd micro-batches leave the sharded gradients unset (no reduce-scatter)."
    fsdp, single = result(runs / 'whole'), result(runs / 'single')
    assert fsdp['grads'] == [False, True] * 16   # 32 batches, a step every second one
    assert single['grads'] == [True] * 32        # in one process the gradients are always there


def test_full_weights_and_optimizer_state_out_and_back(runs):
    "learn.save under FSDP writes the one-process format (weights, and with_opt the optimizer state by index) on rank 0."
    import fsdp_worker
    fsdp, single = result(runs / 'whole'), result(runs / 'single')
    assert fsdp['reload_same']   # learn.load(with_opt=True) under FSDP put back exactly what was there
    saved = torch.load(runs / 'whole' / 'models' / 'final.pt', weights_only=True)
    assert set(saved) == {'format_version', 'model', 'checksum'} and max_diff(saved['model'], fsdp['final']) == 0
    ours, theirs = (torch.load(runs / name / 'models' / 'final_opt.pt', weights_only=True)['opt'] for name in ('whole', 'single'))
    assert {k: v for k, v in ours.items() if k != 'opt'} == {k: v for k, v in theirs.items() if k != 'opt'}
    assert ours['opt']['param_groups'] == theirs['opt']['param_groups']
    assert set(ours['opt']['state']) == set(theirs['opt']['state'])
    for i, s in theirs['opt']['state'].items():
        for k, v in s.items(): torch.testing.assert_close(ours['opt']['state'][i][k], v, atol=1e-6, rtol=1e-4)
    learn = fsdp_worker.make_learner(runs / 'whole')   # one process: the file loads into a plain learner
    learn.create_opt(); learn.opt = learn.opt.switch(fsdp_worker.phases()[1].opt_func)
    learn.load('final_opt', with_opt=True)
    assert all(torch.equal(p, saved['model'][n]) for n, p in learn.model.named_parameters())


def test_kill9_and_resume_on_the_same_world_size_is_bit_identical(runs):
    whole, resumed = result(runs / 'whole'), result(runs / 'cut')
    assert all(torch.equal(whole['final'][k], resumed['final'][k]) for k in whole['final'])
    assert [v[1:4] for v in whole['values']] == [v[1:4] for v in resumed['values']][-len(whole['values']):]


def test_resume_two_to_four_to_one_process(runs):
    w12, w20 = (torch.load(runs / f, weights_only=True)['model'] for f in ('w12.pt', 'w20.pt'))
    first4 = torch.load(runs / 'cut4' / 'first4.pt', weights_only=True)   # what the 4-rank resumed fit started from
    first1 = torch.load(runs / 'cut4' / 'first1.pt', weights_only=True)
    assert max_diff(first4, w12) == 0 and max_diff(first1, w20) == 0
    one = result(runs / 'cut4')
    assert one['world_size'] == 1
    # the schedule resumed exactly: the steps after batch 20 used the preview's values from there on
    np.testing.assert_array_equal(np.array(one['log']['lr']), one['preview']['lr'][21::2])
    assert max_diff(one['final'], result(runs / 'whole')['final']) < 1e-5


def test_hsdp_fit_equals_one_process(runs, tmp_path):
    "FSDPCallback(mesh=2-D DeviceMesh): HSDP, 2 replicas each sharded over 2 ranks, trains the same model as one process."
    ok(launch(tmp_path, '--hsdp', n=4))
    hsdp, single = result(tmp_path), result(runs / 'single')
    assert hsdp['world_size'] == 4
    diff = max_diff(hsdp['final'], single['final'])
    assert diff < 1e-5, diff
    assert (tmp_path / 'models' / 'ckpt.dcp').is_dir()


def run_failing(pattern, out, timeout=120):
    "Rank 1 raises at its 3rd batch; seconds from the failure to the job's end, the exit code and the output."
    start = time.time()
    with subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           str(WORKER), str(out), '--fail-rank', '1', '--pattern', pattern],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO) as process:
        try: stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill(); stdout, stderr = process.communicate()
            pytest.fail(f"the job still ran {timeout} s after it started (pattern {pattern!r}): it hangs\n{stderr[-3000:]}")
    end = time.time()
    failed_at = float(re.search(r"time\.time\(\)=([0-9.]+)", stderr).group(1))
    return end - failed_at, process.returncode, stderr, end - start


@pytest.mark.parametrize('pattern', ['job', 'finally'])
def test_a_raising_rank_ends_the_fsdp_job_within_seconds(pattern, tmp_path):
    seconds, code, stderr, total = run_failing(pattern, tmp_path)
    print(f"{pattern}: the job ended {seconds:.1f} s after the failure ({total:.1f} s in all)")
    assert code != 0 and 'Traceback (most recent call last)' in stderr and 'injected failure on rank 1' in stderr
    assert seconds < 30, stderr[-3000:]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_two_simulated_nodes_train(mode, tmp_path):
    "Two torchrun launches (one per 'node', one process each) meet at a c10d rendezvous on 127.0.0.1 and train together."
    port = _free_port()
    common = ['--nnodes', '2', '--nproc_per_node', '1', '--rdzv_backend', 'c10d', '--rdzv_endpoint', f'127.0.0.1:{port}',
              '--rdzv_id', f'test-{mode}']
    args = [str(WORKER), str(tmp_path)] + (['--ddp'] if mode == 'ddp' else [])
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *common, '--node_rank', str(rank), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO) for rank in (0, 1)]
    try: outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None: node.kill()
    for node, (_, err) in zip(nodes, outputs): assert node.returncode == 0, err[-3000:]
    if mode == 'ddp':
        a, b = (torch.load(tmp_path / f"ddp{r}.pt", weights_only=True) for r in (0, 1))
        assert a['world_size'] == 2 and max_diff(a['weights'], b['weights']) == 0
    else:
        r = result(tmp_path)
        assert r['world_size'] == 2 and r['final'] is not None and (tmp_path / 'models' / 'ckpt.dcp').is_dir()
