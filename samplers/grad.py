"""Backward through ComfyUI's UNet from inside its sampling (MAG-Edit latent updates, null-text).

ComfyUI runs every prompt under `torch.inference_mode()` and its k-diffusion samplers under
`torch.no_grad()`, so autograd is off, and weights loaded there are inference tensors, which
autograd refuses to save for backward ("Inference tensors cannot be saved for backward").

`autograd_through(module)` turns autograd back on locally and, for as long as it is open, puts
frozen autograd-usable aliases in place of the module's inference-tensor (or grad-requiring)
parameters and buffers; it puts the originals back on exit. Cost: no weight copy in either case.
A normal tensor is aliased by `detach()`; an inference tensor by a new tensor header on the same
storage (`Tensor.set_`), which is an ordinary tensor with its own version counter. Inference
tensors carry no version counter, so autograd could not notice an in-place write to a weight
between forward and backward; nothing in ComfyUI writes weights during a sampling step.
Tensor subclasses (quantised weights of custom-op packs) are left as they are: those ops turn
them into new, dequantised tensors before use, which autograd may save.
Gradients cost the activations of the forward pass, as for any backward.

Older ComfyUI (e.g. the mid-2024 `comfyui` wheel) adds residuals in place in its transformer
blocks (`x += n` on the x its LayerNorm saved), which breaks any backward through the UNet;
`loss_and_grad` detects that error once per `autograd_through` block and from then on, inside that
block only, has autograd keep copies of the saved activations (`saved_tensors_hooks`), which costs
up to one more copy of them. Current ComfyUI (`x = n + x`) needs no copies. Nothing of this
outlives the block: no process-wide flag, no hook left installed, whatever way the block ends.
"""
import contextlib
import contextvars

import torch

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_INPLACE_ERROR = "modified by an inplace operation"


class _Backward:
    """State of one `autograd_through` block: whether its UNet modifies saved activations."""

    def __init__(self):
        self.copy_saved_activations = False


# The open block's state (None outside every block); set and reset by autograd_through.
_block = contextvars.ContextVar("attention_edit_backward", default=None)


def _frozen_alias(tensor):
    """A tensor on `tensor`'s memory that autograd may save, with requires_grad False."""
    if not tensor.is_inference():
        return tensor.detach()
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _needs_alias(tensor):
    return (tensor is not None and type(tensor) in _PLAIN_TENSOR_TYPES
            and (tensor.is_inference() or tensor.requires_grad))


def _swap_in_aliases(modules):
    """Replace tensors in place; return (slot dict, name, original, alias) for the restore."""
    swapped = []
    for module in modules:
        for sub in module.modules():
            for slots, wrap in ((sub._parameters, _as_parameter), (sub._buffers, lambda t: t)):
                for name, tensor in slots.items():
                    if _needs_alias(tensor):
                        alias = wrap(_frozen_alias(tensor))
                        slots[name] = alias
                        swapped.append((slots, name, tensor, alias))
    return swapped


def _as_parameter(tensor):
    return torch.nn.Parameter(tensor, requires_grad=False)


def _restore(swapped):
    for slots, name, original, alias in reversed(swapped):
        # A weight patch applied meanwhile (ComfyUI hooks) replaced our alias: keep the patch.
        if slots.get(name) is alias:
            slots[name] = original


@contextlib.contextmanager
def autograd_through(*modules):
    """Enable autograd (also inside inference_mode / no_grad) for backward through `modules`.

    The modules are left as found on exit: same parameter objects, values and requires_grad
    flags, no `.grad`. Inside, weights never require grad, so only inputs made with `leaf()`
    receive gradients. Use `torch.no_grad()` inside for passes that need no gradient.
    """
    with torch.inference_mode(False), torch.enable_grad():
        swapped = _swap_in_aliases(modules)
        token = _block.set(_Backward())
        try:
            yield
        finally:
            _block.reset(token)
            _restore(swapped)


def leaf(tensor, requires_grad=False):
    """A detached, non-inference copy of `tensor` for use inside `autograd_through`.

    Tensors made under inference mode (latents, sigmas, targets, loss weights) cannot be saved
    for backward; a copy made with inference mode off can. Conditioning needs none: it enters
    through concatenation and frozen layers, which save nothing of it.
    """
    with torch.inference_mode(False):
        return tensor.detach().clone().requires_grad_(requires_grad)


def _copy_if_activation(tensor):
    # The in-place writes seen are residual adds on graph activations; weights and constant
    # inputs (no grad_fn) are left uncopied.
    return tensor.clone() if tensor.grad_fn is not None else tensor


def loss_and_grad(loss_fn, inputs):
    """(loss, d loss / d inputs) for `loss = loss_fn()`, inside `autograd_through`.

    loss_fn runs the forward; it is run again, keeping copies of saved activations, when the
    host's UNet turns out to modify them in place (see the module docstring); later calls in the
    same block keep the copies from the start.
    """
    block = _block.get() or _Backward()  # outside a block: decided for this call alone
    if not block.copy_saved_activations:
        try:
            loss = loss_fn()
            return loss, torch.autograd.grad(loss, inputs)
        except RuntimeError as error:
            if _INPLACE_ERROR not in str(error):
                raise
            block.copy_saved_activations = True
    with torch.autograd.graph.saved_tensors_hooks(_copy_if_activation, lambda tensor: tensor):
        loss = loss_fn()
    return loss, torch.autograd.grad(loss, inputs)


def refuse_controlnet(*conditionings, method="MAG-Edit"):
    """Gradients through the UNet can't pass a ControlNet's inference-mode weights: say so."""
    for conditioning in conditionings:
        if any("control" in options for _, options in conditioning):
            raise ValueError(
                f"{method} does not support ControlNet conditioning (it takes gradients through the "
                "model). Connect the prompts without Apply ControlNet; keep the ControlNet for a "
                "later KSampler stage if needed.")
