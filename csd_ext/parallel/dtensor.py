"""DTensor inputs for the vocab-parallel loss: Shard(-1) on one mesh dimension, Replicate elsewhere."""


def is_dtensor(x):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(x, DTensor)


def vocab_mesh_dim(x, name):
    """The mesh dimension over which DTensor `x` is split along its last dimension.

    Every other mesh dimension must replicate it: the loss is per row, and rows
    sharded over another mesh dimension would need a further reduction that this
    function cannot know the caller wants.
    """
    from torch.distributed.tensor import Replicate, Shard

    if not is_dtensor(x):
        raise TypeError(f"{name} must be a DTensor when the other logits are (got {type(x).__name__})")
    last = x.dim() - 1
    vocab_dims = []
    for i, p in enumerate(x.placements):
        if isinstance(p, Shard) and p.dim % x.dim() == last:
            vocab_dims.append(i)
        elif not isinstance(p, Replicate):
            raise ValueError(
                f"{name} is placed {x.placements} on its mesh; vocab-parallel CSD needs Shard(-1) on one "
                f"mesh dimension and Replicate() on the others (redistribute it first)"
            )
    if len(vocab_dims) != 1:
        raise ValueError(
            f"{name} is placed {x.placements}: it must be sharded over the vocabulary (Shard(-1)) on "
            f"exactly one mesh dimension"
        )
    return vocab_dims[0]


def vocab_parallel_dtensor_call(fn, student, teacher, labels, **kwargs):
    """Run `fn` on the local shards with the vocab mesh dimension's group; wrap the result replicated."""
    from torch.distributed.tensor import DTensor, Replicate

    dim_s = vocab_mesh_dim(student, "student_shard")
    dim_t = vocab_mesh_dim(teacher, "teacher_shard")
    if student.device_mesh != teacher.device_mesh or dim_s != dim_t:
        raise ValueError("student_shard and teacher_shard must be DTensors on the same mesh, sharded over the "
                         "vocabulary on the same mesh dimension")
    if student.shape[:-1] != teacher.shape[:-1] or student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student_shard has global shape {tuple(student.shape)} but teacher_shard has "
                         f"{tuple(teacher.shape)}; they must match")
    mesh = student.device_mesh
    if is_dtensor(labels):
        if any(not isinstance(p, Replicate) for p in labels.placements):
            raise ValueError(f"labels as a DTensor must be replicated, got placements {labels.placements}")
        labels = labels.to_local()
    # to_local() is differentiable: the shard gradients flow back as DTensor gradients.
    loss = fn(student.to_local(), teacher.to_local(), labels, group=mesh.get_group(dim_s), **kwargs)
    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)
