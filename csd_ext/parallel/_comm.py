"""The one collective of the vocab-parallel forward: an all-gather of per-row partial states."""

import torch
import torch.distributed as dist


def resolve_group(group):
    """The process group to use (the world by default), with a clear error when there is none."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "csd_ext.parallel needs torch.distributed to be initialised "
            "(dist.init_process_group(...)) before a vocab-parallel loss is computed"
        )
    return dist.group.WORLD if group is None else group


# torch >= 2.12 names it all_gather_single and deprecates all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class PendingGather:
    """An all-gather of states [N, B, 4] into [R, N, B, 4], possibly still in flight.

    `wait()` returns the gathered tensor.  Started with async_op=True, so the
    caller can compute (the next chunk's GEMM) while the backend moves the
    bytes: gloo runs collectives on its own threads, NCCL on its own stream.
    """

    def __init__(self, states, group, async_op):
        self.group = group
        self.world = dist.get_world_size(group)
        self.states = states.contiguous()
        # Gathered along dim 0 ([R * N, ...], the layout every backend accepts), viewed as [R, N, ...].
        flat = states.new_empty((self.world * states.shape[0], *states.shape[1:]))
        self.out = flat.view(self.world, *states.shape)
        try:
            self.work = _all_gather_single(flat, self.states, group=group, async_op=async_op)
        except RuntimeError as exc:
            raise _shape_error(states, exc) from exc

    def wait(self):
        if self.work is not None:
            try:
                self.work.wait()
            except RuntimeError as exc:
                raise _shape_error(self.states, exc) from exc
            self.work = None
        return self.out


def _shape_error(states, exc):
    return RuntimeError(
        f"vocab-parallel CSD: all-gathering the per-row states failed ({exc}). Every rank of the "
        f"group must pass logits with the same leading shape (this rank: {states.shape[0]} rows); "
        f"only the last (vocabulary) dimension may differ between ranks"
    )


def all_gather_states(states, group):
    return PendingGather(states, group, async_op=False).wait()
