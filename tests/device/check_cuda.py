"""Device check: the pack's pure-tensor code gives the CPU's results on an accelerator.

Usage: python tests/device/check_cuda.py [DEVICE]      (DEVICE defaults to cuda)

Not part of `python -m pytest tests`: the CI machines have no GPU, and the suite never skips for
a missing device. Run it on a machine with one (any venv with torch, numpy, pillow, safetensors
and pytest). Checks, on the bundled golden subset and seeded random inputs:
- InstDiffEdit's mask chain (exact and float variants, both parameter sets): mask, position,
  index, word maps and refined map bit-exact to the CPU's, blurred map within 1e-6;
- MAG-Edit's token- and spatial-ratio losses and their gradient (float64): within 1e-12 relative.
Prints one line per check and exits 1 on a mismatch, 2 when the device is not available.
"""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ae_testlib.pack import register_pack  # noqa: E402

register_pack()
import test_instdiffedit_mask as idem  # noqa: E402  (reuses the suite's golden-case helpers)
import test_magedit_losses as mel  # noqa: E402


def check_instdiffedit(device):
    failures = []
    for case in idem.SUBSET_CASES:
        attn = torch.from_numpy(idem.golden_arrays(case)["attn"])
        for param_set in idem.PARAM_SETS:
            for exact in (True, False):
                cpu = idem.run_case(case, attn, param_set, exact=exact)
                dev = idem.run_case(case, attn.to(device), param_set, exact=exact)
                for field in ("mask", "position", "index", "word_maps", "refined"):
                    if not torch.equal(getattr(dev, field).cpu(), getattr(cpu, field)):
                        failures.append(f"{case['file']} {param_set} exact={exact}: {field} differs")
                blur_err = (dev.blurred.cpu() - cpu.blurred).abs().max().item()
                if blur_err > 1e-6:
                    failures.append(f"{case['file']} {param_set} exact={exact}: blurred err {blur_err:.3g}")
    return failures


def check_magedit(device):
    failures = []
    for seed in range(4):
        for kind in mel.losses.LOSS_KINDS:
            layers, mask = mel.random_inputs(seed)
            words = [[2], [4, 6]]
            on_cpu = [layer.clone().requires_grad_(True) for layer in layers]
            on_dev = [layer.to(device).requires_grad_(True) for layer in layers]
            cpu = mel.losses.combined_loss(kind, on_cpu, mask, words)
            dev = mel.losses.combined_loss(kind, on_dev, mask.to(device), words)
            if dev.device.type != torch.device(device).type:
                failures.append(f"seed {seed} {kind}: loss computed on {dev.device}")
            cpu.backward()
            dev.backward()
            rel = abs(dev.item() - cpu.item()) / max(abs(cpu.item()), 1e-30)
            grad = max((d.grad.cpu() - c.grad).abs().max().item() / c.grad.abs().max().clamp(min=1e-30).item()
                       for d, c in zip(on_dev, on_cpu))
            if rel > 1e-12 or grad > 1e-12:
                failures.append(f"seed {seed} {kind}: loss rel err {rel:.3g}, grad rel err {grad:.3g}")
    return failures


def main(device):
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as error:
        print(f"device {device!r} is not available here: {error}")
        return 2
    ok = True
    for name, check in (("instdiffedit mask chain", check_instdiffedit), ("magedit losses", check_magedit)):
        failures = check(device)
        ok &= not failures
        print(f"{name} on {device}: " + ("PASS" if not failures else "FAIL\n  " + "\n  ".join(failures)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
