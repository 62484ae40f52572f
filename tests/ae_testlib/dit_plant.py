"""Plant meaningful attention in a random-weight DiT: bias the real joint-attention logits between
chosen prompt tokens and a chosen region of the generated image's tokens.

Random weights attend nowhere in particular, so a method that finds a word's region from attention
has nothing to find. `plant(model, ...)` returns a clone whose every joint attention call gets an
additive bias `beta` on the logits [image token in region, word token] (the attention-mask argument
ComfyUI's kernels take, so the model, and any hook that reads the call, sees the planted logits).

It is installed through ComfyUI's own hooks and stays outside every other: an APPLY_MODEL wrapper
replaces, for the length of each forward, `transformer_options["optimized_attention_override"]`
by a planting override that adds the bias to the call's mask and then calls the override that was
there (the method's own, installed later on a clone of this clone) or ComfyUI's kernel. So a
method's hooks see the planted bias exactly as they would see a real attention-mask cond.
"""
import torch

from .pack import pack_module

WRAPPER_KEY = "attention_edit_test_plant"


class _PlantingOverride:
    def __init__(self, bias_of, inner, mode="bias"):
        self.bias_of = bias_of  # (q_len, k_len, batch, dtype, device) -> (bias [B, 1, Lq, Lk], noise or None) or None
        self.inner = inner
        self.mode = mode

    def __call__(self, func, *args, **kwargs):
        kernel = pack_module("attention.dit_kernel")
        call = kernel.bind_attention_args(args, kwargs)
        q, k, _, mask = kernel.heads_first(call)
        biases = self.bias_of(q.shape[2], k.shape[2], q.shape[0], q.dtype, q.device)
        if biases is not None:
            bias, noise = biases
            if self.mode in ("qk", "q"):
                edit = _planted_qk if self.mode == "qk" else _planted_q
                args = (*edit(q, k, bias[:, 0], call), *args[2:])
                bias = noise
            elif noise is not None:
                bias = bias + noise
            if bias is not None:
                bias = bias if mask is None else mask + bias
                if len(args) > 4:  # mask passed positionally (Qwen); the kernels name q, k, v differently
                    args = args[:4] + (bias,) + args[5:]
                else:
                    kwargs = {**kwargs, "mask": bias}
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)


def _planted_qk(q, k, bias, call):
    """The other planting mechanism: q and k themselves edited, no mask. One direction u of the
    head space is emptied in every q and k, then the region's image queries get b u and the word's
    keys a u with a b / sqrt(d) = beta: exactly `beta` more on the planted logits, nothing else
    changes but the lost u component. Returned in the layout the call came in."""
    dim = q.shape[-1]
    u = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(7)), dim=0)
    u = u.to(q.dtype).to(q.device)
    beta = float(bias.abs().amax())
    rows = (bias != 0).any(-1)[:, None, :, None].to(q.dtype)  # [B, 1, L, 1] planted queries
    cols = (bias != 0).any(-2)[:, None, :, None].to(q.dtype)  # [B, 1, L, 1] planted keys
    scale = (beta * dim ** 0.5) ** 0.5
    q = q - (q @ u)[..., None] * u + rows * scale * u
    k = k - (k @ u)[..., None] * u + cols * scale * u
    if not call["skip_reshape"]:  # back to [B, L, H * D]
        q, k = (t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1) for t in (q, k))
    return q, k


def _planted_q(q, k, bias, call):
    """A third mechanism, the closest to a learned concept: the region's image queries move along
    the word's (mean) key so their logit on it rises by `beta`; keys like the word's gain too
    (beta x their projection on it), as a real query direction would give them."""
    beta = float(bias.abs().amax())
    rows = (bias != 0).any(-1)[:, None, :, None].to(q.dtype)  # [B, 1, L, 1] planted queries
    cols = (bias != 0).any(-2)[:, None, :, None].to(q.dtype)  # [B, 1, L, 1] planted keys
    key = (k * cols).sum(2, keepdim=True) / cols.sum(2, keepdim=True).clamp(min=1)  # [B, H, 1, D]
    direction = key / (key * key).sum(-1, keepdim=True).clamp(min=1e-12)
    q = q + rows * beta * q.shape[-1] ** 0.5 * direction
    if not call["skip_reshape"]:  # back to [B, L, H * D]
        q = q.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        k = call["k"]
    return q, k


def plant(model, region, token_columns, beta=8.0, branches=(0,), mode="bias", noise=0.0, noise_seed=0):
    """A clone of `model` (a DiT ModelPatcher) that adds `beta` to the logits between the image
    tokens where `region` ([h/2, w/2] bool, the token grid (Flux.2: [h, w]); or per batch row) is
    True and the prompt tokens `token_columns` (positions in the conditioning), in the batch rows
    of the conds listed in `branches` (0 = positive, 1 = negative; `cond_or_uncond` values).
    mode "bias": through the attention-mask argument; "qk": by editing q and k (_planted_qk);
    "q": by moving the region's queries along the word's key (_planted_q).
    noise > 0 adds, through the mask, a fixed random logit (std `noise`, seeded by `noise_seed`)
    to every (image token, text token) pair of those rows: per-token attention as noisy as a real
    model's, which averaging many tokens smooths and a single token's map keeps."""
    import comfy.patcher_extension

    families = pack_module("attention.families")
    columns = list(token_columns)
    diffusion_model = model.model.diffusion_model
    family = families.family_of(model)

    def layout(x, context, kw):  # the family's (Flux.2: left-padded text; HunyuanImage: text may follow the image)
        return (family.layout(x, context, diffusion_model, kw) if family is not None
                else families.layout_of(x, context, diffusion_model))  # a refused model: the base layout

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        whole = layout(x, c_crossattn, kw)
        # each batch row's first prompt token (Flux.2 left-pads each prompt to 512 by its own length)
        starts = [whole.text_start + layout(x[r:r + 1], c_crossattn[r:r + 1], kw).prompt_start
                  for r in range(x.shape[0])]
        chunks = transformer_options.get("cond_or_uncond") or [0]
        per_chunk = x.shape[0] // len(chunks)
        planted_rows = torch.tensor([kind in branches for kind in chunks for _ in range(per_chunk)])
        grid = region if region.ndim == 3 else region.expand(per_chunk, *region.shape)
        grid = grid.repeat(len(chunks), 1, 1)  # batch row b of each chunk gets region[b]

        def bias_of(length, key_length, batch, dtype, device):
            if length < whole.n_txt + whole.n_img or batch != x.shape[0]:
                return None  # image-only attention (SD3.5's extra self-attention)
            # keys may outnumber queries (the core FluxKVCache node appends cached reference keys)
            bias = torch.zeros(batch, 1, length, key_length, dtype=dtype, device=device)
            values = (grid.reshape(batch, -1).to(dtype) * beta * planted_rows[:, None].to(dtype)).to(device)
            for column in columns:
                for row, start in enumerate(starts):
                    bias[row, 0, whole.image_rows, start + column] = values[row]
            if not noise:
                return bias, None
            pattern = torch.randn(per_chunk, whole.n_img, whole.n_txt,
                                  generator=torch.Generator().manual_seed(noise_seed)) * noise
            noisy = torch.zeros_like(bias)
            text = whole.text_start
            noisy[:, 0, whole.image_rows, text:text + whole.n_txt] = (pattern.repeat(len(chunks), 1, 1).to(dtype) *
                                                   planted_rows[:, None, None].to(dtype)).to(device)
            return bias, noisy

        options = dict(transformer_options)
        options["optimized_attention_override"] = _PlantingOverride(
            bias_of, transformer_options.get("optimized_attention_override"), mode)
        return executor(x, t, c_concat, c_crossattn, control, options, **kw)

    planted = model.clone()
    planted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    return planted


def region_mask(grid, rows, cols, batch=None):
    """A [h, w] (or [batch, h, w]) bool token grid, True on rows x cols (slices)."""
    region = torch.zeros(grid, dtype=torch.bool)
    region[rows, cols] = True
    return region if batch is None else region.expand(batch, *grid).clone()


def iou(found, expected):
    found, expected = found.bool(), expected.bool()
    return float((found & expected).sum() / (found | expected).sum().clamp(min=1))
