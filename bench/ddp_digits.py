"""Data-parallel training of a small CNN on scikit-learn's digits with DistributedDataParallel.

Launch (CPU processes use gloo, GPUs NCCL; `bs` is the global batch, split evenly between the ranks):

    torchrun --standalone --nproc_per_node 2 bench/ddp_digits.py
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/ddp_digits.py --epochs 3 --bs 256
    python bench/ddp_digits.py          # one process: the same training, no process group
    torchrun --standalone --nproc_per_node 2 bench/ddp_digits.py --fail-rank 1 --fail-at 5   # rank 1 raises: the job ends

Rank 0 prints the epoch table and writes the weights; every rank ends with the same weights. The body runs inside
`distributed_job()`: an exception on any rank prints that rank's traceback and ends the job within seconds, non-zero.
"""
import argparse, os, sys, tempfile, time
import torch
from torch import nn
from phaselearn.all import *


class FailAt(Callback):
    "Raise on rank `rank` at its training batch `at` (after the loss, while the other ranks go on to the gradient all-reduce)."
    def __init__(self, rank, at): self.rank, self.at = rank, at
    def after_loss(self):
        if self.training and self.learn.train_iter == self.at and rank_and_world_size()[0] == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} at training batch {self.at} (time.time()={time.time():.3f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--bs', type=int, default=128, help='global batch size (divisible by the number of processes)')
    parser.add_argument('--lr', type=float, default=3e-2)
    parser.add_argument('--path', default=os.path.join(tempfile.gettempdir(), 'phaselearn_ddp_digits'))
    parser.add_argument('--fail-rank', type=int, default=None, help='make this rank raise (to see a failure end the job)')
    parser.add_argument('--fail-at', type=int, default=5, help='the training batch at which --fail-rank raises')
    args = parser.parse_args()
    if not torch.cuda.is_available(): torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('WORLD_SIZE', 1))))
    with distributed_job() as (rank, world_size):
        set_seed(0)   # the same seed on every rank: same epoch orders (DDP also broadcasts rank 0's initial weights)
        dls = digits_dls(bs=args.bs, seed=0, flat=False)
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=[accuracy], path=args.path,
                        cbs=[DistributedCallback()] + ([FailAt(args.fail_rank, args.fail_at)] if args.fail_rank is not None else []))
        learn.progress.show_bar = False
        start = time.perf_counter()
        learn.fit_one_cycle(args.epochs, lr_max=args.lr)
        file = learn.save('ddp_digits')   # a collective: rank 0 writes, every rank waits
        checksum = sum(p.detach().double().sum().item() for p in learn.model.parameters())
        checksums = [None] * world_size
        if world_size > 1: torch.distributed.all_gather_object(checksums, checksum)
        else: checksums = [checksum]
        if is_main_process():
            print(f"{world_size} process(es), global bs {args.bs} ({args.bs // world_size} per rank): "
                  f"{time.perf_counter() - start:.1f} s, accuracy {learn.recorder.values[-1][3]:.4f}, saved {file}")
            print(f"same weights on every rank: {len(set(checksums)) == 1}", flush=True)


if __name__ == '__main__':
    main()
    if 'WORLD_SIZE' in os.environ:
        # The run is over and the process group is gone. Leave without the interpreter's final clean-up, as
        # multiprocessing's workers do: on some machines a gloo worker aborts (SIGABRT) in C++ destructors at exit.
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(0)
