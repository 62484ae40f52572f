"""Draw a short text label onto IMAGE tensors (Pillow only, no ComfyUI import)."""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def draw_label(images, text):
    """images [B, H, W, 3] in 0..1 -> the same with `text` on a dark band at the top-left."""
    out = []
    for image in images:
        pil = Image.fromarray((image.cpu().numpy() * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        font = _font(max(10, pil.height // 16))
        left, top, right, bottom = draw.textbbox((4, 2), text, font=font)
        draw.rectangle((0, 0, right + 4, bottom + 4), fill=(0, 0, 0))
        draw.text((4, 2), text, fill=(255, 255, 255), font=font)
        out.append(torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0))
    return torch.stack(out).to(images.device)
