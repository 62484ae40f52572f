"""FoI equations (Eq. 2, Eq. 3-7, Eq. 8, Eq. 9) against straightforward loop computations."""
import math

import pytest
import torch

from ae_testlib.pack import pack_module

foi = pack_module("masks.foi")
filters = pack_module("masks.filters")
mod = pack_module("attention.foi_modulation")

D64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ loop references

def ref_smooth(m, kernel_size=3, sigma=0.5, ae_compat=True):
    """One map [h, w] (list-of-lists semantics), reflect padding, explicit kernel formula."""
    h, w = m.shape
    r = (kernel_size - 1) // 2
    c = (kernel_size - 1) / 2
    if ae_compat:
        g = [math.exp(-(((i - c) / (2 * sigma)) ** 2)) for i in range(kernel_size)]
    else:
        g = [math.exp(-((i - c) ** 2) / (2 * sigma ** 2)) for i in range(kernel_size)]
    k2 = [[g[a] * g[b] for b in range(kernel_size)] for a in range(kernel_size)]
    total = sum(sum(row) for row in k2)

    def refl(i, n):
        if i < 0:
            return -i
        if i >= n:
            return 2 * n - 2 - i
        return i

    out = torch.zeros(h, w, dtype=D64)
    for y in range(h):
        for x in range(w):
            s = 0.0
            for a in range(kernel_size):
                for b in range(kernel_size):
                    s += k2[a][b] / total * float(m[refl(y + a - r, h), refl(x + b - r, w)])
            out[y, x] = s
    return out


def ref_sharpen(m, gamma):
    """Eq. 2 on one map: gamma times (square every value, then min-max over the map)."""
    vals = [[float(v) for v in row] for row in m]
    for _ in range(gamma):
        vals = [[v * v for v in row] for row in vals]
        lo = min(min(row) for row in vals)
        hi = max(max(row) for row in vals)
        vals = [[(v - lo) / (hi - lo) if hi > lo else 0.0 for v in row] for row in vals]
    return torch.tensor(vals, dtype=D64)


def ref_probs_and_out(q_i, k_i, v_i, q_n, k_n, M, alpha, xi_t, heads):
    """Eq. 3-6 with explicit loops over batch, head, query pixel and token."""
    B, Nq, HD = q_i.shape
    N = k_i.shape[1]
    d = HD // heads
    probs = torch.zeros(B, heads, Nq, N, dtype=D64)
    out = torch.zeros(B, Nq, HD, dtype=D64)
    for b in range(B):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            for p in range(Nq):
                X = [float((q_i[b, p, sl] * k_i[b, n, sl]).sum()) for n in range(N)]
                Y = [float((q_n[b, p, sl] * k_n[b, n, sl]).sum()) for n in range(N)]
                mx = max(X)
                s = []
                for n in range(N):
                    m = float(M[b, p, n])
                    dx = float(alpha[n]) * xi_t * (mx - X[n])
                    s.append(((X[n] + dx) * m + Y[n] * (1 - m)) / math.sqrt(d))
                top = max(s)
                e = [math.exp(v - top) for v in s]
                z = sum(e)
                for n in range(N):
                    probs[b, h, p, n] = e[n] / z
                    out[b, p, sl] += e[n] / z * v_i[b, n, sl]
    return probs, out


def rand_qkv(B=2, Nq=6, N=5, heads=2, d=3, seed=0):
    g = gen(seed)
    shape_q, shape_k = (B, Nq, heads * d), (B, N, heads * d)
    return (torch.randn(shape_q, generator=g, dtype=D64) * 2,
            torch.randn(shape_k, generator=g, dtype=D64) * 2,
            torch.randn(shape_k, generator=g, dtype=D64),
            torch.randn(shape_q, generator=g, dtype=D64) * 2,
            torch.randn(shape_k, generator=g, dtype=D64) * 2)


# ------------------------------------------------------------------ Sec. 4.1 / Eq. 2

@pytest.mark.parametrize("ae_compat", [True, False])
def test_gaussian_smooth_matches_loop(ae_compat):
    maps = torch.rand(2, 3, 4, 5, generator=gen(1), dtype=D64)
    got = foi.gaussian_smooth(maps, 3, 0.5, ae_compat=ae_compat)
    for b in range(2):
        for k in range(3):
            torch.testing.assert_close(got[b, k], ref_smooth(maps[b, k], 3, 0.5, ae_compat))
    # A&E kernel for (3, 0.5): exp(-1) side weights, i.e. a Gaussian of std 0.5 * sqrt(2)
    k1 = filters.gaussian_kernel_1d(3, 0.5, ae_compat=True, dtype=D64)
    e = math.exp(-1)
    torch.testing.assert_close(k1, torch.tensor([e, 1, e], dtype=D64) / (1 + 2 * e))


def test_gaussian_smooth_keeps_constant_and_shape():
    maps = torch.full((1, 2, 7, 3), 0.25)
    torch.testing.assert_close(foi.gaussian_smooth(maps), maps)
    one = torch.rand(1, 1, 1, 1)
    assert foi.gaussian_smooth(one).shape == one.shape  # too small to reflect: replicate


@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_sharpen_eq2_matches_loop(gamma):
    maps = torch.rand(2, 2, 3, 5, generator=gen(2), dtype=D64)
    got = foi.sharpen(maps, gamma)
    for b in range(2):
        for k in range(2):
            torch.testing.assert_close(got[b, k], ref_sharpen(maps[b, k], gamma))
    flat = got.flatten(-2)
    torch.testing.assert_close(flat.amin(-1), torch.zeros(2, 2, dtype=D64))
    torch.testing.assert_close(flat.amax(-1), torch.ones(2, 2, dtype=D64))


def test_constant_maps_no_nan():
    maps = torch.stack([torch.zeros(4, 6), torch.full((4, 6), 0.3)])[None]  # [1, 2, 4, 6]
    soft = foi.sharpen(maps, 3)
    assert torch.isfinite(soft).all() and (soft == 0).all()
    masks, soft = foi.keyword_masks(maps, tau=0.5)
    assert torch.isfinite(soft).all() and (masks == 0).all()


def test_keyword_masks_match_loop_batch2_nonsquare():
    maps = torch.rand(2, 2, 6, 4, generator=gen(3), dtype=D64)
    tau = 0.4
    masks, soft = foi.keyword_masks(maps, tau=tau, gamma=3)
    assert masks.shape == soft.shape == (2, 2, 6, 4)
    for b in range(2):
        for k in range(2):
            s = ref_sharpen(ref_smooth(maps[b, k]), 3)
            torch.testing.assert_close(soft[b, k], s)
            for y in range(6):
                for x in range(4):
                    assert masks[b, k, y, x] == (1.0 if s[y, x] >= tau else 0.0)
    # M = 1[A >= tau]: the peak (value exactly 1) is inside even for tau = 1
    top, _ = foi.keyword_masks(maps, tau=1.0)
    assert (top.flatten(-2).sum(-1) >= 1).all()


# ------------------------------------------------------------------ resizing, Eq. 8

def test_resize_mask_up_and_down():
    m = (torch.rand(2, 3, 4, 6, generator=gen(4)) > 0.5).float()
    up = foi.resize_mask(m, (8, 12))
    for y in range(8):
        for x in range(12):
            assert torch.equal(up[..., y, x], m[..., y // 2, x // 2])
    down = foi.resize_mask(m, (2, 3))
    for y in range(2):
        for x in range(3):
            frac = m[..., 2 * y:2 * y + 2, 2 * x:2 * x + 2].mean((-1, -2))
            assert torch.equal(down[..., y, x], (frac >= 0.5).float())
    assert foi.resize_mask(m, (4, 6)).equal(m)


def test_union_mask_eq8():
    km = (torch.rand(2, 3, 4, 2, generator=gen(5)) > 0.6).float()
    u = foi.union_mask(km, (16, 8))
    assert u.shape == (2, 1, 16, 8)
    for b in range(2):
        for y in range(16):
            for x in range(8):
                want = 1.0 if any(km[b, k, y // 4, x // 4] > 0 for k in range(3)) else 0.0
                assert u[b, 0, y, x] == want


# ------------------------------------------------------------------ M for Eq. 3-6

@pytest.mark.parametrize("outside", ["union", "ones", "zeros"])
def test_token_region_mask_matches_loop(outside):
    km = (torch.rand(2, 2, 2, 3, generator=gen(6)) > 0.5).float()
    km[0, 0] = 0  # an empty keyword mask
    spans = [(1, 2), [4, 6]]  # explicit positions, as attention/instructions.py gives them
    N, H, W = 8, 4, 6
    M = foi.token_region_mask(km, spans, N, (H, W), outside=outside)
    assert M.shape == (2, H * W, N)
    members = [set(range(1, 3)), {4, 6}]
    for b in range(2):
        for p in range(H * W):
            y, x = divmod(p, W)
            inside = [km[b, i, y // 2, x // 2] > 0 for i in range(2)]
            for n in range(N):
                owners = [i for i in range(2) if n in members[i]]
                if owners:
                    want = any(inside[i] for i in owners)
                else:
                    want = {"union": any(inside), "ones": True, "zeros": False}[outside]
                assert M[b, p, n] == float(want), (b, p, n)


def test_token_region_mask_rejects_bad_spans():
    km = torch.ones(1, 2, 2, 2)
    with pytest.raises(ValueError):
        foi.token_region_mask(km, [(0, 1)], 4, (2, 2))
    with pytest.raises(ValueError):
        foi.token_region_mask(km, [(0, 2), [9]], 4, (2, 2))


# ------------------------------------------------------------------ Eq. 7

def test_xi_eq7_and_t_normalisation():
    assert mod.xi(1.0) == pytest.approx(0.05)
    assert mod.xi(0.5) == pytest.approx(0.05 * 0.5 ** 4)
    assert mod.xi(0.0) == 0.0 and mod.xi(1.7) == pytest.approx(0.05) and mod.xi(-1) == 0.0
    torch.testing.assert_close(mod.xi(torch.tensor([0.8, 0.2], dtype=D64)),
                               torch.tensor([0.05 * 0.8 ** 4, 0.05 * 0.2 ** 4], dtype=D64))
    assert mod.t_from_timestep(999) == pytest.approx(1.0)
    assert mod.t_from_timestep(0) == 0.0
    assert mod.t_from_step(0, 80) == 1.0 and mod.t_from_step(40, 80) == pytest.approx(0.5)


# ------------------------------------------------------------------ Eq. 3-6

@pytest.mark.parametrize("layout", ["flat", "per_head"])
def test_modulation_eq3_6_matches_loop(layout):
    B, H, W, N, heads, d = 2, 2, 3, 5, 2, 3
    q_i, k_i, v_i, q_n, k_n = rand_qkv(B, H * W, N, heads, d, seed=7)
    M = (torch.rand(B, H * W, N, generator=gen(8)) > 0.4).to(D64)
    alpha = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=D64)
    xi_t = mod.xi(0.8)
    ref_p, ref_o = ref_probs_and_out(q_i, k_i, v_i, q_n, k_n, M, alpha, xi_t, heads)

    def heads_first(x):
        return x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

    args = (q_i, k_i, v_i, q_n, k_n)
    if layout == "per_head":
        args = tuple(heads_first(a) for a in args)
    qa, ka, va, qna, kna = args
    probs = mod.modulated_attention_probs(qa, ka, qna, kna, M, alpha, xi_t, heads)
    out = mod.modulated_attention(qa, ka, va, qna, kna, M, alpha, xi_t, heads)
    torch.testing.assert_close(probs, ref_p)
    if layout == "per_head":
        out = out.transpose(1, 2).reshape(B, H * W, heads * d)
    torch.testing.assert_close(out, ref_o)


def test_modulation_per_batch_xi_alpha_and_shared_mask():
    B, Nq, N, heads, d = 2, 4, 3, 2, 2
    q_i, k_i, v_i, q_n, k_n = rand_qkv(B, Nq, N, heads, d, seed=9)
    M2 = (torch.rand(Nq, N, generator=gen(10)) > 0.5).to(D64)
    alpha = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 4.0]], dtype=D64)
    xis = torch.tensor([0.05, 0.01], dtype=D64)
    got = mod.modulated_attention(q_i, k_i, v_i, q_n, k_n, M2, alpha, xis, heads)
    for b in range(B):
        _, ref_o = ref_probs_and_out(q_i[b:b + 1], k_i[b:b + 1], v_i[b:b + 1], q_n[b:b + 1],
                                     k_n[b:b + 1], M2[None], alpha[b], float(xis[b]), heads)
        torch.testing.assert_close(got[b:b + 1], ref_o)


def test_xi0_mask_ones_is_plain_attention():
    q_i, k_i, v_i, q_n, k_n = rand_qkv(2, 6, 5, 2, 4, seed=11)
    ones = torch.ones(6, 5, dtype=D64)
    out = mod.modulated_attention(q_i, k_i, v_i, q_n, k_n, ones, None, 0.0, heads=2)

    def split(x):
        return x.reshape(2, -1, 2, 4).transpose(1, 2)

    plain = torch.nn.functional.scaled_dot_product_attention(split(q_i), split(k_i), split(v_i))
    torch.testing.assert_close(out, plain.transpose(1, 2).reshape(2, 6, 8))


def test_mask_zeros_gives_null_branch_probs():
    q_i, k_i, _, q_n, k_n = rand_qkv(2, 6, 5, 2, 3, seed=12)
    zeros = torch.zeros(2, 6, 5, dtype=D64)
    probs = mod.modulated_attention_probs(q_i, k_i, q_n, k_n, zeros, torch.full((5,), 3.0, dtype=D64),
                                          0.05, heads=2)
    qn = q_n.reshape(2, 6, 2, 3).transpose(1, 2)
    kn = k_n.reshape(2, 5, 2, 3).transpose(1, 2)
    torch.testing.assert_close(probs, torch.softmax(qn @ kn.transpose(-1, -2) / math.sqrt(3), -1))


def test_alpha_applies_only_to_its_subinstruction_tokens():
    N = 9
    spans = [(1, 2, 3), [5, 6]]
    alpha = mod.token_alpha([1.0, 3.0], spans, N)
    want = [1.0] * N
    for n in (5, 6):
        want[n] = 3.0
    assert alpha.tolist() == want

    g = gen(13)
    X = torch.randn(2, 2, 6, N, generator=g, dtype=D64)
    Y = torch.randn(2, 2, 6, N, generator=g, dtype=D64)
    M = torch.ones(6, N, dtype=D64)
    base = mod.modulate_scores(X, Y, M, torch.ones(N, dtype=D64), 0.05)
    boosted = mod.modulate_scores(X, Y, M, alpha.to(D64), 0.05)
    diff = (boosted - base).abs().amax(dim=(0, 1, 2))
    for n in range(N):
        if n in (5, 6):
            assert diff[n] > 0
        else:
            assert diff[n] == 0
    # and alpha only acts where M = 1
    M0 = torch.zeros(6, N, dtype=D64)
    torch.testing.assert_close(mod.modulate_scores(X, Y, M0, alpha.to(D64), 0.05), Y)


def test_single_instruction_outside_region_uses_null_probs():
    """With the "union" token rule, a pixel outside every keyword region attends exactly like the
    null-instruction branch (Sec. 4.2: external regions take the null branch's attention)."""
    km = torch.zeros(1, 1, 2, 2)
    km[0, 0, 0, 0] = 1
    N, heads, d = 6, 2, 3
    M = foi.token_region_mask(km, [(1, 2, 3)], N, (2, 2))  # BOS 0, words 1-3, EOS/pad 4-5
    q_i, k_i, _, q_n, k_n = rand_qkv(1, 4, N, heads, d, seed=14)
    probs = mod.modulated_attention_probs(q_i, k_i, q_n, k_n, M, None, 0.0, heads)
    qi = q_i.reshape(1, 4, heads, d).transpose(1, 2)
    ki = k_i.reshape(1, N, heads, d).transpose(1, 2)
    qn = q_n.reshape(1, 4, heads, d).transpose(1, 2)
    kn = k_n.reshape(1, N, heads, d).transpose(1, 2)
    inst = torch.softmax(qi @ ki.transpose(-1, -2) / math.sqrt(d), -1)
    null = torch.softmax(qn @ kn.transpose(-1, -2) / math.sqrt(d), -1)
    torch.testing.assert_close(probs[:, :, 0], inst[:, :, 0])
    torch.testing.assert_close(probs[:, :, 1:], null[:, :, 1:])


def test_half_precision_inputs():
    q_i, k_i, v_i, q_n, k_n = (t.half() for t in rand_qkv(2, 16, 77, 2, 8, seed=15))
    M = (torch.rand(2, 16, 77, generator=gen(16)) > 0.5).half()
    out = mod.modulated_attention(q_i, k_i, v_i, q_n, k_n, M, None, 0.05, heads=2)
    assert out.dtype == torch.float16 and out.shape == (2, 16, 16) and torch.isfinite(out).all()


# ------------------------------------------------------------------ Eq. 9

def test_disentangled_guidance_eq9_matches_loop():
    g = gen(17)
    B, C, H, W = 2, 4, 3, 5
    e_full, e_img, e_none = (torch.randn(B, C, H, W, generator=g, dtype=D64) for _ in range(3))
    um = (torch.rand(B, 1, H, W, generator=g) > 0.5).to(D64)
    s_T, s_I = 7.5, 1.5
    got = foi.disentangled_guidance(e_full, e_img, e_none, s_T, s_I, um)
    plain = foi.disentangled_guidance(e_full, e_img, e_none, s_T, s_I, None)
    for b in range(B):
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    f, i, n = float(e_full[b, c, y, x]), float(e_img[b, c, y, x]), float(e_none[b, c, y, x])
                    m = float(um[b, 0, y, x])
                    assert float(got[b, c, y, x]) == pytest.approx(n + s_I * (i - n) + s_T * (f - i) * m)
                    assert float(plain[b, c, y, x]) == pytest.approx(n + s_I * (i - n) + s_T * (f - i))
    torch.testing.assert_close(foi.disentangled_guidance(e_full, e_img, e_none, s_T, s_I,
                                                         torch.ones_like(um)), plain)
    # weights sum to 1: the same combination of x0 = x - sigma * eps predictions is consistent
    x, sigma = torch.randn(B, C, H, W, generator=g, dtype=D64), 3.0
    x0 = foi.disentangled_guidance(x - sigma * e_full, x - sigma * e_img, x - sigma * e_none,
                                   s_T, s_I, um)
    torch.testing.assert_close(x0, x - sigma * got)
