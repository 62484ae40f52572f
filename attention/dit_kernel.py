"""Joint-attention text probabilities without the image x image matrix.

A DiT's joint attention normalises each query row over all keys (text, image, reference image).
The probability of image query i on text key j is exp(s_ij - lse_i), with s the scaled logits
(plus any attention-mask bias) and lse_i the row's log-sum-exp over every key. Fused attention
kernels compute lse anyway; with it, only the small image x text block of logits is ever built.

Two ways to get lse, chosen per call so the model's output never changes:
- fused: ComfyUI's own kernel is PyTorch SDPA and SDPA would run the CPU flash kernel. We call that
  kernel directly (same tensors, same op: bit-identical output) and it also returns lse.
- beside: anything else (ComfyUI's default sub-quadratic kernel, xformers, Sage, another pack's
  override, CUDA). Its output is returned untouched; lse is computed separately for the image
  queries only (the CPU flash kernel where it applies, else a chunked logsumexp).
"""
import functools
import inspect

import torch

LOGITS_BUDGET = 32 * 2 ** 20  # bytes of float32 logits built at once (per head group / query chunk)


@functools.lru_cache(maxsize=None)
def _attention_signature():
    from comfy.ldm.modules import attention

    return inspect.signature(getattr(attention.attention_pytorch, "__wrapped__", attention.attention_pytorch))


def bind_attention_args(args, kwargs):
    """ComfyUI's attention call (q, k, v, heads, mask=None, ..., skip_reshape=False, ...) by name.
    Flux passes heads positionally with skip_reshape, SD3 heads as a keyword, Qwen the mask
    positionally: binding against the kernels' common signature reads all of them."""
    bound = _attention_signature().bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def heads_first(call):
    """q, k, v as [batch, heads, tokens, dim] (the layout SDPA takes), and the mask broadcast to
    4 dims as ComfyUI's attention_pytorch does."""
    q, k, v, heads = call["q"], call["k"], call["v"], call["heads"]
    if not call["skip_reshape"]:
        batch, _, inner = q.shape
        q, k, v = (t.view(batch, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    mask = call["mask"]
    if mask is not None:
        if mask.dtype == torch.bool:  # True = attend, as SDPA reads it: make it the additive bias
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        while mask.ndim < 4:
            mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
        if mask.shape[2] == 1 and q.shape[2] > 1:
            # one row for every query (Qwen-Image's text-padding mask [B, 1, L], ComfyUI >= 0.11):
            # a view with a row per query, so the hooks can take the image queries' rows
            mask = mask.expand(*mask.shape[:2], q.shape[2], mask.shape[3])
    return q, k, v, mask


def sdpa_runs_cpu_flash(q, k, v, mask):
    if q.device.type != "cpu" or (mask is not None and mask.dtype != q.dtype):
        return False
    choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False)
    return choice == torch.nn.attention.SDPBackend.FLASH_ATTENTION.value


def is_comfy_pytorch_attention(func):
    from comfy.ldm.modules import attention

    return func is getattr(attention.attention_pytorch, "__wrapped__", None)


def fused_available(func, call):
    """True when `func` is ComfyUI's PyTorch attention and SDPA would pick the CPU flash kernel
    for these tensors, so calling that kernel ourselves is exactly what the model would run."""
    if not is_comfy_pytorch_attention(func) or (call["mask"] is not None and call["mask"].dtype == torch.bool):
        return False
    from comfy.ldm.modules import attention

    q, k, v, mask = heads_first(call)
    return q.shape[0] <= attention.SDP_BATCH_LIMIT and sdpa_runs_cpu_flash(q, k, v, mask)


def fused_attention(call):
    """ComfyUI's attention_pytorch with SDPA's CPU flash kernel called directly: (out, lse)."""
    q, k, v, mask = heads_first(call)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p=0.0, is_causal=False, attn_mask=mask)
    if not call["skip_output_reshape"]:
        out = out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[-1])
    return out, lse


def _rows(mask, rows):
    return None if mask is None else mask[..., rows, :]


def logsumexp_rows(q, k, v, mask, rows):
    """lse of the query rows `rows` over all keys, beside an attention whose output we keep."""
    q_rows = q[:, :, rows]
    mask_rows = _rows(mask, rows)
    if sdpa_runs_cpu_flash(q_rows, k, v, mask_rows):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_rows, k, v, dropout_p=0.0, is_causal=False, attn_mask=mask_rows)[1]
    scale = q.shape[-1] ** -0.5
    per_query = q.shape[0] * q.shape[1] * k.shape[2] * 4
    chunk = max(1, LOGITS_BUDGET // per_query)
    parts = []
    for start in range(0, q_rows.shape[2], chunk):
        logits = torch.matmul(q_rows[:, :, start:start + chunk].float(), k.float().transpose(-1, -2)) * scale
        if mask_rows is not None:
            logits = logits + mask_rows[..., start:start + chunk, :].float()
        parts.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(parts, dim=-1)


def text_probabilities(q_img, k_txt, lse_img=None, mask=None):
    """Mean over heads of the image queries' probabilities on the text keys: [batch, img, txt].

    q_img [B, H, I, D], k_txt [B, H, T, D]; mask the [.., I, T] bias block or None.
    lse_img [B, H, I] gives the joint row (normalised over all keys); None normalises over the
    text keys only. Heads go in groups so at most LOGITS_BUDGET bytes of logits exist at once.
    """
    batch, heads, n_img, _ = q_img.shape
    scale = q_img.shape[-1] ** -0.5
    group = max(1, LOGITS_BUDGET // (batch * n_img * k_txt.shape[2] * 4))
    total = None
    for start in range(0, heads, group):
        heads_slice = slice(start, start + group)
        logits = torch.matmul(q_img[:, heads_slice].float(), k_txt[:, heads_slice].float().transpose(-1, -2))
        logits = logits * scale
        if mask is not None:
            logits = logits + mask[:, heads_slice if mask.shape[1] > 1 else slice(None)].float()
        if lse_img is None:
            probs = logits.softmax(dim=-1)
        else:
            probs = (logits - lse_img[:, heads_slice, :, None].float()).exp_()
        part = probs.sum(dim=1)
        total = part if total is None else total.add_(part)
    return total / heads
