"""What the training loop needs to behave the same on 1 or K processes.

- ``make_accelerator``: accelerate recognises torchrun's environment on a
  machine without a GPU only when told it runs on the CPU; it then uses gloo
  (NCCL on GPUs).
- ``ShardedBatchStream``: an endless stream of micro-batches for this rank,
  ordered by ``torch.utils.data.DistributedSampler`` with ``set_epoch`` every
  epoch (a fresh permutation per epoch, the same on every rank), with a
  position that checkpoints save.  Rank r's k-th micro-batch and the other
  ranks' k-th micro-batches together are exactly the k-th batch one process
  with a K times larger batch would see.
- ``token_denominator``: the token-mean over the *global* micro-batch.  Each
  rank divides its loss sum by (global valid-token count / K); DDP then
  averages the gradients over the K ranks, which gives
  sum over all tokens / global count: the gradient one process computes on
  the same global batch, whatever the per-rank token counts are.
- ``EvalShards``: validation data split across ranks, padded to equal length
  with copies whose labels are all ignored (they add no tokens but keep the
  ranks in step, which a sharded teacher needs).
- ``generate_sharded``: evaluation prompts split across ranks, outputs
  gathered back in order on every rank.
- ``place_teacher``: the frozen teacher replicated on every device, or
  sharded across the processes with FSDP2 (``fully_shard``) per decoder
  block.
- ``release_process_group``: the end of a run destroys the process group
  explicitly (the CLI does, on every exit path).
"""

import contextlib
import gc
import math
import os
import sys

import torch
from torch.utils.data import DistributedSampler

from .data import IGNORE_INDEX


def make_accelerator(mixed_precision, grad_accum=1, **kwargs):
    from accelerate import Accelerator

    # accelerate counts the micro-batches (accumulation.py): it syncs gradients on the last
    # one, and under DeepSpeed the engine steps once per window, not on every backward.
    # cpu=True would make accelerate ignore a DeepSpeed config; DeepSpeed runs on CPU itself.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available() and not deepspeed,
                       gradient_accumulation_steps=grad_accum, **kwargs)


class ShardedBatchStream:
    """Endless micro-batches (lists of examples) of this rank's share of ``items``.

    Epoch e uses ``DistributedSampler(shuffle=True, seed=seed).set_epoch(e)``:
    the permutation depends only on (seed, e), so every rank agrees on it and a
    resumed run sees the same order.  drop_last=False: when len(items) is not a
    multiple of the world size, the sampler repeats a few examples so that every
    rank has the same number of batches.
    """

    def __init__(self, items, batch_size, *, seed, rank=0, world=1):
        if not items:
            raise ValueError("no examples to stream")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.sampler = DistributedSampler(items, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=False)
        self.epoch, self.position = 0, 0
        self._order = None

    @property
    def batches_per_epoch(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    @property
    def epoch_progress(self):
        """Epochs done, as a float (for logging)."""
        return self.epoch + self.position / self.batches_per_epoch

    def next(self):
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        start = self.position * self.batch_size
        self.position += 1
        return [self.items[i] for i in self._order[start:start + self.batch_size]]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "n_items": len(self.items),
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state):
        for key, now in (("n_items", len(self.items)), ("batch_size", self.batch_size), ("seed", self.seed)):
            if state[key] != now:
                raise ValueError(f"data stream: the checkpoint has {key}={state[key]}, this run {now}")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def token_denominator(labels, accelerator, mode="global"):
    """What this rank divides its summed token loss by.

    "global": (valid tokens over all ranks) / world size, so that DDP's
    gradient average equals the single-process token mean of the global
    micro-batch.  "per_rank": this rank's own count (each rank's mean, then
    averaged over ranks: the paper's code; biased when ranks hold different
    numbers of tokens).  Never 0 (a batch with no tokens gives loss 0).
    """
    count = (labels != IGNORE_INDEX).sum()
    world = accelerator.num_processes
    if mode == "global" and world > 1:
        count = count.clone()
        torch.distributed.all_reduce(count)  # int64: exact
        return count.clamp(min=1).to(torch.float32) / world
    return count.clamp(min=1).to(torch.float32)


def reduce_mean(values, accelerator):
    """Mean over ranks of a list of floats (for logging)."""
    if accelerator.num_processes == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="mean").tolist()


def sync_context(accelerator, model, sync):
    """Gradients are all-reduced only on the backward that ends an optimiser step."""
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def shard_items(items, rank, world, pad=True):
    """items[rank::world]; with ``pad``, every rank gets ceil(n / world) entries, the
    extra ones copies of the first item with every label ignored (zero tokens)."""
    mine = list(items[rank::world])
    if pad and items:
        want = math.ceil(len(items) / world)
        filler = dict(items[0], labels=[IGNORE_INDEX] * len(items[0]["labels"]))
        mine += [filler] * (want - len(mine))
    return mine


class EvalShards:
    """This rank's validation batches, on the device; re-iterable."""

    def __init__(self, items, batch_size, collate, accelerator):
        self.items = shard_items(items, accelerator.process_index, accelerator.num_processes)
        self.batch_size, self.collate, self.device = batch_size, collate, accelerator.device

    def __iter__(self):
        for start in range(0, len(self.items), self.batch_size):
            yield to_device(self.collate(self.items[start:start + self.batch_size]), self.device)

    def __len__(self):
        return math.ceil(len(self.items) / self.batch_size)


def is_sharded(model):
    """True when the model's parameters are split across ranks (FSDP or ZeRO-3): every
    rank must then run each forward pass, so generation needs ``synced_gpus``."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover  (older torch)
        return False
    for m in model.modules():
        if isinstance(m, (FSDPModule, FSDP)):
            return True
    return any(hasattr(p, "ds_id") for p in model.parameters())  # DeepSpeed ZeRO-3


def release_process_group():
    """Destroys the default process group, if one exists, before the
    interpreter shuts down.  Left to the interpreter's teardown, gloo's
    worker threads can outlive it and a rank dies with SIGABRT ("terminate
    called without an active exception") after finishing its work, which
    fails the whole torchrun launch.  Safe to call more than once."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_program(status, distributed=None):
    """Ends a ``csd-distill`` process with ``status``.

    ``distributed``: whether this process is one rank of several (default:
    ``WORLD_SIZE`` > 1, as torchrun sets; ``mp.spawn`` workers pass True).
    Such a worker leaves with ``os._exit`` once its process group is
    destroyed and its output flushed.  ``destroy_process_group`` only drops
    c10d's own references: accelerate's state and an FSDP2 mesh keep the gloo
    group alive into interpreter teardown, where its worker threads can still
    abort a rank that finished its work ("terminate called without an active
    exception", seen once in CI after a complete resumed run), and torchrun
    then fails the launch.  All files are written and closed by then, so
    skipping teardown loses nothing.  A single process exits normally."""
    if distributed is None:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        release_process_group()
        gc.collect()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)
    sys.exit(status)


def rank_and_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def generate_sharded(model, tokenizer, prompt_ids, **kwargs):
    """``evaluate.generate`` over prompts split across ranks; every rank returns all outputs in order.

    With one process it is ``generate`` itself.  A sharded model needs every
    rank to run the same number of generate calls and decoding steps: the
    shards are padded to equal length and ``synced_gpus`` is set.
    """
    from .evaluate import generate

    rank, world = rank_and_world()
    if world == 1:
        return generate(model, tokenizer, prompt_ids, **kwargs)
    from accelerate.utils import gather_object

    mine = list(range(rank, len(prompt_ids), world))
    sharded = is_sharded(model)
    run = list(mine)
    if sharded:
        run += [0] * (math.ceil(len(prompt_ids) / world) - len(mine))
    outs = generate(model, tokenizer, [prompt_ids[i] for i in run], synced_gpus=sharded, **kwargs) if run else []
    pairs = gather_object(list(zip(mine, outs[:len(mine)])))
    result = [None] * len(prompt_ids)
    for i, text in pairs:
        result[i] = text
    return result


def place_teacher(accelerator, teacher, sharding="replicate", log=print):
    """Move the frozen teacher to this rank's device, whole or sharded.

    "shard" applies FSDP2 ``fully_shard`` to each decoder block (the model's
    ``_no_split_modules``) and to the root, over all processes: each rank keeps
    1/K of the weights and all-gathers one block at a time in the forward pass
    (resharding after it).  It works with a DDP student and with an FSDP one.
    """
    if teacher is None:
        return None
    if sharding == "replicate" or accelerator.num_processes == 1:
        if sharding == "shard":
            log("teacher_sharding=shard with a single process: nothing to shard, the teacher stays whole")
        return teacher.to(accelerator.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    names = set(getattr(teacher, "_no_split_modules", None) or ())
    blocks = [m for m in teacher.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    log(f"teacher sharded over {accelerator.num_processes} processes (FSDP2, {len(blocks)} blocks"
        f"{' of ' + ', '.join(sorted(names)) if names else ''})")
    return teacher


def check_generation_support(accelerator):
    """On-policy sampling calls ``generate`` on the student inside the training loop.

    With DDP, a single process or FSDP2 (where ``fully_shard`` hooks every
    module's forward, so ``generate`` all-gathers as it goes, with
    ``synced_gpus``) that works as is.  FSDP1's flat parameters and ZeRO-3's
    partitioned ones are not usable by ``generate`` without gathering the
    whole student first, which this script does not do: refuse clearly.
    """
    from accelerate.utils import DistributedType

    from .models import ModelError

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        raise ModelError("on-policy distillation (student_gen_ratio > 0) with an FSDP student needs FSDP2: "
                         "set fsdp_version: 2 in the accelerate config (see docs/training.md)")
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            raise ModelError("on-policy distillation (student_gen_ratio > 0) cannot sample from a ZeRO-3 "
                             "partitioned student: use ZeRO-2, DDP or FSDP2 (see docs/training.md)")
