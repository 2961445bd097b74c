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
        f"only the last (vocabulary) dimension may differ between ranks (check_shapes=True checks it)"
    )


def all_gather_states(states, group):
    return PendingGather(states, group, async_op=False).wait()


MAX_CHECKED_DIMS = 8


def check_same_leading_shape(lead_shape, width, device, group):
    """Raise a clear error when ranks pass different leading shapes (opt-in: check_shapes=True).

    Costs one extra all-gather of a few integers and a host sync, which the loss itself avoids;
    without it a different row count fails inside the backend (gloo aborts the process with
    "Received data size doesn't match expected size"; NCCL may hang), and a different leading
    shape with the same row count goes unnoticed.
    """
    if len(lead_shape) > MAX_CHECKED_DIMS:
        raise ValueError(f"check_shapes supports up to {MAX_CHECKED_DIMS} leading dimensions, got {len(lead_shape)}")
    header = torch.full((MAX_CHECKED_DIMS + 2,), -1, dtype=torch.int64)
    header[0] = len(lead_shape)
    header[1] = width
    header[2:2 + len(lead_shape)] = torch.tensor(list(lead_shape), dtype=torch.int64)
    header = header.to(device)
    world = dist.get_world_size(group)
    out = header.new_empty((world, header.numel()))
    _all_gather_single(out.view(-1), header, group=group)
    out = out.cpu()
    shapes = [tuple(int(v) for v in row[2:2 + int(row[0])]) for row in out]
    if any(s != shapes[0] for s in shapes):
        widths = [int(row[1]) for row in out]
        raise ValueError(
            "vocab-parallel CSD: the ranks passed logits with different leading shapes "
            + ", ".join(f"rank {r}: {s} x {w} columns" for r, (s, w) in enumerate(zip(shapes, widths)))
            + "; every rank must hold the same rows (tokens) and only its own slice of the vocabulary"
        )
