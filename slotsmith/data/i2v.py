"""Image-to-video conditioning for the cache: the first frame through the VAE, and through CLIP.

What Wan's image-to-video models take beside the noisy latents, computed
exactly as diffusers' ``WanImageToVideoPipeline.prepare_latents`` and
``encode_image`` do, from each clip's own first frame:

- mode ``i2v`` (the Wan 2.1 VAE: Wan 2.1 I2V 14B, Wan 2.2 I2V A14B): the
  clip's first frame followed by black frames, VAE-encoded and normalised,
  behind a 4-channel mask that marks the first frame; 4 + 16 = the 20 extra
  input channels of those 36-channel models.
- mode ``ti2v`` (the Wan 2.2 VAE: Wan 2.2 TI2V 5B): the first frame alone,
  VAE-encoded and normalised, which the trainer keeps clean in the first
  latent frame.
- CLIP (Wan 2.1 I2V only): the penultimate hidden states of a CLIP vision
  encoder for the first frame, after ``CLIPImageProcessor``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slotsmith.data.cache import I2V_MASK_CHANNELS
from slotsmith.data.encoders import encode_pixels, vae_temporal_factor
from slotsmith.errors import SlotsmithError

CLIP_EXPECTED = (
    "a transformers CLIPVisionModel or CLIPVisionModelWithProjection folder (config.json and weights, "
    "e.g. image_encoder/ of Wan2.1-I2V-14B-480P-Diffusers)"
)
_CLIP_TYPES = ("clip_vision_model", "clip")


def conditioning_mode(vae) -> str:
    """``ti2v`` for the Wan 2.2 VAE (it patchifies its input), else ``i2v``."""
    return "ti2v" if vae.config.patch_size else "i2v"


def condition_channels(vae) -> int:
    """Channels of each condition tensor the VAE makes (see the module docstring)."""
    z = int(vae.config.z_dim)
    return z if conditioning_mode(vae) == "ti2v" else I2V_MASK_CHANNELS + z


def first_frame_mask(num_frames: int, height: int, width: int, temporal: int = 4) -> torch.Tensor:
    """The ``i2v`` mask of a ``num_frames``-frame clip, as ``WanImageToVideoPipeline`` builds it.

    One value per pixel frame (1 for the first, 0 for the rest), the first
    repeated ``temporal`` times so that the frames fold into ``temporal``
    channels per latent frame.

    Args:
        num_frames: Pixel frames of the clip (4N+1).
        height: Latent height.
        width: Latent width.
        temporal: The VAE's temporal compression.

    Returns:
        float32 ``[temporal, (num_frames - 1) / temporal + 1, height, width]``.
    """
    mask = torch.zeros(1, num_frames, height, width)
    mask[:, 0] = 1
    mask = torch.cat([mask[:, :1].repeat_interleave(temporal, dim=1), mask[:, 1:]], dim=1)
    return mask.view(-1, temporal, height, width).transpose(0, 1).contiguous()


@torch.no_grad()
def encode_condition(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The image condition of clips, from their first frames.

    Args:
        vae: From `slotsmith.data.encoders.load_vae`.
        pixels: ``[B, 3, F, H, W]`` in ``[-1, 1]``.

    Returns:
        float32 ``[B, 4 + C, F', H', W']`` (mode ``i2v``) or
        ``[B, C, 1, H', W']`` (mode ``ti2v``).
    """
    first = pixels[:, :, :1]
    if conditioning_mode(vae) == "ti2v":
        return encode_pixels(vae, first)
    video = torch.cat([first, torch.zeros_like(pixels[:, :, 1:])], dim=2)
    latents = encode_pixels(vae, video)
    b, _, _, h, w = latents.shape
    mask = first_frame_mask(pixels.shape[2], h, w, vae_temporal_factor(vae)).unsqueeze(0).expand(b, -1, -1, -1, -1)
    return torch.cat([mask, latents], dim=1)


def first_frame_problem(pixels: torch.Tensor) -> str | None:
    """Why a clip cannot train image-to-video, or None when it can.

    Args:
        pixels: ``[3, F, H, W]`` of one clip.

    Returns:
        The problem (without the file's name), or None.
    """
    if pixels.shape[1] < 2:
        return (
            "image-to-video needs video clips (its first frame conditions the frames after it); "
            "this item has 1 frame"
        )
    first = pixels[:, 0]
    if torch.equal(first.amax(dim=(1, 2)), first.amin(dim=(1, 2))):
        return "the first frame is blank (one flat colour): there is nothing to condition on"
    return None


# ---------------------------------------------------------------- CLIP


def _clip_folder(path: Path) -> Path:
    """The folder holding the CLIP vision encoder's config.json (a pipeline's image_encoder/ too).

    Raises:
        SlotsmithError: Not a CLIP vision encoder folder.
    """
    if path.is_file():
        raise SlotsmithError(
            f"{path}: a single CLIP file (such as Wan's open-clip .pth) is not supported; --clip needs "
            + CLIP_EXPECTED
        )
    if not path.is_dir():
        raise SlotsmithError(f"{path}: no such CLIP encoder; --clip needs {CLIP_EXPECTED}")
    for folder in (path, path / "image_encoder"):
        if (folder / "config.json").is_file():
            return folder
    raise SlotsmithError(f"{path}: no config.json; --clip needs {CLIP_EXPECTED}")


def clip_hidden_size(path) -> int:
    """The feature size a CLIP vision encoder folder gives, from its config.json alone (cheap).

    Args:
        path: The folder (or a pipeline folder with ``image_encoder/``).

    Returns:
        Its vision hidden size (1280 for Wan 2.1 I2V's ViT-H/14).

    Raises:
        SlotsmithError: Not a CLIP vision encoder folder; says what is expected.
    """
    folder = _clip_folder(Path(path))
    try:
        doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlotsmithError(f"{folder / 'config.json'}: cannot read: {e}") from None
    model_type = doc.get("model_type") if isinstance(doc, dict) else None
    if model_type not in _CLIP_TYPES:
        raise SlotsmithError(
            f"{folder}: model_type {model_type!r} is not a CLIP vision encoder; expected {CLIP_EXPECTED}"
        )
    vision = doc.get("vision_config", {}) if model_type == "clip" else doc
    size = vision.get("hidden_size", 768) if isinstance(vision, dict) else None
    if not isinstance(size, int) or size <= 0:
        raise SlotsmithError(f"{folder / 'config.json'}: no usable hidden_size; expected {CLIP_EXPECTED}")
    return size


def _clip_processor(folder: Path, image_size: int):
    """The pipeline's ``CLIPImageProcessor``: the one saved beside the encoder, else CLIP's defaults."""
    try:  # transformers 5 names the PIL-based processor apart; the other one wants torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    for candidate in (folder, folder.parent / "image_processor"):
        if (candidate / "preprocessor_config.json").is_file():
            return CLIPImageProcessor.from_pretrained(str(candidate), local_files_only=True)
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


class ClipImageEncoder:
    """A local CLIP vision encoder with its image processor, as Wan's I2V pipeline uses them."""

    def __init__(self, path, device="cpu", dtype: torch.dtype = torch.float32):
        """Load it from a folder, offline.

        Args:
            path: A CLIPVisionModel(WithProjection) folder, or a pipeline
                folder with ``image_encoder/`` (and ``image_processor/``).
            device: Where to run it.
            dtype: Its weights' dtype.

        Raises:
            SlotsmithError: Not a CLIP vision encoder, or weights that do not load.
        """
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        clip_hidden_size(path)  # refuses anything that is not a CLIP vision encoder, saying what is
        folder = _clip_folder(Path(path))
        architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        # The class the folder was saved from, so that every weight has its place; hidden_states[-2]
        # is the same with or without the projection head.
        cls = CLIPVisionModelWithProjection if "CLIPVisionModelWithProjection" in architectures else CLIPVisionModel
        try:
            self.model = cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise SlotsmithError(f"{folder}: cannot load the CLIP vision encoder: {str(e).splitlines()[0]}") from None
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.processor = _clip_processor(folder, self.model.config.image_size)
        self.hidden_size = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP features of the first frame of each clip.

        Args:
            pixels: ``[B, 3, F, H, W]`` in ``[-1, 1]`` (from 8-bit media).

        Returns:
            float32 ``[B, tokens, hidden]``: the penultimate hidden states,
            as ``WanImageToVideoPipeline.encode_image`` returns them.
        """
        # Back to the 8-bit frames the pixels were read from, which is what the pipeline feeds the processor.
        frames = ((pixels[:, :, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        inputs = self.processor(images=list(frames), return_tensors="pt")
        param = next(self.model.parameters())
        values = inputs["pixel_values"].to(device=param.device, dtype=param.dtype)
        return self.model(pixel_values=values, output_hidden_states=True).hidden_states[-2].float().cpu()
