"""Worker processes for tests/test_resume.py: build a learner for a scenario, train, and get killed (SIGKILL) at a chosen
moment; or resume every scenario from its checkpoint, and train the uninterrupted reference, in a fresh process.

    python tests/resume_worker.py kill SCENARIO FOLDER AT        # SIGKILL after training batch AT (AT=-1: after fit returns)
    python tests/resume_worker.py killwrite SCENARIO FOLDER N    # SIGKILL half-way through writing checkpoint number N
                                                                 # (in the writer thread for the async scenarios)
    python tests/resume_worker.py resume FOLDER SCENARIO...      # resume each FOLDER/SCENARIO, train each reference, save both
"""
import io, os, signal, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from phaselearn.all import *

torch.set_num_threads(1)  # the same arithmetic in every process

# scenario -> (loader kind, extra callbacks, checkpoint every_iters)
SCENARIOS = {
    'tensors':  ('tensors', lambda: [], 4),
    'datasets': ('datasets', lambda: [], 5),
    'torch':    ('torch', lambda: [], 3),
    'bf16':     ('tensors', lambda: [MixedPrecision(torch.bfloat16)], 4),
    'accum2':   ('tensors', lambda: [GradientAccumulation(3)], 2),   # checkpoints fall between the batches of one step
    'accum5':   ('datasets', lambda: [GradientAccumulation(2)], 5),
    'finished': ('tensors', lambda: [], 7),
    'write':    ('tensors', lambda: [], 3),
    'async':      ('tensors', lambda: [], 3),   # CheckpointCallback(async_write=True): killed at a batch, a write maybe in flight
    'asyncwrite': ('tensors', lambda: [], 3),   # killed half-way through a background write
}
ASYNC = {'async', 'asyncwrite'}


class Digits(Dataset):
    "A map-style dataset (not a TensorDataset), so batches go through a torch DataLoader."
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]


def build(scenario, path):
    kind, cbs, every_iters = SCENARIOS[scenario]
    set_seed(0)
    x, y, xv, yv = digits_tensors()
    if kind == 'tensors': dls = DataLoaders.from_tensors(x, y, xv, yv, bs=128, seed=1)
    elif kind == 'datasets': dls = DataLoaders.from_datasets(Digits(x, y), Digits(xv, yv), bs=128, seed=1)
    else: dls = DataLoaders(DataLoader(Digits(x, y), batch_size=128, shuffle=True), DataLoader(Digits(xv, yv), batch_size=256))
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), path=path,
                    cbs=[CheckpointCallback(every_iters=every_iters, async_write=scenario in ASYNC)] + cbs())
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


def fit(learn, **kwargs): learn.fit_one_cycle(2, lr_max=1e-2, **kwargs)


class KillAt(Callback):
    order = 100  # after the checkpoint of the same batch
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.training and self.learn.train_iter == self.at: os.kill(os.getpid(), signal.SIGKILL)


class CountBatches(Callback):
    def before_fit(self): self.n = 0
    def after_batch(self):
        if self.training: self.n += 1


def kill_during_write(n):
    "Make the `n`-th checkpoint write (1-based) stop half-way through its bytes, with a SIGKILL."
    save, calls = torch.save, [0]
    def half_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('kind') == 'phaselearn checkpoint':
            calls[0] += 1
            if calls[0] == n:
                buffer = io.BytesIO(); save(obj, buffer)
                data = buffer.getvalue(); f.write(data[:len(data) // 2]); f.flush(); os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kwargs)
    torch.save = half_save


def state_of(learn, n_trained):
    return {'model': learn.model.state_dict(), 'opt': learn.opt.state_dict()['opt'], 'train_iter': learn.train_iter,
            'n_trained': n_trained}


if __name__ == '__main__':
    mode = sys.argv[1]
    if mode in ('kill', 'killwrite'):
        scenario, folder, at = sys.argv[2], sys.argv[3], int(sys.argv[4])
        learn = build(scenario, folder)
        if mode == 'killwrite': kill_during_write(at)
        resume = 'checkpoint' if (learn.path / 'models' / 'checkpoint.pt').exists() else None
        fit(learn, cbs=[KillAt(at)] if mode == 'kill' and at >= 0 else [], resume=resume)
        if at < 0: os.kill(os.getpid(), signal.SIGKILL)  # killed after the fit returned, before anything else
        sys.exit(3)  # the kill did not happen
    if mode == 'resume':
        folder, references = sys.argv[2], {}
        for scenario in sys.argv[3:]:
            resumed = build(scenario, os.path.join(folder, scenario))
            for p in resumed.model.parameters(): nn.init.normal_(p)  # nothing carries over but the files
            set_seed(12345)
            count = CountBatches()
            fit(resumed, cbs=[count], resume='checkpoint')
            leftovers = [f for f in os.listdir(os.path.join(folder, scenario, 'models')) if 'writing' in f]
            kind, cbs, _ = SCENARIOS[scenario]
            key = (kind, tuple(repr(cb) for cb in cbs()))  # checkpoints do not change training: one reference per setup
            if key not in references:
                reference = build(scenario, os.path.join(folder, scenario + '_reference'))
                fit(reference)
                references[key] = state_of(reference, None)
            torch.save({'resumed': state_of(resumed, count.n), 'reference': references[key], 'leftovers': leftovers},
                       os.path.join(folder, scenario + '.result.pt'))
