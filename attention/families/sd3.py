"""SD3 / SD3.5 (MMDiT): joint blocks on [registers | CLIP-L/G + T5 tokens | image tokens]; the
base Family's layout skips the learned register tokens (`register_length`)."""
from .base import Family

# exact class: AuraFlow's diffusion model is also called "MMDiT", in another module
CLASSES = {
    "comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper": Family("SD3", "joint_blocks", padded_prompt=True),  # parts to 77
}
