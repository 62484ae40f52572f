"""FoI nodes: Instruction Text Encode (+ its Qwen-Image-Edit form), FoI Sampler, FoI Guider, and
their DiT forms for Flux Kontext, Flux.2 and Qwen-Image-Edit."""
import torch

from ..attention.instructions import annotate_instructions, instructions_from_tokens, parse_instructions
from ..attention.instructions import encoded_text, split_instructions
from ..attention.tokens import tokens_of
from ..masks.label import draw_label
from ..masks.foi import DIT_MASK_UPSAMPLE, resize_mask, token_masks_to_latent
from ..samplers.foi import START_MODES, FoIConfig, foi_guider, parse_alphas, sample_foi
from ..samplers.foi_dit import NO_IMAGE_KEY, FoIDiTConfig, foi_dit_guider, sample_foi_dit
from .common import CATEGORY, LATENT_TO_IMAGE
from .encode import AttentionTextEncodeQwenImageEdit, AttentionTextEncodeQwenImageEditPlus, encode

FOI_CATEGORY = f"{CATEGORY}/foi"


class InstructionTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "default": "put a *hat* on the dog; make the *sky* a sunset", "tooltip":
                                "The edit instruction: sub-instructions separated by ';' or new lines, "
                                "each with ONE keyword between asterisks (the object it edits or adds). "
                                "The asterisks are removed; the rest is encoded as one prompt."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("instruction", "null_instruction")
    FUNCTION = "run"
    CATEGORY = FOI_CATEGORY
    DESCRIPTION = ("Encodes an edit instruction made of sub-instructions with marked keywords, "
                   "e.g. 'put a *hat* on the dog; make the *sky* a sunset', as ONE prompt and records "
                   "each sub-instruction's tokens and keyword for FoI. null_instruction is the empty "
                   "prompt. InstructPix2Pix: connect both to InstructPixToPixConditioning. Flux Kontext "
                   "(T5 text encoder): connect both to ReferenceLatent (then FluxGuidance).")

    def run(self, clip, text):
        instructions = parse_instructions(clip, text)
        positive = annotate_instructions(encode(clip, instructions.text), instructions)
        return (positive, encode(clip, ""))


def _foi_inputs():
    return {
        "text_cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip":
                     "s_T: how strongly the instruction is followed (inside its mask while disentangling)."}),
        "image_cfg": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 100.0, "step": 0.05, "round": 0.01, "tooltip":
                      "s_I: how strongly the source image is kept."}),
        "gamma": ("INT", {"default": 3, "min": 0, "max": 10, "tooltip":
                  "Rounds of 'square, then min-max normalise' that sharpen each keyword map (Eq. 2)."}),
        "tau": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                "Mask threshold on the sharpened map (the paper samples it from 0.4-0.7). Lower = larger masks."}),
        "blur_kernel": ("INT", {"default": 3, "min": 1, "max": 15, "step": 2, "tooltip":
                        "Gaussian filter size applied to the 16x16 keyword maps before sharpening (1 = off)."}),
        "blur_sigma": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 5.0, "step": 0.05, "tooltip":
                       "Gaussian filter sigma (Attend-and-Excite's 0.5)."}),
        "modulation": ("BOOLEAN", {"default": True, "tooltip":
                       "Cross-condition attention modulation (Eq. 3-7): outside its mask an instruction's "
                       "attention is replaced by the null instruction's. From the second step on."}),
        "alpha": ("STRING", {"default": "1.0", "tooltip":
                  "Strength of each sub-instruction inside its mask, comma-separated in instruction "
                  "order (e.g. '1.0, 0.5'); one value applies to all."}),
        "disentangle_fraction": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                 "Fraction of the steps that use mask-guided disentangle sampling (Eq. 9): "
                                 "the instruction only acts inside the union of the masks. Plain IP2P after."}),
    }


def _config(text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma, modulation, alpha, disentangle_fraction):
    return FoIConfig(s_T=text_cfg, s_I=image_cfg, gamma=gamma, tau=tau, kernel_size=blur_kernel,
                     sigma=blur_sigma, modulation=modulation, alphas=parse_alphas(alpha),
                     disentangle_fraction=disentangle_fraction)


def image_masks(masks, latent_hw, scale=LATENT_TO_IMAGE):
    """[B, K, h, w] keyword masks -> MASK [B*K, H, W] at image size (index b * K + k)."""
    b, k = masks.shape[:2]
    big = resize_mask(masks.float(), (latent_hw[0] * scale, latent_hw[1] * scale))
    return big.reshape(b * k, *big.shape[-2:]).cpu()


def mask_preview(masks, keywords, latent_hw, scale=LATENT_TO_IMAGE):
    """[B, K, h, w] masks -> IMAGE [B, H, K*W, 3]: the keyword masks side by side, labelled."""
    b, k = masks.shape[:2]
    big = image_masks(masks, latent_hw, scale).reshape(b, k, latent_hw[0] * scale, latent_hw[1] * scale)
    tiles = []
    for i, keyword in enumerate(keywords):
        rgb = big[:, i, :, :, None].expand(-1, -1, -1, 3).contiguous()
        tiles.append(draw_label(rgb, keyword))
    return torch.cat(tiles, dim=2)


class FoISampler:
    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        samplers = comfy.samplers.KSampler.SAMPLERS
        inputs = {
            "model": ("MODEL", {"tooltip": "An InstructPix2Pix model."}),
            "positive": ("CONDITIONING", {"tooltip": "InstructPixToPixConditioning's positive, made from "
                         "Instruction Text Encode's instruction."}),
            "negative": ("CONDITIONING", {"tooltip":
                         "InstructPixToPixConditioning's negative (the null instruction)."}),
            "latent_image": ("LATENT", {"tooltip":
                             "Sets the batch and size (InstructPixToPixConditioning's latent)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 80, "min": 1, "max": 10000, "tooltip":
                      "Steps actually run, as in KSampler. 80 steps at denoise 0.8 is the paper's setting "
                      "(a 100-step schedule started at 80 % noise)."}),
            "denoise": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "Noise level the sampling starts from (0.8 = the paper's 80 %)."}),
            "sampler_name": (samplers, {"default": "euler_ancestral" if "euler_ancestral" in samplers
                                        else samplers[0]}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal"}),
        }
        inputs.update(_foi_inputs())
        inputs["start"] = (list(START_MODES), {"default": START_MODES[0], "tooltip":
                           "source image: start from the source image latent stored by "
                           "InstructPixToPixConditioning, noised to 'denoise' (the paper). latent input: "
                           "start from latent_image."})
        return {"required": inputs}

    RETURN_TYPES = ("LATENT", "MASK", "IMAGE")
    RETURN_NAMES = ("latent", "keyword_masks", "mask_preview")
    FUNCTION = "run"
    CATEGORY = FOI_CATEGORY
    DESCRIPTION = ("FoI (Focus on Your Instruction, CVPR 2024): InstructPix2Pix editing that keeps each "
                   "sub-instruction inside the region its keyword attends to at the first step. Outputs "
                   "the edited latent, one mask per keyword (per image), and a preview of the masks.")

    def run(self, model, positive, negative, latent_image, seed, steps, denoise, sampler_name, scheduler,
            text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma, modulation, alpha,
            disentangle_fraction, start):
        config = _config(text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma, modulation, alpha,
                         disentangle_fraction)
        out, guider = sample_foi(model, positive, negative, latent_image, seed, steps, denoise, sampler_name,
                                 scheduler, config, start=start)
        latent_hw = tuple(out["samples"].shape[-2:])
        keywords = guider.state.instructions.keywords
        masks = guider.masks  # made at the first step; denoise > 0 and steps >= 1 are checked
        return (out, image_masks(masks, latent_hw), mask_preview(masks, keywords, latent_hw))


class FoIGuiderNode:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = {
            "model": ("MODEL", {"tooltip": "An InstructPix2Pix model."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
        }
        inputs.update(_foi_inputs())
        return {"required": inputs}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "run"
    CATEGORY = FOI_CATEGORY
    DESCRIPTION = ("FoI as a GUIDER for SamplerCustomAdvanced. For the paper's setting start from the "
                   "source image (VAE Encode) with sigmas for 80 % denoise; masks are made at the first step.")

    def run(self, model, positive, negative, text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma,
            modulation, alpha, disentangle_fraction):
        config = _config(text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma, modulation, alpha,
                         disentangle_fraction)
        return (foi_guider(model, positive, negative, config),)


class InstructionTextEncodeQwenImageEdit:
    """Instruction Text Encode for Qwen-Image-Edit: TextEncodeQwenImageEdit's conditioning (the
    image's vision tokens in the prompt, its latent as reference) of the instruction and of the
    empty instruction, with the instruction's sub-instructions and keywords recorded."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "Qwen-Image's text encoder (qwen_2.5_vl_7b)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "default": "put a *hat* on the dog; make the *sky* a sunset", "tooltip":
                                "The edit instruction: sub-instructions separated by ';' or new lines, each "
                                "with ONE keyword between asterisks. The asterisks are removed; the rest is "
                                "encoded as one prompt."}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "Qwen-Image's VAE: encodes the image as the reference latent."}),
            "image": ("IMAGE", {"tooltip": "The image to edit (rescaled to about 1 megapixel, as "
                                "TextEncodeQwenImageEdit does)."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("instruction", "null_instruction")
    FUNCTION = "run"
    CATEGORY = FOI_CATEGORY
    DESCRIPTION = ("TextEncodeQwenImageEdit for FoI: encodes the instruction (sub-instructions with *keywords*) "
                   "and the empty instruction, both with the image, and records each sub-instruction's "
                   "tokens. The empty prompt without the image rides along in null_instruction for FoI's "
                   "third branch (image_cfg != 1). Connect both to FoI Sampler (DiT) / FoI Guider (DiT).")

    ENCODER = AttentionTextEncodeQwenImageEdit

    def run(self, clip, text, vae=None, **images):
        split_instructions(text)  # syntax errors before any encoding
        encoder = self.ENCODER()
        positive = encoder.run(clip, encoded_text(text), vae=vae, **images)[0]
        instructions = instructions_from_tokens(text, tokens_of(positive))
        null = encoder.run(clip, "", vae=vae, **images)[0]
        # eps(z, 0_I, 0_T): the encoder's own empty prompt, neither the images' tokens nor latents
        no_image = encoder.run(clip, "")[0]
        null = [[cond, {**options, NO_IMAGE_KEY: no_image}] for cond, options in null]
        return (annotate_instructions(positive, instructions), null)


class InstructionTextEncodeQwenImageEditPlus(InstructionTextEncodeQwenImageEdit):
    """Its Qwen-Image-Edit 2509 / 2511 form: TextEncodeQwenImageEditPlus's conditioning, up to three
    images (each one's vision tokens in the prompt, each one a reference latent)."""

    ENCODER = AttentionTextEncodeQwenImageEditPlus

    @classmethod
    def INPUT_TYPES(cls):
        inputs = InstructionTextEncodeQwenImageEdit.INPUT_TYPES()
        vae = inputs["optional"]["vae"]
        inputs["optional"] = {"vae": vae, **{
            f"image{i}": ("IMAGE", {"tooltip": f"Reference image {i} (\"Picture {i}\" to the text encoder; "
                                    "rescaled as TextEncodeQwenImageEditPlus does). The edited image is usually "
                                    "image1."}) for i in (1, 2, 3)}}
        return inputs

    DESCRIPTION = ("TextEncodeQwenImageEditPlus (Qwen-Image-Edit 2509 / 2511, up to three images) for FoI: "
                   "encodes the instruction (sub-instructions with *keywords*) and the empty instruction, both "
                   "with the images, and records each sub-instruction's tokens. The keyword masks are on the "
                   "generated image. Connect both to FoI Sampler (DiT) / FoI Guider (DiT).")


def _dit_inputs():
    return {
        "text_cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip":
                     "s_T, the instruction's guidance inside its mask. 0 = the model's official default: "
                     "1.0 for Flux Kontext (guidance-distilled: FluxGuidance sets the strength), 2.5 for "
                     "Qwen-Image-Edit (its true CFG scale)."}),
        "image_cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.05, "round": 0.01, "tooltip":
                      "s_I: 1.0 = the models' own guidance (two branches). Other values add the branch "
                      "without text and image (Eq. 9's image guidance; one more model evaluation per step)."}),
        "gamma": ("INT", {"default": 3, "min": 0, "max": 10, "tooltip":
                  "Rounds of 'square, then min-max normalise' that sharpen each keyword map (Eq. 2)."}),
        "tau": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                "Mask threshold on the sharpened map (the paper samples it from 0.4-0.7). Lower = larger masks."}),
        "blur_kernel": ("INT", {"default": 3, "min": 1, "max": 15, "step": 2, "tooltip":
                        "Gaussian filter size applied to the keyword maps before sharpening (1 = off)."}),
        "blur_sigma": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 5.0, "step": 0.05, "tooltip":
                       "Gaussian filter sigma, in cells of the upsampled map."}),
        "mask_upsample": ("INT", {"default": DIT_MASK_UPSAMPLE, "min": 1, "max": 16, "tooltip":
                          "The filter, Eq. 2 and tau run on the token map upsampled this many times; each "
                          "token is in the mask when half its cells are. 8 keeps keyword regions one token "
                          "wide (4 dropped them); 1 = at the token grid (erodes a token at every mask "
                          "border, docs/foi.md)."}),
        "modulation": ("BOOLEAN", {"default": True, "tooltip":
                       "Cross-condition attention modulation (Eq. 3-7) on the image->text scores of joint "
                       "attention: outside its mask an instruction's scores are the null instruction's."}),
        "alpha": ("STRING", {"default": "1.0", "tooltip":
                  "Strength of each sub-instruction inside its mask (Eq. 6), comma-separated in instruction "
                  "order (e.g. '1.0, 0.5'); one value applies to all."}),
        "disentangle_fraction": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                                 "Fraction of the steps whose guidance keeps the instruction inside the union "
                                 "of the masks (Eq. 9). The models' plain guidance after."}),
        "mask_blocks": ("STRING", {"default": "", "tooltip":
                        "Blocks whose attention makes the masks at the first step, e.g. '15-18' or "
                        "'double 3, single 0-9'; empty = the family default (late double / joint blocks)."}),
    }


def _dit_config(text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma, mask_upsample, modulation, alpha,
                disentangle_fraction, mask_blocks):
    return FoIDiTConfig(s_T=text_cfg or None, s_I=image_cfg, gamma=gamma, tau=tau, kernel_size=blur_kernel,
                        sigma=blur_sigma, mask_upsample=mask_upsample, modulation=modulation,
                        alphas=parse_alphas(alpha), disentangle_fraction=disentangle_fraction,
                        mask_blocks=mask_blocks)


class FoIDiTSampler:
    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        samplers = comfy.samplers.KSampler.SAMPLERS
        inputs = {
            "model": ("MODEL", {"tooltip": "Flux Kontext, Flux.2 (reference editing) or Qwen-Image-Edit."}),
            "positive": ("CONDITIONING", {"tooltip": "The instruction, with the image to edit: Instruction Text "
                         "Encode -> ReferenceLatent -> FluxGuidance (Kontext), or Instruction Text Encode "
                         "(Qwen-Image-Edit)."}),
            "negative": ("CONDITIONING", {"tooltip": "The null instruction, made the same way."}),
            "latent_image": ("LATENT", {"tooltip": "Sets the batch and size: the VAE-encoded image, as the "
                             "example workflows (at denoise 1 an empty latent of its size works the same)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "sampler_name": (samplers, {"default": "euler" if "euler" in samplers else samplers[0]}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "simple"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }
        inputs.update(_dit_inputs())
        return {"required": inputs}

    RETURN_TYPES = ("LATENT", "MASK", "IMAGE")
    RETURN_NAMES = ("latent", "keyword_masks", "mask_preview")
    FUNCTION = "run"
    CATEGORY = FOI_CATEGORY
    DESCRIPTION = ("FoI (Focus on Your Instruction, CVPR 2024) on Flux Kontext, Flux.2 and Qwen-Image-Edit: each "
                   "sub-instruction acts inside the region its keyword attends to at the first step. Outputs "
                   "the edited latent, one mask per keyword (per image), and a preview of the masks.")

    def run(self, model, positive, negative, latent_image, seed, steps, sampler_name, scheduler, denoise,
            text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma, mask_upsample, modulation, alpha,
            disentangle_fraction, mask_blocks):
        config = _dit_config(text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma, mask_upsample, modulation,
                             alpha, disentangle_fraction, mask_blocks)
        out, guider = sample_foi_dit(model, positive, negative, latent_image, seed, steps, sampler_name,
                                     scheduler, denoise, config)
        latent_hw = tuple(out["samples"].shape[-2:])
        masks = token_masks_to_latent(guider.masks, latent_hw, guider.state.patch)
        keywords = guider.state.instructions.keywords
        scale = guider.pixel_scale  # 8; Flux.2 16
        return (out, image_masks(masks, latent_hw, scale), mask_preview(masks, keywords, latent_hw, scale))


class FoIDiTGuiderNode:
    @classmethod
    def INPUT_TYPES(cls):
        inputs = {
            "model": ("MODEL", {"tooltip": "Flux Kontext, Flux.2 (reference editing) or Qwen-Image-Edit."}),
            "positive": ("CONDITIONING", {"tooltip": "The instruction with the image to edit (see FoI Sampler (DiT))."}),
            "negative": ("CONDITIONING", {"tooltip": "The null instruction with the image to edit."}),
        }
        inputs.update(_dit_inputs())
        return {"required": inputs}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "run"
    CATEGORY = FOI_CATEGORY
    DESCRIPTION = ("FoI on Flux Kontext / Flux.2 / Qwen-Image-Edit as a GUIDER for SamplerCustomAdvanced; the masks are "
                   "made at the first step.")

    def run(self, model, positive, negative, text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma,
            mask_upsample, modulation, alpha, disentangle_fraction, mask_blocks):
        config = _dit_config(text_cfg, image_cfg, gamma, tau, blur_kernel, blur_sigma, mask_upsample, modulation,
                             alpha, disentangle_fraction, mask_blocks)
        return (foi_dit_guider(model, positive, negative, config),)


NODE_CLASS_MAPPINGS = {
    "AttentionEditInstructionEncode": InstructionTextEncode,
    "AttentionEditFoISampler": FoISampler,
    "AttentionEditFoIGuider": FoIGuiderNode,
    "AttentionEditInstructionEncodeQwenImageEdit": InstructionTextEncodeQwenImageEdit,
    "AttentionEditInstructionEncodeQwenImageEditPlus": InstructionTextEncodeQwenImageEditPlus,
    "AttentionEditFoIDiTSampler": FoIDiTSampler,
    "AttentionEditFoIDiTGuider": FoIDiTGuiderNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AttentionEditInstructionEncode": "Instruction Text Encode",
    "AttentionEditFoISampler": "FoI Sampler",
    "AttentionEditFoIGuider": "FoI Guider",
    "AttentionEditInstructionEncodeQwenImageEdit": "Instruction Text Encode (Qwen-Image-Edit)",
    "AttentionEditInstructionEncodeQwenImageEditPlus": "Instruction Text Encode (Qwen-Image-Edit Plus)",
    "AttentionEditFoIDiTSampler": "FoI Sampler (Kontext / Qwen-Image-Edit)",
    "AttentionEditFoIDiTGuider": "FoI Guider (Kontext / Qwen-Image-Edit)",
}
