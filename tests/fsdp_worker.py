"""The training script tests/test_fsdp.py launches with torchrun (or runs in one process): a small residual MLP on the
digits, sharded per block by FSDPCallback, trained by a two-phase plan (AdamW-style decoupled decay with two layer groups,
then SGD: the optimizer is rebuilt over the shards), with gradient clipping and accumulation, checkpointed every 4 batches.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT [--kill-at K] [--resume]
    python tests/fsdp_worker.py OUT --resume        # one process: resumes a sharded checkpoint unsharded
    ... --nproc_per_node 4 tests/fsdp_worker.py OUT --hsdp   # HSDP: 2 replicas x 2 shards
    ... tests/fsdp_worker.py OUT --fail-rank 1 --pattern job|finally   # rank 1 raises at its 3rd batch

Each rank writes OUT/rank{r}.pt: the preview, the hyperparameters each step used, the names exempt from decay, the full
weights (gathered by learn.save) and what the first resumed batch saw.
"""
import argparse, functools, os, signal, sys, time
import torch
from torch import nn
from phaselearn.all import *
from phaselearn.fsdp import FSDPCallback, full_model_state

N_TRAIN, BS = 1024, 64   # 16 batches an epoch, no padding for 1, 2 or 4 processes: the same global batches everywhere


class Block(nn.Module):
    "A pre-norm residual MLP block: the unit FSDP shards."
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)
    def forward(self, x): return x + torch.relu(self.fc(self.norm(x)))


class Net(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.inp, self.blocks, self.head = nn.Linear(64, d), nn.Sequential(Block(d), Block(d)), nn.Linear(d, 10)
    def forward(self, x): return self.head(self.blocks(self.inp(x)))


def splitter(model): return [list(model.inp.parameters()) + list(model.blocks.parameters()), list(model.head.parameters())]


def phases():
    return [TrainingPhase(epochs=1, lr=SchedCos(slice(1e-3, 1e-2), slice(1e-4, 1e-3)), mom=SchedLin(0.9, 0.95), wd=1e-2),
            TrainingPhase(epochs=1, opt_func=functools.partial(torch.optim.SGD, momentum=0.9), lr=SchedLin(5e-2, 1e-3))]


class StepLog(Callback):
    "The hyperparameters every optimizer step uses, and the full weights the first batch of the fit sees."
    order = 100
    def __init__(self): self.log, self.first, self.grads = {'lr': [], 'wd': []}, None, []
    def before_batch(self):
        if self.first is None and self.training:
            self.first = {k: v.clone() for k, v in full_model_state(self.learn.model).items()}
            os.makedirs(self.learn.path, exist_ok=True)
            if is_main_process(): torch.save(self.first, os.path.join(self.learn.path, f"first{rank_and_world_size()[1]}.pt"))
    def after_backward(self):   # did the gradients reach the (sharded) parameters? not when FSDP skips the reduce-scatter
        self.grads.append(any(p.grad is not None for p in self.learn.model.parameters()))
    def before_step(self):
        for name in self.log: self.log[name].append(self.opt.get_hyper(name))


class KillAt(Callback):
    "SIGKILL rank 0 right after training batch `at` (after its checkpoint is written): a crash, no clean-up at all."
    order = 95
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.training and self.learn.train_iter == self.at and is_main_process(): os.kill(os.getpid(), signal.SIGKILL)


class FailAt(Callback):
    "Raise on rank `rank` at its training batch `at`, after the loss (the other ranks go on to the gradient reduce-scatter)."
    def __init__(self, rank, at): self.rank, self.at = rank, at
    def after_loss(self):
        if self.training and self.learn.train_iter == self.at and rank_and_world_size()[0] == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} at training batch {self.at} (time.time()={time.time():.3f})")


def make_learner(out, extra=(), mesh=None):
    set_seed(0)
    x, y, xv, yv = digits_tensors()
    dls = DataLoaders.from_tensors(x[:N_TRAIN], y[:N_TRAIN], xv, yv, bs=BS, seed=0)
    learn = Learner(dls, Net(), loss_func=nn.CrossEntropyLoss(), metrics=[accuracy], splitter=splitter, path=out,
                    cbs=[FSDPCallback(wrap=[Block], mesh=mesh), GradientClip(1.0), GradientAccumulation(2), *extra])
    learn.progress.show_bar = learn.progress.show_table = False
    return learn


def train(out, kill_at=None, resume=False, fail_rank=None, hsdp=False):
    log = StepLog()
    extra = ([KillAt(kill_at)] if kill_at else []) + ([FailAt(fail_rank, 3)] if fail_rank is not None else [])
    mesh = None
    if hsdp:   # HSDP: 2 replicas, each sharded over world_size / 2 ranks
        from torch.distributed.device_mesh import init_device_mesh
        world_size = rank_and_world_size()[1]
        mesh = init_device_mesh('cpu', (2, world_size // 2), mesh_dim_names=('replicate', 'shard'))
    learn = make_learner(out, extra, mesh)
    preview = learn.preview(phases())
    learn.fit_phases(phases(), cbs=[log, CheckpointCallback('ckpt', every_iters=4, every_epochs=None)],
                     resume='ckpt' if resume else None)
    file = learn.save('final')
    before = full_model_state(learn.model)
    learn.save('final_opt', with_opt=True)          # full weights and optimizer state, in the one-process layout
    learn.load('final_opt', with_opt=True)          # and back into the shards: nothing changes
    after = full_model_state(learn.model)
    rank, world_size = rank_and_world_size()
    model = learn.model
    exempt = sorted(n for n, p in model.named_parameters() if id(p) not in {id(q) for d in learn.opt._decayed for q in d})
    result = {'world_size': world_size, 'preview': {k: preview[k] for k in log.log}, 'log': log.log, 'first': log.first,
              'exempt': exempt, 'values': learn.recorder.values, 'grads': log.grads,
              'reload_same': all(torch.equal(before[k], after[k]) for k in before),
              'final': torch.load(file, weights_only=True)['model'] if rank == 0 else None}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('out')
    parser.add_argument('--kill-at', type=int, default=None)
    parser.add_argument('--resume', action='store_true')
    parser.add_argument('--fail-rank', type=int, default=None)
    parser.add_argument('--pattern', default='job', choices=['job', 'finally'])
    parser.add_argument('--ddp', action='store_true', help='a DDP fit (multi-node check) instead')
    parser.add_argument('--hsdp', action='store_true', help='FSDPCallback over a 2-D (replicate, shard) mesh')
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ddp:
        with distributed_job() as (rank, world_size):
            set_seed(0)
            learn = Learner(digits_dls(bs=BS, seed=0), Net(), loss_func=nn.CrossEntropyLoss(), cbs=[DistributedCallback()])
            learn.progress.show_bar = learn.progress.show_table = False
            learn.fit(1, lr=1e-2)
            torch.save({'world_size': world_size, 'weights': learn.model.state_dict()}, os.path.join(args.out, f"ddp{rank}.pt"))
        return
    if args.pattern == 'job':
        with distributed_job(): train(args.out, args.kill_at, args.resume, args.fail_rank, args.hsdp)
    else:   # the pattern people write: teardown in a finally (must not wait in a barrier while an exception propagates)
        setup_distributed()
        try: train(args.out, args.kill_at, args.resume, args.fail_rank)
        finally: teardown_distributed()


if __name__ == '__main__':
    main()
