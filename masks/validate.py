"""Checks of numeric inputs and of tensors, shared by every layer (pure Python + torch, no ComfyUI).

Nodes are also called from Python and through the API, where the UI's min / max do not apply, so
the functions check their inputs themselves. Messages name the input as the node shows it and give
the valid range. This module sits in the lowest layer so masks, attention, samplers and nodes can
all use it.
"""
import math
import numbers

import torch

# The usual reason a model's attention or latents turn NaN / inf mid-run, and its fix.
OVERFLOW_FIX = ("the model produced NaN or infinite values while sampling. The usual cause is fp16 "
                "overflow: run the model in bf16 or fp32 (start ComfyUI with --bf16-unet or "
                "--fp32-unet, or pick a bf16 / fp32 weight_dtype when loading it)")


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or inf."""


def check_number(value, name, low=None, high=None, low_open=False, high_open=False, integer=False,
                 hint=""):
    """`value` as a float (int with integer=True) inside the range; else a ValueError naming the
    input `name` and the range. NaN and inf are never valid; None bounds are unbounded."""
    valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if valid and integer:
        valid = float(value).is_integer()
    if valid:
        number = int(value) if integer else float(value)
        valid = ((low is None or (number > low if low_open else number >= low))
                 and (high is None or (number < high if high_open else number <= high)))
    if not valid:
        raise ValueError(f"'{name}' must be {_range_text(low, high, low_open, high_open, integer)}"
                         f"{f' ({hint})' if hint else ''}; got {value!r}")
    return number


def _range_text(low, high, low_open, high_open, integer):
    kind = "a whole number" if integer else "a number"
    if low is not None and high is not None:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return f"{kind} in {interval}" if integer else f"in {interval}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def check_finite(tensor, what, fix=OVERFLOW_FIX):
    """Raise NonFiniteError("<what> contains NaN / inf: <fix>") unless every value is finite.
    One reduction and one host sync: call it on small maps or once after sampling, not per layer."""
    if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} contains NaN or infinite values: {fix}.")
    return tensor


def mask_inside(mask, name="mask"):
    """Boolean "inside" of a MASK: any nonzero pixel. NaN / inf are an error, never "inside"."""
    mask = torch.as_tensor(mask)
    check_finite(mask, f"the '{name}' input", "the node that made the mask produced invalid values; "
                 "check it, or paint the mask")
    return mask != 0
