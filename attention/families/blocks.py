"""Which blocks to record: each family's default, and the `dit_blocks` input's syntax."""
import re

# Default: the double / joint blocks at 79-95 % of their depth. ConceptAttention (Helbling et al.,
# ICML 2025) finds Flux's sharpest text-image maps in its late double blocks and averages 15-18 of
# 19; the same relative depth is used for SD3 (24 blocks: 19-22; SD3.5 Large 38: 30-36) and
# Qwen-Image (60: 47-57), whose blocks are all joint. The last blocks are left out: SD3's last
# block has no text output and late text tokens serve the image's final detail, not its layout.
DEFAULT_SPAN = (0.79, 0.95)


def default_blocks(family, diffusion_model):
    depth = family.depth(diffusion_model, "double")
    first = min(depth - 1, round(DEFAULT_SPAN[0] * depth))
    last = max(first, min(depth - 1, int(DEFAULT_SPAN[1] * depth)))
    return [("double_block", i) for i in range(first, last + 1)]


_ITEM = re.compile(r"^(?:(double|joint|single)\s*)?(all|\d+(?:\s*-\s*\d+)?)$")


def parse_blocks(spec, family, diffusion_model, input_name="dit_blocks"):
    """'' -> the family default; else comma-separated items such as '15-18', 'double 3',
    'single 0-9', 'all', 'single all' ('joint' = 'double'; a bare range means double blocks).
    input_name: the node input the spec came from, for errors."""
    if not spec.strip():
        return default_blocks(family, diffusion_model)
    chosen = []
    for item in (part.strip().lower() for part in spec.split(",")):
        match = _ITEM.match(item)
        if not match:
            raise ValueError(f"{input_name}: cannot read {item!r}; write e.g. '15-18', 'double 3', "
                             "'single 0-9' or 'all', comma-separated (empty for the default)")
        kind = "single" if match.group(1) == "single" else "double"
        depth = family.depth(diffusion_model, kind)
        if not depth:
            raise ValueError(f"{input_name}: {family.name} has no single blocks; it has "
                             f"{family.depth(diffusion_model, 'double')} joint blocks (0-"
                             f"{family.depth(diffusion_model, 'double') - 1})")
        if match.group(2) == "all":
            indices = range(depth)
        else:
            bounds = [int(b) for b in match.group(2).replace(" ", "").split("-")]
            indices = range(bounds[0], bounds[-1] + 1)
            if bounds[0] > bounds[-1]:
                raise ValueError(f"{input_name}: {item!r} runs backwards; write the lower block first "
                                 f"('{bounds[-1]}-{bounds[0]}')")
            if bounds[-1] >= depth:
                raise ValueError(f"{input_name}: {item!r} is outside {family.name}'s {kind} blocks 0-{depth - 1}")
        chosen.extend((f"{kind}_block", i) for i in indices if (f"{kind}_block", i) not in chosen)
    return chosen
