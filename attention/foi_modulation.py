"""FoI cross-condition attention modulation (Guo & Lin, CVPR 2024, Sec. 4.2, Eq. 3-7).

Pure torch, no ComfyUI import; a ComfyUI attn2 replace patch calls `modulated_attention` with the
projected q/k/v of the instruction branch eps(z, I, T) and q/k of the null-instruction branch
eps(z, I, 0_T) (same layer, same step, another chunk of the same batch):

    A'  = softmax(((X + dX) * M + Y * (1 - M)) / sqrt(d))                           (Eq. 3)
    X   = Q_{I,T} K_{I,T}^T                                                          (Eq. 4)
    Y   = Q_{I,0} K_{I,0}^T                                                          (Eq. 5)
    dX  = alpha * xi(t) * (max(X) - X)                                               (Eq. 6)
    xi(t) = 0.05 t^4, t in [0, 1]                                                    (Eq. 7)
    out = A' V_{I,T}

M is the [H*W, N] token-region mask from `masks.foi.token_region_mask`; alpha the per-token
strengths from `token_alpha`; d the per-head dimension (dim_head), as in standard attention.
"""
import torch

from ..masks.foi import token_indices


# --------------------------------------------------------------------------------------------
# Eq. 7 and the normalisation of t
# --------------------------------------------------------------------------------------------

def xi(t_norm, scale=0.05, power=4):
    """Eq. 7: xi(t) = 0.05 t^4 with t normalised to [0, 1], 1 = pure noise (start of sampling).

    The paper only says "the timestep t in [0, 1] has been normalized". t is the diffusion
    timestep of its Sec. 3 (t in T, the training timesteps), so the recommended input is
    `t_from_timestep` (in ComfyUI: model_sampling.timestep(sigma)); `t_from_step` is the
    step-fraction alternative. With FoI's 80 % start the timestep form begins near t = 0.8
    (xi ~ 0.02) and decays to ~0. Accepts a float or a tensor (clamped to [0, 1]).
    """
    if torch.is_tensor(t_norm):
        return scale * t_norm.clamp(0.0, 1.0) ** power
    return scale * min(max(float(t_norm), 0.0), 1.0) ** power


def t_from_timestep(timestep, num_train_timesteps=1000):
    """Diffusion timestep in [0, num_train_timesteps - 1] -> t in [0, 1] (999 -> 1.0)."""
    return timestep / (num_train_timesteps - 1)


def t_from_step(step_index, total_steps):
    """Sampling step index (0 = first, noisiest) -> t = 1 - step_index / total_steps in (0, 1]."""
    return 1.0 - step_index / total_steps


# --------------------------------------------------------------------------------------------
# alpha: per sub-instruction strengths broadcast to tokens (Eq. 6)
# --------------------------------------------------------------------------------------------

def token_alpha(sub_alphas, subinstruction_token_spans, n_tokens, default=1.0, dtype=torch.float32,
                device=None):
    """Per-sub-instruction strengths -> per-token alpha [N] for Eq. 6.

    Token n of sub-instruction i gets sub_alphas[i] (the paper's alpha, "initially set to all
    ones"); tokens outside every sub-instruction get `default` (1.0, so the default all-ones alpha
    is the paper's plain Eq. 6 whatever the token bookkeeping). A token in several spans takes the
    last span's value.
    """
    if len(sub_alphas) != len(subinstruction_token_spans):
        raise ValueError("one alpha per sub-instruction is needed")
    alpha = torch.full((n_tokens,), float(default), dtype=dtype, device=device)
    for a, span in zip(sub_alphas, subinstruction_token_spans):
        alpha[token_indices(span, n_tokens)] = float(a)
    return alpha


# --------------------------------------------------------------------------------------------
# Eq. 3-6
# --------------------------------------------------------------------------------------------

def modulate_scores(X, Y, M, alpha=None, xi_t=0.0):
    """Numerator of Eq. 3 (before the 1/sqrt(d)): (X + dX) * M + Y * (1 - M).

    X, Y: raw scores [..., Nq, N]; M broadcastable to them (1 = keep instruction scores);
    alpha broadcastable over the token axis (None = ones); xi_t a float or broadcastable tensor.
    Eq. 6's max(X) is taken per query row over the token axis (and per head, per batch item):
    dX pulls each masked score toward its row's largest score, so (max(X) - X) >= 0 and dX only
    ever raises scores inside the mask ("subtly enhance attention values within the mask").
    """
    dX = (X.amax(dim=-1, keepdim=True) - X) * xi_t
    if alpha is not None:
        dX = dX * alpha
    return (X + dX) * M + Y * (1 - M)


def _split_heads(x, heads):
    """[B, L, heads*d] -> [B, heads, L, d]; a 4-D [B, heads, L, d] input is returned as is."""
    if x.ndim == 4:
        return x
    b, length, hd = x.shape
    return x.reshape(b, length, heads, hd // heads).transpose(1, 2)


def _per_batch(value, ndim_tail):
    """float / 0-d / [B] / [B, ...] tensor -> broadcastable against [B, heads, Nq, N]."""
    if not torch.is_tensor(value) or value.ndim == 0:
        return value
    return value.reshape(value.shape[0], *([1] * ndim_tail)) if value.ndim == 1 else value


def modulated_attention_probs(q_inst, k_inst, q_null, k_null, region_mask, alpha_per_token=None,
                              xi_t=0.0, heads=1):
    """Eq. 3: the modulated attention probabilities A' of the instruction branch.

    q_*: [B, Nq, heads*d] (ComfyUI's projected layout) or [B, heads, Nq, d]; k_*: [B, N, heads*d]
    or [B, heads, N, d]. region_mask: [Nq, N] or [B, Nq, N] (shared by all heads).
    alpha_per_token: None, [N] or [B, N]. xi_t: float, 0-d or [B] tensor.
    Scores are computed in float32 at least (float64 stays float64); returns [B, heads, Nq, N].
    """
    qi, ki = _split_heads(q_inst, heads), _split_heads(k_inst, heads)
    qn, kn = _split_heads(q_null, heads), _split_heads(k_null, heads)
    if qi.shape != qn.shape or ki.shape != kn.shape:
        raise ValueError("instruction and null branches must have the same q/k shapes")
    work = torch.promote_types(qi.dtype, torch.float32)
    d = qi.shape[-1]
    X = qi.to(work) @ ki.to(work).transpose(-1, -2)  # Eq. 4
    Y = qn.to(work) @ kn.to(work).transpose(-1, -2)  # Eq. 5

    M = region_mask.to(device=X.device, dtype=work)
    M = M[None, None] if M.ndim == 2 else M[:, None]  # -> [B or 1, 1, Nq, N]
    alpha = alpha_per_token
    if alpha is not None:
        alpha = alpha.to(device=X.device, dtype=work)
        alpha = alpha.reshape(1, 1, 1, -1) if alpha.ndim == 1 else alpha.reshape(alpha.shape[0], 1, 1, -1)
    xi_b = _per_batch(xi_t, 3)
    if torch.is_tensor(xi_b):
        xi_b = xi_b.to(device=X.device, dtype=work)

    mixed = modulate_scores(X, Y, M, alpha, xi_b)  # Eq. 3-6
    return torch.softmax(mixed / d ** 0.5, dim=-1)  # 1/sqrt(d) after mixing, as in Eq. 3


def modulated_attention(q_inst, k_inst, v_inst, q_null, k_null, region_mask, alpha_per_token=None,
                        xi_t=0.0, heads=1):
    """Attention output of the instruction branch with FoI modulation: A' V_{I,T}.

    Same arguments as `modulated_attention_probs` plus v_inst ([B, N, heads*d] or
    [B, heads, N, d]). Returns the layout of q_inst: [B, Nq, heads*d] (what a ComfyUI attn2
    replace patch returns) or [B, heads, Nq, d].
    """
    probs = modulated_attention_probs(q_inst, k_inst, q_null, k_null, region_mask, alpha_per_token,
                                      xi_t, heads)
    v = _split_heads(v_inst, heads)
    out = (probs @ v.to(probs.dtype)).to(v_inst.dtype)  # [B, heads, Nq, d]
    if q_inst.ndim == 4:
        return out
    b, h, nq, dv = out.shape
    return out.transpose(1, 2).reshape(b, nq, h * dv)
