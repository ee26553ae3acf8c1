"Exact resume across phase changes (batch size, optimizer), with torch DataLoaders, and checkpoint file handling."
from pathlib import Path
import pytest, torch
from torch import nn
from torch.utils.data import Dataset
from phaselearn.all import *


class Digits(Dataset):
    "A map-style dataset (not a TensorDataset): batches go through a torch DataLoader and its EpochSampler."
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]


def make_learner(path, cbs=(), torch_loader=False):
    set_seed(0)
    x, y, xv, yv = digits_tensors()
    if torch_loader: dls = DataLoaders.from_datasets(Digits(x, y), Digits(xv, yv), bs=64, seed=3)
    else: dls = DataLoaders.from_tensors(x, y, xv, yv, bs=64, seed=3)
    model = nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.2), nn.Linear(48, 10))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=[accuracy], path=path, cbs=list(cbs))
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


class StopAt(Callback):
    order = 100
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.training and self.learn.train_iter == self.at: raise KeyboardInterrupt


PHASES = [TrainingPhase(epochs=0.5, lr=SchedLin(1e-4, 1e-2), mom=0.9),
          TrainingPhase(epochs=1.5, bs=32, lr=SchedCos(1e-2, 1e-3)),
          TrainingPhase(iters=20, bs=128, opt_func=torch.optim.SGD, lr=SchedCos(5e-2, 0.), mom=0.9)]


@pytest.mark.parametrize('torch_loader', [False, True])
@pytest.mark.parametrize('stop_at,every_iters', [(8, 5), (30, 7), (75, 4), (95, 9)])
def test_resume_is_exact_across_phases(tmp_path, torch_loader, stop_at, every_iters):
    reference = make_learner(tmp_path, torch_loader=torch_loader)
    reference.fit_phases(PHASES)
    assert reference.train_iter > stop_at
    learn = make_learner(tmp_path, cbs=[CheckpointCallback(every_iters=every_iters)], torch_loader=torch_loader)
    with pytest.raises(KeyboardInterrupt): learn.fit_phases(PHASES, cbs=[StopAt(stop_at)])
    resumed = make_learner(tmp_path, torch_loader=torch_loader)
    for p in resumed.model.parameters(): nn.init.normal_(p)
    set_seed(12345)
    resumed.fit_phases(PHASES, resume='checkpoint')
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(resumed.opt.opt, torch.optim.SGD)
    train = resumed.dls.train  # the learner's own data is back after the phases
    assert (train.bs if hasattr(train, 'bs') else train.batch_size) == 64


def test_keep_rotates_and_file_is_weights_only(tmp_path):
    learn = make_learner(tmp_path, cbs=[CheckpointCallback(every_iters=5, every_epochs=None, keep=3)])
    learn.fit(1)
    files = checkpoint_files(learn, 'checkpoint')
    assert [f.name for f in files] == ['checkpoint.pt', 'checkpoint.1.pt', 'checkpoint.2.pt']
    iters = [torch.load(f, weights_only=True)['train_iter'] for f in files]
    assert iters == sorted(iters, reverse=True) and iters[0] - iters[1] == 5
    assert not [f for f in (tmp_path / 'models').iterdir() if 'writing' in f.name]


def test_resume_by_path_and_every_file_broken(tmp_path):
    learn = make_learner(tmp_path, cbs=[CheckpointCallback(every_iters=10, every_epochs=None, keep=2)])
    with pytest.raises(KeyboardInterrupt): learn.fit(2, cbs=[StopAt(25)])
    file = tmp_path / 'models' / 'checkpoint.pt'
    assert torch.load(file, weights_only=True)['train_iter'] == 20
    make_learner(tmp_path).fit(2, resume=file)  # a path works as well as a name
    for f in checkpoint_files(learn, 'checkpoint'): f.write_bytes(b'garbage')
    with pytest.raises(FileNotFoundError, match='no usable checkpoint'): make_learner(tmp_path).fit(2, resume='checkpoint')


def _tensor_byte_offset(file):
    "Offset in `file` of the first data byte of a tensor record of the zip (the weights), to damage it on purpose."
    import zipfile
    with zipfile.ZipFile(file) as z:
        info = next(i for i in z.infolist() if '/data/' in i.filename and i.file_size >= 64)
        with open(file, 'rb') as f:  # the local header: 30 bytes, then the name and the extra field
            f.seek(info.header_offset + 26); name_len, extra_len = (int.from_bytes(f.read(2), 'little') for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len + 16


def test_sync_checkpoint_skips_the_zip_crc_but_its_checksum_catches_a_flipped_byte(tmp_path):
    "Sync checkpoints are written without torch's zip CRC-32 (never checked by torch.load): the XXH3 checksum guards them."
    import zipfile
    assert torch.serialization.get_crc32_options()
    learn = make_learner(tmp_path, cbs=[CheckpointCallback(every_iters=5, every_epochs=None, keep=2)])
    learn.fit(1)
    assert torch.serialization.get_crc32_options()  # the process-wide setting is put back after every write
    newest, older = checkpoint_files(learn, 'checkpoint')
    assert zipfile.ZipFile(newest).testzip() is not None  # no CRC written: the zip's own check would fail ...
    state = torch.load(newest, weights_only=True)        # ... but torch reads the file
    assert checksum_matches(state)
    data = bytearray(newest.read_bytes()); data[_tensor_byte_offset(newest)] ^= 0x10; newest.write_bytes(bytes(data))
    assert not checksum_matches(torch.load(newest, weights_only=True))  # torch.load does not notice; the checksum does
    with pytest.warns(RuntimeWarning, match='checkpoint.pt: damaged'):
        make_learner(tmp_path).fit(1, resume='checkpoint')  # resume falls back to the older, intact file


def test_background_write_keeps_the_zip_crc(tmp_path):
    "A background (async_write) writer leaves the process-wide CRC setting alone: its files carry torch's CRCs."
    import zipfile
    learn = make_learner(tmp_path, cbs=[CheckpointCallback(every_iters=5, every_epochs=None, keep=1, async_write=True)])
    learn.fit(1)
    file, = checkpoint_files(learn, 'checkpoint')
    assert zipfile.ZipFile(file).testzip() is None and checksum_matches(torch.load(file, weights_only=True))
    assert torch.serialization.get_crc32_options()
