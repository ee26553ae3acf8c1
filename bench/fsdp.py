"""FSDP2 with phaselearn: a small GPT-style transformer sharded per block by FSDPCallback.

    torchrun --standalone --nproc_per_node 2 bench/fsdp.py             # overhead: phaselearn fit vs a hand-written FSDP2 loop
    torchrun --standalone --nproc_per_node 2 bench/fsdp.py --memory    # parameter + optimizer-state bytes per rank vs 1 process
    torchrun --standalone --nproc_per_node 2 bench/fsdp.py --fit       # a short fit of the transformer (rank 0 prints the table)

The hand-written loop makes the same `fully_shard` calls (each block, then the root), takes the same share of the same
global batches, steps a torch Adam over the sharded parameters and all-reduces its loss for the report as phaselearn does.
Rounds are interleaved (hand, phaselearn, hand, ...) and the ratio of the medians is printed: absolute times on a shared
CPU are noise. On one GPU (world size 1) both sides shard over the one rank. CUDA + NCCL and bf16 (`--bf16`: MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)) when a GPU is there.
"""
import argparse, os, statistics, sys, time
import torch
import torch.distributed as dist
from torch import nn
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from phaselearn.all import *
from phaselearn.fsdp import FSDPCallback, shard_model
from phaselearn.data import epoch_permutation


class Block(nn.Module):
    "Pre-norm transformer block: causal self-attention and an MLP, each residual."
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).transpose(1, 3).unbind(2)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    "Token and position embeddings, `n_layer` blocks, a final norm and a head: nanoGPT's shape, small."
    def __init__(self, vocab=32, d=64, n_layer=2, n_head=4, seq=16):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
    def forward(self, x):
        h = self.tok(x) + self.pos[:x.shape[1]]
        for block in self.blocks: h = block(h)
        return self.head(self.ln(h))


def lm_loss(logits, targets): return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def token_data(n=2048, seq=16, vocab=32, seed=0):
    "Sequences that follow x[t+1] = (3 x[t] + 1) mod vocab from a random start: next-token prediction a model can learn."
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    steps = [start]
    for _ in range(seq): steps.append((3 * steps[-1] + 1) % vocab)
    tokens = torch.cat(steps, 1)
    return tokens[:, :-1], tokens[:, 1:]


def device(): return torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')


def make_learner(args, fsdp=True):
    set_seed(0)
    x, y = token_data(args.samples, vocab=args.vocab)
    n_valid = args.samples // 8
    valid = (x[:n_valid], y[:n_valid]) if args.fit else (None, None)   # the timed fits train only, as the hand loop does
    dls = DataLoaders.from_tensors(x[n_valid:], y[n_valid:], *valid, bs=args.bs, seed=0, device=device())
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    model = TinyGPT(args.vocab, args.dim, args.layers, args.heads).to(device())
    cbs = [FSDPCallback(wrap=[Block], mp_policy=mp)] if fsdp else []
    if fsdp and dist.get_world_size() == 1:   # one GPU: FSDPCallback acts on 2+ ranks only, so shard over the one rank here
        model, cbs = shard_model(model, wrap=[Block], mp_policy=mp), []
    learn = Learner(dls, model, loss_func=lm_loss, opt_func=torch.optim.Adam, lr=args.lr, wd=0., cbs=cbs)
    learn.progress.show_bar = False
    learn.progress.show_table = args.fit
    return learn


def hand_written(args, epochs):
    "The same training, written by hand with FSDP2: same fully_shard calls, same shares of the same batches, torch Adam."
    rank, world_size = dist.get_rank(), dist.get_world_size()
    set_seed(0)
    x, y = token_data(args.samples, vocab=args.vocab)
    n_valid = args.samples // 8
    x, y = x[n_valid:].to(device()), y[n_valid:].to(device())
    model = TinyGPT(args.vocab, args.dim, args.layers, args.heads).to(device())
    mp = {'mp_policy': MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if args.bf16 else {}
    for block in model.blocks: fully_shard(block, **mp)
    fully_shard(model, **mp)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for epoch in range(epochs):
        order = epoch_permutation(len(x), 0, epoch)
        for i in range(0, len(x), args.bs):
            idx = order[i:i + args.bs][rank::world_size].to(x.device)
            loss = lm_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step(); opt.zero_grad()
            reported = loss.detach().clone(); dist.all_reduce(reported)   # the loss every rank reports, as phaselearn does
    if torch.cuda.is_available(): torch.cuda.synchronize()
    return model


def timed(fn):
    if torch.cuda.is_available(): torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available(): torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start


def bench(args):
    ours, hand = [], []
    for r in range(args.rounds + 1):   # round 0 warms up both (allocator, kernels, first sharding)
        t_hand = timed(lambda: hand_written(args, args.epochs))
        t_ours = timed(lambda: make_learner(args).fit(args.epochs))
        if r: hand.append(t_hand); ours.append(t_ours)
    if is_main_process():
        h, o = statistics.median(hand), statistics.median(ours)
        print(f"FSDP2 on {dist.get_world_size()} ranks ({dist.get_backend()}, {'bf16' if args.bf16 else 'fp32'}), "
              f"{args.epochs} epoch(s) of {args.samples - args.samples // 8} sequences, bs {args.bs}, {args.rounds} interleaved rounds: "
              f"hand-written {h:.3f} s, phaselearn {o:.3f} s, ratio phaselearn/hand-written {o / h:.3f}", flush=True)


def local_bytes(tensors) -> int:
    "Bytes of storage the tensors hold on this rank (a DTensor's local shard; shared storage counted once)."
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() in seen: continue
        seen.add(storage.data_ptr()); total += storage.nbytes()
    return total


def held_bytes(learn):
    "Parameter bytes and optimizer-state bytes this rank holds after a fit."
    params = list(learn.model.parameters())
    states = [v for s in learn.opt.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
    return local_bytes(params), local_bytes(states)


def memory(args):
    rank, world_size = rank_and_world_size()
    learn = make_learner(args)
    learn.fit(1)
    mine = held_bytes(learn)
    every = [None] * world_size
    dist.all_gather_object(every, mine)
    if rank == 0:
        single = make_learner(args, fsdp=False)   # the same model and fit, unsharded, on this rank alone
        single.fit(1)
        p1, s1 = held_bytes(single)
        n = sum(p.numel() for p in single.model.parameters())
        print(f"TinyGPT, {n:,} parameters, Adam; bytes held after a fit (measured from the tensors' storage):")
        print(f"{'':>14} {'parameters':>12} {'optim. state':>13} {'total':>12} {'x one process':>14}")
        print(f"{'one process':>14} {p1:>12,} {s1:>13,} {p1 + s1:>12,} {1:>14.3f}")
        for r, (p, s) in enumerate(every):
            print(f"{f'rank {r}/{world_size}':>14} {p:>12,} {s:>13,} {p + s:>12,} {(p + s) / (p1 + s1):>14.3f}")
        print(flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--memory', action='store_true')
    parser.add_argument('--fit', action='store_true')
    parser.add_argument('--bf16', action='store_true')
    parser.add_argument('--epochs', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--samples', type=int, default=2048)
    parser.add_argument('--bs', type=int, default=64)
    parser.add_argument('--dim', type=int, default=64)
    parser.add_argument('--layers', type=int, default=2)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--vocab', type=int, default=32)
    parser.add_argument('--lr', type=float, default=3e-3)
    args = parser.parse_args()
    if 'WORLD_SIZE' not in os.environ: sys.exit("run under torchrun: torchrun --standalone --nproc_per_node 2 bench/fsdp.py")
    if not torch.cuda.is_available(): torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ['WORLD_SIZE'])))
    with distributed_job():
        if args.memory: memory(args)
        elif args.fit:
            learn = make_learner(args)
            learn.fit_one_cycle(args.epochs, lr_max=args.lr)
        else: bench(args)


if __name__ == '__main__':
    main()
