"""Leave no trace: every node of the pack, run as ComfyUI runs it, leaves the process as it found
it: torch's autograd / inference / dtype / determinism settings, saved-tensor hooks, ComfyUI's
model_management state and attention function, the caller's models, and every piece of
module-level data of the pack (caches of pure functions excepted: they memoise, they do not
change behaviour).

ComfyUI's list of loaded models is left out: every sampling node (KSampler too) loads its model
there, and ComfyUI frees it when it needs the memory.
"""
import contextvars
import copy
import sys
import types

import pytest
import torch

import node_calls
from ae_testlib import registry


def _pack_modules():
    """The pack's modules: as ComfyUI loaded it (the nodes' package) and as the tests import it."""
    classes, _ = registry.pack_nodes()
    roots = {cls.__module__.split(".")[0] for cls in classes.values()} | {"attention_edit"}
    return {name: module for name, module in list(sys.modules.items())
            if module is not None and name.split(".")[0] in roots}


def _module_data(module):
    data = {}
    for name, value in vars(module).items():
        if name.startswith("__") or isinstance(value, (types.ModuleType, types.FunctionType, type,
                                                       types.BuiltinFunctionType)) or callable(value):
            continue
        data[name] = value.get() if isinstance(value, contextvars.ContextVar) else copy.deepcopy(value)
    return data


def _model_state(model):
    """What a node must not change on the caller's ModelPatcher (patches go on clones)."""
    options = model.model_options
    replace = options.get("transformer_options", {}).get("patches_replace", {})
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())
    parameters = [(name, p.data_ptr(), p.dtype, p.requires_grad, p._version if not p.is_inference() else None)
                  for name, p in model.model.named_parameters()]
    return {"options": sorted(options), "transformer_options": sorted(options.get("transformer_options", {})),
            "replace": {kind: sorted(map(str, patches)) for kind, patches in replace.items()},
            "patches": sorted(model.patches), "object_patches": sorted(model.object_patches),
            "hooks": hooks, "parameters": parameters, "training": model.model.training}


def snapshot(models):
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm
    import comfy.samplers

    return {
        "grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
        "dtype": torch.get_default_dtype(), "device": str(torch.get_default_device()),
        "anomaly": torch.is_anomaly_enabled(), "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "saved_tensors_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False) is not None,
        "interrupted": mm.processing_interrupted(), "vram_state": mm.vram_state, "cpu_state": mm.cpu_state,
        "attention": attention.optimized_attention,
        "samplers": tuple(comfy.samplers.KSampler.SAMPLERS),
        "schedulers": tuple(comfy.samplers.KSampler.SCHEDULERS),
        "pack": {name: _module_data(module) for name, module in _pack_modules().items()},
        "models": [_model_state(model) for model in models],
    }


def _diff(before, after, path=""):
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after), key=str):
            yield from _diff(before.get(key, "<missing>"), after.get(key, "<missing>"), f"{path}.{key}")
    elif not _equal(before, after):
        yield f"{path}: {before!r:.200} -> {after!r:.200}"


def _equal(a, b):
    try:
        result = a == b
        return bool(result) if not torch.is_tensor(result) else bool(result.all())
    except Exception:  # noqa: BLE001 - values without a usable ==: compare their text
        return repr(a) == repr(b)


def _node_keys():
    classes, _ = registry.pack_nodes()
    return sorted(classes)


@pytest.mark.parametrize("key", _node_keys())
def test_node_leaves_no_global_trace(key, comfy_host):
    inputs = node_calls.inputs(key)  # builds (and caches) what the call needs first
    models = [v for v in inputs.values() if hasattr(v, "model_options") and hasattr(v, "patches")]
    assert models or key in {"AttentionEditTextEncode", "AttentionEditTextEncodeQwenImageEdit",
                             "AttentionEditInstructionEncodeQwenImageEdit",
                             "AttentionEditTextEncodeQwenImageEditPlus",
                             "AttentionEditInstructionEncodeQwenImageEditPlus",
                             "AttentionEditInstructionEncode", "AttentionEditHeatmap",
                             "AttentionEditMask", "AttentionEditInstDiffEditMask"}
    with torch.inference_mode():  # ComfyUI's executor runs every node inside inference mode
        before = snapshot(models)
        node_calls.call(key, **inputs)
        after = snapshot(models)
    changes = list(_diff(before, after))
    assert not changes, f"{key} changed global state:\n" + "\n".join(changes)


def test_snapshot_sees_the_kind_of_change_it_guards_against(comfy_host):
    """The checker itself: a leaked module flag, backward state, hook or grad mode shows up."""
    from ae_testlib.pack import pack_module

    grad = pack_module("samplers.grad")
    model = node_calls.inputs("AttentionEditKSamplerRecord")["model"]
    with torch.inference_mode():
        before = snapshot([model])
    grad.LEAKED_FLAG = True
    token = grad._block.set(grad._Backward())
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            after = snapshot([model])  # outside inference mode: grad mode differs too
    finally:
        grad._block.reset(token)
        del grad.LEAKED_FLAG
    changes = "\n".join(_diff(before, after))
    for expected in ("LEAKED_FLAG", "_block", "saved_tensors_hooks", "inference", "grad"):
        assert expected in changes, (expected, changes)
