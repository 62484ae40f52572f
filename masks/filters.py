"""Shared smoothing and normalisation of attention maps (pure torch, any device)."""
import torch
import torch.nn.functional as F


def gaussian_kernel_1d(kernel_size=3, sigma=0.5, ae_compat=True, dtype=torch.float32, device=None):
    """Normalised 1-D Gaussian weights of length `kernel_size`.

    FoI cites Attend-and-Excite [9] for the filter. A&E's `GaussianSmoothing` (kernel 3, sigma 0.5)
    uses exp(-((x - mean) / (2 sigma))^2), i.e. a true Gaussian of std sigma * sqrt(2); with
    ae_compat=True we reproduce that kernel ([0.212, 0.576, 0.212] for 3 / 0.5). ae_compat=False
    gives the textbook exp(-(x - mean)^2 / (2 sigma^2)).
    """
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    if ae_compat:
        w = torch.exp(-((x / (2 * sigma)) ** 2))
    else:
        w = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (w / w.sum()).to(dtype=dtype, device=device)


def gaussian_smooth(maps, kernel_size=3, sigma=0.5, ae_compat=True):
    """Gaussian filter over the last two dims of `maps` [..., h, w] (Sec. 4.1, as in A&E [9]).

    Padding: reflect (what A&E does: F.pad(..., (1, 1, 1, 1), mode="reflect")), so border pixels are
    not darkened; replicate where a map is too small to reflect. The 2-D kernel is the outer
    product of the normalised 1-D kernel (A&E builds it the same way). kernel_size <= 1 or
    sigma <= 0 returns the maps unchanged.
    """
    if kernel_size <= 1 or sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    work_dtype = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    x = maps.reshape(-1, 1, h, w).to(work_dtype)
    k1 = gaussian_kernel_1d(kernel_size, sigma, ae_compat, dtype=work_dtype, device=maps.device)
    kernel = (k1[:, None] * k1[None, :])[None, None]
    lo = (kernel_size - 1) // 2
    hi = kernel_size - 1 - lo
    mode = "reflect" if min(h, w) > max(lo, hi) else "replicate"
    x = F.conv2d(F.pad(x, (lo, hi, lo, hi), mode=mode), kernel)
    return x.reshape(maps.shape).to(maps.dtype)


def minmax_normalize(maps, eps=1e-12):
    """Min-max to [0, 1] per map over the last two dims. A constant map (max - min <= eps) maps to
    all zeros (no NaN): it carries no localisation, so it yields an empty mask for any tau > 0."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    rng = flat.amax(-1, keepdim=True) - lo
    out = torch.where(rng > eps, (flat - lo) / rng.clamp_min(eps), torch.zeros_like(flat))
    return out.reshape(maps.shape)
