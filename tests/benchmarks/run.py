"""Benchmarks: `python tests/benchmarks/run.py [--only NAME,...]`, NAME one of BENCHES.

Full-size SD1.5 UNets (dit_record and the *_dit ones: full-width DiT blocks) with random weights on
CPU, variants timed side by side in one run (interleaved repeats, medians). CPU times are noisy; the ratios are what count.
"""
import argparse
import importlib
import time

from common import host, setup

BENCHES = ("record", "instdiffedit", "foi", "magedit", "dit_record", "instdiffedit_dit", "foi_dit", "wan_record",
           "z_image_record", "flux2_record")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES))
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps-256", type=int, default=4)
    parser.add_argument("--steps-512", type=int, default=2)
    parser.add_argument("--dit-steps", type=int, default=1, help="dit_record: sampling steps per run")
    parser.add_argument("--dit-sizes", default="512,1024", help="dit_record: image sizes in px")
    parser.add_argument("--flux2-sizes", default="1024", help="flux2_record: image sizes in px")
    parser.add_argument("--foi-dit-size", type=int, default=512, help="foi_dit: image size in px")
    parser.add_argument("--foi-dit-steps", type=int, default=3, help="foi_dit: sampling steps per run")
    parser.add_argument("--wan-size", default="480x832x33", help="wan_record: HxWxFRAMES in pixels / decoded frames")
    parser.add_argument("--z-image-sizes", default="1024", help="z_image_record: image sizes in px")
    args = parser.parse_args()
    print(f"host: {setup()}")
    models = {}
    for name in args.only.split(","):
        name = name.strip()
        module = importlib.import_module(f"bench_{name}")
        if getattr(module, "OWN_MODEL", False):
            module.run(args)
            continue
        ip2p = getattr(module, "IP2P", False)
        if ip2p not in models:
            start = time.perf_counter()
            models[ip2p] = host.build_model("sd15", ip2p=ip2p, size="full")
            print(f"built full-size SD1.5{' IP2P' if ip2p else ''} UNet in {time.perf_counter() - start:.1f} s")
        module.run(args, models[ip2p])


if __name__ == "__main__":
    main()
