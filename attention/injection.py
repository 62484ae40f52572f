"""Prompt-to-Prompt attention injection for MAG-Edit's editing branch (attn1 / attn2 patches).

What the official MAG-Edit code does (HelenMao/MAG-Edit code_tr, P2P's `AttentionRefine`):
- cross-attention (attn2, every layer): in the editing branch, the map of every target token
  that the refinement alignment matches to a source token is the reconstruction branch's map of
  that source token; target tokens with no match (the new words) keep their own map. Applied for
  the steps i < int(cross_fraction * (steps + 1)) (P2P's alpha table has steps + 1 rows: 0.8 of
  50 steps -> steps 0..39). The reconstruction maps are constants (detached) for the gradient.
- self-attention (attn1, layers at resolution level >= 1: 32x32 and smaller at 512 px on SD1.x,
  the 64x64 layers untouched): the editing branch uses the reconstruction branch's attention
  probabilities, for the steps i < int(steps * self_fraction) (0.5 of 50 -> steps 0..24).
- only the conditional half of a CFG batch is edited; the unconditional halves and the
  reconstruction branch are left as they are.

The patches serve three kinds of UNet call, chosen by `InjectionController.mode`:
- "joint": one call with x = [x_rec, x_edit] and a cond batched the same way ([source; target]),
  as the regular CFG step runs it. In every cond chunk (cond_or_uncond entry 0, chunks in any
  order) the first half of the rows is the reconstruction branch, the second half the editing
  branch; the editing rows get the reconstruction rows' maps of the same call.
- "record": a cond-only reconstruction pass (no gradient) that keeps what the editing pass needs:
  the per-head cross-attention probabilities of every layer and the self-attention queries/keys
  of the replaced layers. MAG-Edit's reconstruction latent does not change during a step's
  optimisation iterations, so one such pass serves all of them (the official code repeats it
  every iteration, with identical results).
- "edit": a cond-only editing pass with autograd, reading the recorded reconstruction; the
  post-injection maps of the loss layers are captured and, after the last of them, the forward is
  ended by raising `StopForward`: nothing after that layer (the decoder's higher-resolution
  blocks) runs or keeps activations.

Probabilities are computed explicitly, softmax(QK^T / sqrt(d)) per head in float32, then applied
to V. A replaced self-attention P_rec V_edit is computed as attention(q_rec, k_rec, v_edit) with
ComfyUI's own attention function (memory-efficient kernels included), which equals it exactly in
real arithmetic without materialising P_rec. With an inner replace patch on a cross-attention
layer (IPAdapter, ...) the editing rows keep the inner output plus the change the injection makes,
inner(q, k, v) + (P_injected - P_own) V; a replaced self-attention uses the reconstruction's
attention alone, as the official code does.
"""
from dataclasses import dataclass

import numpy as np
import torch

from .layers import ReplacePatch, comfy_attention, install_replace, unet_attention_layers
from .recorder import head_probs

MODES = ("off", "joint", "record", "edit")
COND = 0  # cond_or_uncond entry of the conditional chunk
_SPECIAL = ("<start>", "<end>", "<pad>")


class StopForward(Exception):
    """Raised by the last loss layer's patch in an "edit" pass; the caller catches it."""


# --------------------------------------------------------------------------------------------
# Token alignment (P2P seq_aligner.get_refinement_mapper)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenAlignment:
    """Which source token each target token position takes its cross-attention map from.

    mapper[j] is the source position of target position j, -1 where target token j is new.
    Positions after the target's end token map to the same position (P2P's mapper), so they
    take the source's map there.
    """

    mapper: tuple
    n_tokens: int
    target_len: int  # start + content + end tokens of the target
    shared_positions: tuple  # target content positions that take a source map

    @property
    def aligned(self):
        return tuple(m >= 0 for m in self.mapper)

    def tensors(self, device):
        mapper = torch.tensor(self.mapper, dtype=torch.long, device=device)
        return mapper.clamp(min=0), mapper >= 0


class _Unique:
    """A token that equals no other (textual-inversion embeddings: same string, unknown vectors)."""


def _sequence(tokens):
    end = tokens.end_positions[0] if tokens.end_positions else tokens.n_tokens - 1
    return [_Unique() if s == "<embedding>" else s for s in tokens.token_strings[:end + 1]]


def _global_align(x, y):
    """P2P's global_align (gap 0, match 1, mismatch -1) and its traceback codes and tie order."""
    score = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int64)
    trace = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int64)
    trace[0, 1:] = 1
    trace[1:, 0] = 2
    trace[0, 0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = score[i, j - 1]
            up = score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            trace[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    return trace


def _y_to_x(x, y, trace):
    """P2P's get_aligned_sequences: for each y position in order, its x position or -1."""
    i, j, pairs = len(x), len(y), []
    while i > 0 or j > 0:
        code = trace[i, j]
        if code == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif code == 1:
            j -= 1
            pairs.append((j, -1))
        elif code == 2:
            i -= 1
        else:
            break
    return [x_pos for _, x_pos in reversed(pairs)]


def align_prompts(source, target):
    """P2P refinement alignment of two PromptTokens (one 77-token chunk each)."""
    n_tokens = target.n_tokens
    if source.n_tokens != n_tokens:
        raise ValueError(f"the source and target prompts have {source.n_tokens} and {n_tokens} token "
                         "positions; encode both with the same CLIP")
    x, y = _sequence(source), _sequence(target)
    mapper = _y_to_x(x, y, _global_align(x, y))
    mapper += list(range(len(y), n_tokens))
    content = sorted({p for word in target.words for p in word.positions})
    shared = tuple(p for p in content if mapper[p] >= 0)
    return TokenAlignment(mapper=tuple(mapper), n_tokens=n_tokens, target_len=len(y),
                          shared_positions=shared)


# --------------------------------------------------------------------------------------------
# Attention arithmetic
# --------------------------------------------------------------------------------------------

def apply_probs(probs, v, dtype):
    """probs [batch, heads, queries, keys] applied to v [batch, keys, heads * d] -> [batch, queries, heads * d]."""
    batch, heads, queries, keys = probs.shape
    vh = v.reshape(batch, keys, heads, -1).transpose(1, 2).float()
    out = torch.matmul(probs, vh)
    return out.transpose(1, 2).reshape(batch, queries, -1).to(dtype)


def _pair_rows(extra_options, batch, device):
    """(reconstruction rows, editing rows) of the cond chunks of a joint call."""
    chunks = extra_options.get("cond_or_uncond") or [COND]
    per_chunk = batch // len(chunks)
    if per_chunk % 2:
        raise RuntimeError("MAG-Edit's joint UNet call expects [reconstruction, editing] pairs in "
                           f"every chunk, got {per_chunk} rows per chunk")
    half = per_chunk // 2
    starts = [i * per_chunk for i, kind in enumerate(chunks) if kind == COND]
    if not starts:
        return None, None
    rec = torch.cat([torch.arange(s, s + half, device=device) for s in starts])
    return rec, rec + half


# --------------------------------------------------------------------------------------------
# Controller and patches
# --------------------------------------------------------------------------------------------

class InjectionController:
    """State shared by the injection patches of one MAG-Edit run; the sampler drives it.

    loss_layers: AttentionLayers whose post-injection editing maps the loss reads.
    self_min_level: self-attention is replaced on layers at this level and deeper.
    """

    def __init__(self, alignment, loss_layers, self_min_level=1):
        self.alignment = alignment
        self.loss_keys = {layer.key for layer in loss_layers}
        self.self_min_level = self_min_level
        self.last_loss_key = None
        self.cross_layers = []
        self.self_layers = []
        self.observer = None  # optional callable(event dict), for tests and debugging
        self._index = {}
        self.configure("off")
        self.stored = {}
        self.captured = []

    # ---- set-up ---------------------------------------------------------------------------
    def install(self, model_clone):
        """Patch a ModelPatcher clone (never the caller's model): attn2 on every transformer
        block, attn1 on those at self_min_level and deeper. Returns the clone."""
        order = unet_attention_layers(model_clone, cross_only=False)
        self.cross_layers = [layer for layer, block in order if getattr(block, "attn2", None) is not None]
        self.self_layers = [layer for layer, _ in order if layer.level >= self.self_min_level]
        loss_in_order = [layer for layer in self.cross_layers if layer.key in self.loss_keys]
        if len(loss_in_order) != len(self.loss_keys):
            raise ValueError("the loss layers are not cross-attention layers of this model")
        self.last_loss_key = loss_in_order[-1].key
        for layer in self.cross_layers:
            install_replace(model_clone, "attn2", layer,
                            lambda inner, layer=layer: CrossInjection(self, layer, inner))
        for layer in self.self_layers:
            install_replace(model_clone, "attn1", layer,
                            lambda inner, layer=layer: SelfInjection(self, layer, inner))
        return model_clone

    def configure(self, mode, step=None, cross=False, self_attention=False, capture=False, early_stop=True):
        """Set what the next UNet call(s) do. cross / self_attention: injection active now;
        capture: keep the editing branch's post-injection maps of the loss layers, as
        (layer, [batch, heads, queries, n_tokens]) pairs in `captured`, in execution order."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.step = step
        self.cross_active = bool(cross)
        self.self_active = bool(self_attention)
        self.capture = bool(capture)
        self.early_stop = bool(early_stop)
        if mode == "record":
            self.stored = {}
        self.captured = []

    def _tensors(self, device):
        if device not in self._index:
            self._index[device] = self.alignment.tensors(device)
        return self._index[device]

    # ---- token arithmetic -----------------------------------------------------------------
    def _split_tokens(self, probs):
        """[..., keys] -> [..., repeats, n_tokens]: ComfyUI tiles a shorter context to the
        longest one of a batched call, each repeat holding a share of a token's probability."""
        n = self.alignment.n_tokens
        keys = probs.shape[-1]
        if keys % n:
            raise RuntimeError(f"cross-attention has {keys} keys, not a multiple of the prompt's {n} tokens")
        return probs.reshape(*probs.shape[:-1], keys // n, n)

    def inject(self, rec, own):
        """Refine-mapper injection: aligned target tokens take the source maps, new ones keep theirs."""
        mapper, aligned = self._tensors(own.device)
        taken = self._split_tokens(rec.detach()).index_select(-1, mapper)
        return torch.where(aligned, taken, self._split_tokens(own)).reshape(own.shape)

    def token_maps(self, probs):
        """[..., keys] -> [..., n_tokens], repeats of a tiled context summed."""
        return self._split_tokens(probs).sum(-2)

    def notify(self, **event):
        if self.observer is not None:
            self.observer({"mode": self.mode, "step": self.step, **event})


class _Injection(ReplacePatch):
    def __init__(self, controller, layer, inner):
        super().__init__(inner)
        self.controller = controller
        self.layer = layer


class CrossInjection(_Injection):
    """attn2 patch: P2P refine injection into the editing branch; loss-map capture; early stop."""

    def __call__(self, q, k, v, extra_options):
        c = self.controller
        is_loss = self.layer.key in c.loss_keys
        if c.mode == "joint":
            return self._joint(q, k, v, extra_options, is_loss)
        if c.mode == "record":
            return self._record(q, k, v, extra_options, is_loss)
        if c.mode == "edit":
            return self._edit(q, k, v, extra_options, is_loss)
        return self.attend(q, k, v, extra_options)

    def _stop_here(self, is_loss):
        c = self.controller
        return is_loss and c.early_stop and self.layer.key == c.last_loss_key

    def _joint(self, q, k, v, extra_options, is_loss):
        c = self.controller
        capture = c.capture and is_loss
        out = self.attend(q, k, v, extra_options)
        if not (c.cross_active or capture):
            return out
        rec, edit = _pair_rows(extra_options, q.shape[0], q.device)
        if rec is None:
            return out
        heads = extra_options["n_heads"]
        p_rec = head_probs(q.index_select(0, rec), k.index_select(0, rec), heads)
        p_own = head_probs(q.index_select(0, edit), k.index_select(0, edit), heads)
        p_final = c.inject(p_rec, p_own) if c.cross_active else p_own
        if c.cross_active:
            v_edit = v.index_select(0, edit)
            if self.inner is None:
                new = apply_probs(p_final, v_edit, out.dtype)
            else:
                new = out.index_select(0, edit) + apply_probs(p_final - p_own, v_edit, out.dtype)
            out = out.index_copy(0, edit, new)
        if capture:
            c.captured.append((self.layer, c.token_maps(p_final)))
        c.notify(layer=self.layer, kind="cross", injected=c.cross_active, rec=p_rec, own=p_own,
                 final=p_final)
        return out

    def _record(self, q, k, v, extra_options, is_loss):
        c = self.controller
        if c.cross_active:
            c.stored[self.layer.key] = head_probs(q, k, extra_options["n_heads"]).detach()
        if self._stop_here(is_loss):
            raise StopForward()
        return self.attend(q, k, v, extra_options)

    def _edit(self, q, k, v, extra_options, is_loss):
        c = self.controller
        if not (c.cross_active or is_loss):
            return self.attend(q, k, v, extra_options)
        p_own = head_probs(q, k, extra_options["n_heads"])
        p_final = p_own
        if c.cross_active:
            p_rec = c.stored.get(self.layer.key)
            if p_rec is None or p_rec.shape != p_own.shape:
                raise RuntimeError(
                    "MAG-Edit: the editing pass does not match the recorded reconstruction pass at "
                    f"layer {self.layer.key} (area or masked conditioning is not supported)")
            p_final = c.inject(p_rec, p_own)
        if is_loss:
            c.captured.append((self.layer, c.token_maps(p_final)))
        c.notify(layer=self.layer, kind="cross", injected=c.cross_active, own=p_own, final=p_final)
        if self._stop_here(is_loss):
            raise StopForward()
        if not c.cross_active:
            return self.attend(q, k, v, extra_options)
        if self.inner is None:
            return apply_probs(p_final, v, q.dtype)
        return self.attend(q, k, v, extra_options) + apply_probs(p_final - p_own, v, q.dtype)


class SelfInjection(_Injection):
    """attn1 patch: the editing branch attends with the reconstruction's queries and keys."""

    def __call__(self, q, k, v, extra_options):
        c = self.controller
        if not c.self_active or c.mode == "off":
            return self.attend(q, k, v, extra_options)
        if c.mode == "joint":
            out = self.attend(q, k, v, extra_options)
            rec, edit = _pair_rows(extra_options, q.shape[0], q.device)
            if rec is None:
                return out
            new = comfy_attention(q.index_select(0, rec), k.index_select(0, rec), v.index_select(0, edit),
                                  extra_options)
            c.notify(layer=self.layer, kind="self", injected=True)
            return out.index_copy(0, edit, new.to(out.dtype))
        if c.mode == "record":
            c.stored[("self",) + self.layer.key] = (q.detach(), k.detach())
            return self.attend(q, k, v, extra_options)
        recorded = c.stored.get(("self",) + self.layer.key)
        if recorded is None or recorded[0].shape != q.shape:
            raise RuntimeError(
                "MAG-Edit: the editing pass does not match the recorded reconstruction pass at "
                f"layer {self.layer.key} (area or masked conditioning is not supported)")
        c.notify(layer=self.layer, kind="self", injected=True)
        return comfy_attention(recorded[0], recorded[1], v, extra_options)
