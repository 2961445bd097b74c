"""Token masks and reductions shared by every loss in csd_ext."""

import torch


def row_mask_of(labels, ignore_index):
    """Flat bool mask of the rows that count, or None when every row counts."""
    if labels is None:
        return None
    return labels.reshape(-1) != ignore_index


def reduce_rows(per_row, row_mask, lead_shape, reduction):
    """Reduce a flat per-row loss (0 at ignored rows).

    "mean" divides by the number of counted rows, computed on the device (no
    host sync); with none counted it returns 0 and a zero gradient.
    """
    if reduction == "none":
        return per_row.reshape(lead_shape)
    total = per_row.sum()
    if reduction == "sum":
        return total
    if row_mask is None:
        return total / max(per_row.shape[0], 1)
    return total / row_mask.sum().clamp(min=1)
