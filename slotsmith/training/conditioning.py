"""Image-to-video training: which cache a base needs, and the conditioned forward's inputs.

Three families, as diffusers' Wan pipelines run them:

- Wan 2.1 I2V 14B and Wan 2.2 I2V A14B (36 input channels, 16 out): the
  cache's ``i2v`` condition (4-channel first-frame mask and the first frame's
  latents, 20 channels) is concatenated to the noisy latents along channels;
  Wan 2.1 I2V also takes the first frame's CLIP features
  (``encoder_hidden_states_image``).
- Wan 2.2 TI2V 5B (48 channels in and out) on a ``ti2v`` cache: the first
  latent frame is the clean first-frame latents, its tokens get timestep 0
  (``WanPipeline``'s ``expand_timesteps``), and it is left out of the loss.
  On a cache without image conditioning it trains as text-to-video.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slotsmith.data.cache import I2V_MASK_CHANNELS, ImageConditioning
from slotsmith.errors import SlotsmithError
from slotsmith.layout import WanConfig


@dataclass
class Conditioning:
    """One batch's image conditioning.

    Attributes:
        mode: ``i2v`` or ``ti2v`` (see the module docstring).
        condition: ``[B, K, F, H, W]`` (``i2v``) or ``[B, C, 1, H, W]`` (``ti2v``).
        image_embeds: ``[B, N, E]`` CLIP features (Wan 2.1 I2V), or None.
    """

    mode: str
    condition: torch.Tensor
    image_embeds: torch.Tensor | None = None

    def model_inputs(
        self, x_t: torch.Tensor, timestep: torch.Tensor, patch_size: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The DiT's ``hidden_states`` and ``timestep`` for noisy latents ``x_t``.

        Args:
            x_t: ``[B, C, F, H, W]`` noisy latents.
            timestep: ``[B]`` model timesteps (``t * 1000``).
            patch_size: The DiT's (frames, height, width) patch.

        Returns:
            ``(hidden_states, timestep)``: for ``i2v`` the concatenation and
            the same timesteps; for ``ti2v`` the latents with a clean first
            frame and ``[B, tokens]`` per-token timesteps, 0 on its tokens.
        """
        if self.mode == "i2v":
            return torch.cat([x_t, self.condition.to(x_t.dtype)], dim=1), timestep
        keep = first_frame_keep(x_t.shape, x_t.device)
        hidden = (1 - keep) * self.condition.to(x_t.dtype) + keep * x_t
        pt, ph, pw = patch_size
        tokens = keep[:, 0, ::pt, ::ph, ::pw].flatten(1)  # [1, tokens]: 0 on the first frame's
        return hidden, tokens * timestep.view(-1, 1)

    def loss_frames(self) -> slice:
        """The latent frames the loss covers: all but the clean first one for ``ti2v``."""
        return slice(1, None) if self.mode == "ti2v" else slice(None)


def first_frame_keep(shape, device=None) -> torch.Tensor:
    """``[1, 1, F, H, W]``: 0 on the first latent frame (kept clean), 1 elsewhere (noised), as ``WanPipeline``."""
    keep = torch.ones(1, 1, *shape[2:], device=device)
    keep[:, :, 0] = 0
    return keep


def batch_conditioning(samples: list[dict], mode: str | None, device) -> Conditioning | None:
    """Stack the conditioning of cache samples (from `slotsmith.data.cache.CachedDataset`).

    Args:
        samples: Samples of one latent shape.
        mode: The cache's conditioning mode, or None for a text-to-video cache.
        device: Where the batch goes.

    Returns:
        The batch's conditioning, or None without one.
    """
    if mode is None:
        return None
    condition = torch.stack([s["condition"] for s in samples]).to(device)
    embeds = torch.stack([s["image_embeds"] for s in samples]).to(device) if "image_embeds" in samples[0] else None
    return Conditioning(mode, condition, embeds)


def _recache_hint(cfg: WanConfig) -> str:
    return "re-cache with `slotsmith cache --i2v" + (" --clip CLIP_DIR`" if cfg.image_dim else "`")


def check_cache_fits_base(cache_dir, index: dict, cfg: WanConfig, base_name) -> None:
    """Refuse a cache whose latents or image conditioning do not fit the base.

    Args:
        cache_dir: The cache folder (for messages).
        index: Its index (``slotsmith.data.cache.load_index``).
        cfg: The base's sizes.
        base_name: The base's path (for messages).

    Raises:
        SlotsmithError: A text-to-video cache on an image-to-video base or the
            reverse, a Wan 2.1 I2V base without CLIP features, or channels
            or sizes that do not match; each says what the base expects.
    """
    cache_dir = Path(cache_dir)
    conditioning = ImageConditioning.from_json(index.get("image_conditioning"), cache_dir)
    channels = index["latent_channels"]
    if channels != cfg.out_dim:
        raise SlotsmithError(f"{cache_dir}: latents have {channels} channels but the base takes {cfg.out_dim}")
    extra = cfg.in_dim - cfg.out_dim
    if extra and conditioning is None:
        raise SlotsmithError(
            f"{cache_dir}: a text-to-video cache (no image conditioning), but {base_name} is an image-to-video base "
            f"({cfg.in_dim} input channels); {_recache_hint(cfg)}"
        )
    if conditioning is None:
        return
    if not extra and conditioning.mode == "i2v":
        raise SlotsmithError(
            f"{cache_dir}: an image-to-video cache ({conditioning.describe()}), but {base_name} is a text-to-video "
            f"base ({cfg.in_dim} input channels); cache without --i2v for it"
        )
    if conditioning.mode == "i2v" and conditioning.channels != extra:
        raise SlotsmithError(
            f"{cache_dir}: image conditioning has {conditioning.channels} channels but the base takes {extra} "
            f"({I2V_MASK_CHANNELS} mask + {extra - I2V_MASK_CHANNELS} latent)"
        )
    if conditioning.mode == "ti2v" and conditioning.channels != cfg.in_dim:
        raise SlotsmithError(
            f"{cache_dir}: first-frame conditioning has {conditioning.channels} channels but the base takes "
            f"{cfg.in_dim}"
        )
    if extra and conditioning.mode != "i2v":
        raise SlotsmithError(
            f"{cache_dir}: {conditioning.describe()} (made with the Wan 2.2 VAE) does not fit {base_name}, which "
            "concatenates the condition to its input; cache with the Wan 2.1 VAE"
        )
    if cfg.image_dim and conditioning.clip_dim != cfg.image_dim:
        found = f"{conditioning.clip_dim}-dim CLIP features" if conditioning.clip_dim else "no CLIP features"
        raise SlotsmithError(
            f"{cache_dir}: holds {found}, but {base_name} (Wan 2.1 I2V) takes {cfg.image_dim}-dim CLIP image "
            f"features; {_recache_hint(cfg)} (a CLIP vision encoder of hidden size {cfg.image_dim})"
        )


def check_data_for_base(cfg: WanConfig, i2v: bool, clip, caching: bool, base_name) -> None:
    """Before ``train --data`` encodes anything: the conditioning options an image-to-video base needs.

    Args:
        cfg: The base's sizes.
        i2v: ``--i2v``.
        clip: ``--clip``, or None.
        caching: Whether the run caches what is missing (encoders given).
        base_name: The base's path (for messages).

    Raises:
        SlotsmithError: A 36-channel base cached without ``--i2v``, a Wan 2.1
            I2V base cached without ``--clip``, or a ``--clip`` that is not a
            CLIP vision encoder of the base's ``image_dim``.
    """
    from slotsmith.data.i2v import CLIP_EXPECTED, clip_hidden_size

    if caching and cfg.in_dim != cfg.out_dim and not (i2v or clip):
        raise SlotsmithError(
            f"{base_name} is an image-to-video base ({cfg.in_dim} input channels): caching for it needs --i2v"
            + (" and --clip" if cfg.image_dim else "")
        )
    if not cfg.image_dim:
        return
    if clip is None:
        if caching:
            raise SlotsmithError(
                f"{base_name} is Wan 2.1 I2V (a CLIP image branch of {cfg.image_dim}): caching for it needs "
                f"--clip, {CLIP_EXPECTED}, of hidden size {cfg.image_dim}"
            )
        return
    size = clip_hidden_size(clip)
    if size != cfg.image_dim:
        raise SlotsmithError(
            f"{clip}: a CLIP vision encoder of hidden size {size}, but {base_name} takes {cfg.image_dim}-dim image "
            f"features (Wan 2.1 I2V uses open-clip ViT-H/14, hidden size 1280)"
        )
