"""Kill -9 at random moments, then resume in a fresh process: the weights and optimizer state equal, bit for bit, those of
an uninterrupted run. Scenarios (tests/resume_worker.py): the in-memory path (from_tensors), from_datasets, a plain shuffled
torch DataLoader, bf16 autocast on the CPU, gradient accumulation with checkpoints between the batches of one step, a kill
after the fit returned, a kill half-way through writing a checkpoint, and both kinds of kill with async_write=True
(the write in a background thread). Kill points come from a seeded RNG."""
import os, random, subprocess, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest, torch
from phaselearn.all import *

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / 'tests' / 'resume_worker.py')
N_BATCHES = 24  # 2 epochs of 12 batches (1437 digits, bs 128)


def kill_plan(seed: int = 11) -> dict:
    "scenario -> the worker commands to run one after the other (each ends in a SIGKILL), kill points drawn from `seed`."
    rng = random.Random(seed)
    def at(low=3): return rng.randrange(low, N_BATCHES)
    plan = {name: [('kill', at())] for name in ('datasets', 'bf16', 'accum2', 'accum5')}
    for name in ('tensors', 'torch'):  # killed twice: the second run resumes from the first's checkpoint, then dies too
        first = rng.randrange(3, N_BATCHES - 6); plan[name] = [('kill', first), ('kill', rng.randrange(first + 4, N_BATCHES))]
    plan['finished'] = [('kill', -1)]                     # killed after the fit returned
    plan['write'] = [('killwrite', rng.randrange(2, 9))]  # killed half-way through writing its n-th checkpoint
    plan['async'] = [('kill', at())]                      # async_write=True: a background write may be in flight
    plan['asyncwrite'] = [('killwrite', rng.randrange(2, 7))]  # killed half-way through a background write
    return plan


def run(args, timeout=120):
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope='module')
def results():
    plan = kill_plan()
    with tempfile.TemporaryDirectory() as folder:
        def chain(name):
            for mode, at in plan[name]:
                result = run([mode, name, os.path.join(folder, name), at])
                assert result.returncode == -9, f"{name}: {mode} {at} was not killed (exit {result.returncode}): {result.stderr[-2000:]}"
        with ThreadPoolExecutor(4) as pool: list(pool.map(chain, plan))
        names = list(plan)
        halves = [['tensors', 'finished', 'write', 'bf16', 'async', 'asyncwrite'], ['datasets', 'torch', 'accum2', 'accum5']]  # shared references together
        with ThreadPoolExecutor(2) as pool: finished = list(pool.map(lambda half: run(['resume', folder, *half], timeout=300), halves))
        for result in finished: assert result.returncode == 0, result.stderr[-3000:]
        out = {name: torch.load(os.path.join(folder, f"{name}.result.pt"), weights_only=True) for name in names}
    for name in names:
        resumed, reference = out[name]['resumed'], out[name]['reference']
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(resumed['model'].values(), reference['model'].values()))
        print(f"{name}: kills {plan[name]}, resumed training batches {resumed['n_trained']}, max |diff| {diff}")
    return plan, out


def assert_same(resumed, reference):
    assert resumed['model'].keys() == reference['model'].keys()
    for name, a in resumed['model'].items(): assert torch.equal(a, reference['model'][name]), name
    for i, state in reference['opt']['state'].items():
        for key, value in state.items(): assert torch.equal(torch.as_tensor(resumed['opt']['state'][i][key]), torch.as_tensor(value)), (i, key)
    assert resumed['train_iter'] == reference['train_iter'] == N_BATCHES


@pytest.mark.parametrize('name', ['tensors', 'datasets', 'torch', 'bf16', 'accum2', 'accum5', 'write', 'async', 'asyncwrite'])
def test_kill_then_resume_is_bit_identical(results, name):
    plan, out = results
    assert_same(out[name]['resumed'], out[name]['reference'])
    assert 0 < out[name]['resumed']['n_trained'] < N_BATCHES   # it did resume part-way


def test_resume_after_the_fit_returned_trains_nothing(results):
    plan, out = results
    assert out['finished']['resumed']['n_trained'] == 0
    assert_same(out['finished']['resumed'], out['finished']['reference'])


@pytest.mark.parametrize('name', ['write', 'asyncwrite'])
def test_a_killed_write_leaves_nothing_behind(results, name):
    plan, out = results
    assert out[name]['leftovers'] == []


def test_kill_points_are_drawn_from_a_seed():
    assert kill_plan() == kill_plan() and kill_plan(11) != kill_plan(12)
