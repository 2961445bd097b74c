"""csd_ext.parallel on 2, 3 and 4 spawned gloo ranks (CPU): the vocab-parallel loss, its
DTensor path and the sharded fused linear path, against single-process csd_ext.

Each test spawns one process group and runs many cases in it (parallel_workers.py):
process start-up dominates the cost.
"""

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel_workers as pw

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def spawn(tmp_path, world, body, *args):
    mp.spawn(pw.spawn_main, args=(world, str(tmp_path / "store"), body, args), nprocs=world, join=True)


def test_vocab_parallel_two_ranks(tmp_path):
    """V = 1001 as 1000 + 1 (a one-column shard); loss, fused, DTensor on a 1-D mesh, errors."""
    spawn(tmp_path, 2, pw.body_two_ranks)


def test_vocab_parallel_three_ranks(tmp_path):
    """V = 1001 as 500 + 0 + 501 (an empty shard) for the loss, 400 + 1 + 600 for the fused path."""
    spawn(tmp_path, 3, pw.body_three_ranks)


def test_vocab_parallel_four_ranks(tmp_path):
    """V = 1001 as 300 + 1 + 450 + 250; DTensor on a 2 x 2 mesh sharded over its "tp" dimension."""
    spawn(tmp_path, 4, pw.body_four_ranks)


def test_kernel_partial_states_match_pytorch():
    """The states the loss gets from the compiled kernel == an independent PyTorch computation."""
    pw.check_kernel_states_match_pytorch_states()
