"""Tiny, randomly initialised Wan VAEs, UMT5 encoder, tokenizer and CLIP vision encoder, saved to disk.

For tests and the demo: real architectures (``AutoencoderKLWan``,
``UMT5EncoderModel``) at toy sizes, written in the same formats users have
(a diffusers/transformers folder, or Wan's native single files), so they are
loaded by path through exactly the code users run. Nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from slotsmith.data.encoders import convert_t5_keys
from slotsmith.layout import WanConfig

TINY_CONFIG = WanConfig(dim=64, ffn_dim=128, num_layers=2, text_dim=32, freq_dim=32)
"""A Wan DiT small enough for CPU tests (use with ``TINY_HEAD_DIM``)."""
TINY_HEAD_DIM = 16
TINY_CLIP_DIM = 24
"""Feature size of the tiny CLIP vision encoder (Wan 2.1 I2V's ViT-H/14 has 1280)."""
TINY_I2V_CONFIG = WanConfig(dim=64, ffn_dim=128, num_layers=2, in_dim=36, text_dim=32, freq_dim=32)
"""A Wan 2.2 I2V A14B-shaped DiT (36 input channels, no image branch) for CPU tests."""
TINY_I2V21_CONFIG = WanConfig(
    dim=64, ffn_dim=128, num_layers=2, in_dim=36, text_dim=32, freq_dim=32, image_dim=TINY_CLIP_DIM
)
"""A Wan 2.1 I2V 14B-shaped DiT (36 input channels and the CLIP image branch) for CPU tests."""
TINY_TI2V_CONFIG = WanConfig(dim=64, ffn_dim=128, num_layers=2, in_dim=48, out_dim=48, text_dim=32, freq_dim=32)
"""A Wan 2.2 TI2V 5B-shaped DiT (48 latent channels, for the Wan 2.2 VAE) for CPU tests."""

TINY_VOCAB = ["<pad>", "</s>", "<unk>"] + [
    w
    for w in (
        "a an the of and with in on at to is are man woman person character character1 character2 cat dog "
        "red blue green yellow black white walks runs sits stands smiles looks camera street room forest "
        "sky light dark slowly quickly close up wide shot video photo portrait hair coat hat"
    ).split()
]
"""Word-level vocabulary of the tiny tokenizer (pad 0, eos 1, unk 2, like T5)."""


def _save_tiny_vae(out_dir, z_dim: int, seed: int, **config) -> Path:
    """Save an ``AutoencoderKLWan`` of ``config`` with random per-channel latent statistics."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    # Random per-channel statistics so tests see normalisation really applied.
    mean = (torch.rand(z_dim, generator=g) - 0.5).tolist()
    std = (torch.rand(z_dim, generator=g) + 0.5).tolist()
    AutoencoderKLWan(z_dim=z_dim, latents_mean=mean, latents_std=std, **config).save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_vae(out_dir, *, base_dim: int = 8, seed: int = 0) -> Path:
    """Save a tiny ``AutoencoderKLWan`` (Wan 2.1 structure, z_dim 16) as a diffusers folder.

    Args:
        out_dir: Folder to create.
        base_dim: Channel width (Wan's is 96).
        seed: Initialisation seed.

    Returns:
        ``out_dir``.
    """
    return _save_tiny_vae(out_dir, 16, seed, base_dim=base_dim)


def build_tiny_vae22(out_dir, *, base_dim: int = 8, seed: int = 0) -> Path:
    """Save a tiny Wan 2.2 VAE (TI2V 5B's structure: z_dim 48, 16x spatial) as a diffusers folder.

    The structural settings are those of ``Wan2.2-TI2V-5B-Diffusers/vae``
    (residual blocks, a 2x2 pixel patch on 12 channels); only the widths are
    tiny.

    Args:
        out_dir: Folder to create.
        base_dim: Channel width (Wan 2.2's is 160).
        seed: Initialisation seed.

    Returns:
        ``out_dir``.
    """
    return _save_tiny_vae(
        out_dir, 48, seed, base_dim=base_dim, decoder_base_dim=base_dim, is_residual=True, in_channels=12,
        out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
    )


def build_tiny_clip_vision(out_dir, *, hidden_size: int = TINY_CLIP_DIM, seed: int = 0) -> Path:
    """Save a tiny ``CLIPVisionModelWithProjection`` (32-pixel input, 8-pixel patches) as a transformers folder.

    No ``preprocessor_config.json`` is written: the CLIP defaults at the
    model's input size apply, as for a folder that has none.

    Args:
        out_dir: Folder to create.
        hidden_size: Feature size (the I2V DiT's ``image_dim``).
        seed: Initialisation seed.

    Returns:
        ``out_dir``.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).eval().save_pretrained(str(out_dir))
    return Path(out_dir)


MOSAIC_GAIN = 1e-3
"""Scale of the colour signal inside the mosaic VAE, next to a carrier of 1 (see ``build_mosaic_vae``)."""


def _mosaic_head(norm, conv, gain: float, rows: range, channels: int = 3) -> None:
    """RMS norm -> SiLU -> conv reads colour back from the (+c, -c) channel pairs 1..6.

    ``silu(x) - silu(-x) == x`` exactly, so the pair survives the SiLU; next to
    the carrier the RMS norm divides by ``sqrt(1 + 2 gain^2 |c|^2)``, 1 to within 1e-5.
    """
    norm.gamma.data.fill_(1 / norm.scale)
    t = conv.weight.shape[2] - 1  # the current frame's tap of a causal kernel
    for j, row in zip(range(channels), rows):
        conv.weight.data[row, 1 + j, t, conv.weight.shape[3] // 2, conv.weight.shape[4] // 2] = 1 / gain
        conv.weight.data[row, 4 + j, t, conv.weight.shape[3] // 2, conv.weight.shape[4] // 2] = -1 / gain


def _mosaic_entry(conv, gain: float, channels: int = 3) -> None:
    """A causal conv writing the carrier (channel 0, bias 1) and ``(+gain c, -gain c)`` to channels 1..6."""
    t, h, w = conv.weight.shape[2] - 1, conv.weight.shape[3] // 2, conv.weight.shape[4] // 2
    conv.bias.data[0] = 1.0
    for j in range(channels):
        conv.weight.data[1 + j, j, t, h, w] = gain
        conv.weight.data[4 + j, j, t, h, w] = -gain


def build_mosaic_vae(out_dir, *, base_dim: int = 8) -> Path:
    """Save a tiny ``AutoencoderKLWan`` that really decodes what it encodes: each 8x8 block's mean colour.

    Constructed, not trained: training even this small Wan VAE costs seconds
    per step on a CPU (its causal 3D convolutions are slow there), and the
    demo has two minutes. Every weight is set by hand inside the real Wan
    2.1 structure, so every loader and the pipeline treat it as any Wan VAE:

    - residual blocks and attention add zero (their last conv/projection is
      zero), leaving their shortcuts, which copy channels;
    - each 2x downsampling averages 2x2 pixels, each 2x upsampling repeats them;
    - colour travels as ``(+g c, -g c)`` channel pairs beside a carrier of 1,
      because the heads' RMS norm and SiLU would bend a plain signal, while
      ``silu(x) - silu(-x) = x`` and the carrier holds the norm at ~1.

    Latent channels 0-2 hold a block's mean RGB (in [-1, 1]); the others are
    zero. Decoding gives the 8x8 mosaic back, to within 1e-4.

    Args:
        out_dir: Folder to create (a diffusers folder).
        base_dim: Channel width; at least 7 (carrier plus three channel pairs).

    Returns:
        ``out_dir``.
    """
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=base_dim, z_dim=16)
    g = MOSAIC_GAIN
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder in (vae.encoder, vae.decoder):
            for name, module in coder.named_modules():
                cls = type(module).__name__
                if cls == "WanResidualBlock" and hasattr(module.conv_shortcut, "weight"):
                    for c in range(7):  # 1x1 shortcut between widths: copy the carrier and the pairs
                        module.conv_shortcut.weight[c, c] = 1.0
                elif cls == "WanResample":
                    conv = module.resample[1]
                    for c in range(7):
                        if module.mode.startswith("down"):
                            conv.weight[c, c, 0:2, 0:2] = 0.25  # the 2x2 block's mean
                        else:
                            conv.weight[c, c, 1, 1] = 1.0  # nearest upsampling, copied
                    if hasattr(module, "time_conv"):  # later chunks of a video: carry the newest frame
                        width = module.time_conv.weight.shape[1]
                        for k in range(module.time_conv.weight.shape[0] // width):
                            for c in range(7):
                                module.time_conv.weight[k * width + c, c, -1] = 1.0
        _mosaic_entry(vae.encoder.conv_in, g)
        _mosaic_head(vae.encoder.norm_out, vae.encoder.conv_out, g, range(3))
        vae.encoder.conv_out.bias[16:] = -30.0  # log-variance: a sharp posterior
        for c in range(vae.quant_conv.weight.shape[0]):
            vae.quant_conv.weight[c, c] = 1.0
        for c in range(16):
            vae.post_quant_conv.weight[c, c] = 1.0
        _mosaic_entry(vae.decoder.conv_in, g)
        _mosaic_head(vae.decoder.norm_out, vae.decoder.conv_out, g, range(3))
    vae.save_pretrained(str(out_dir))
    return Path(out_dir)


def vae_to_native(state_dict: dict) -> dict:
    """diffusers ``AutoencoderKLWan`` keys -> Wan's native VAE keys (Wan 2.1 structure).

    The inverse of diffusers' ``convert_wan_vae_to_diffusers``, for writing
    native test files.
    """
    resnet = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
              "conv2": "residual.6", "conv_shortcut": "shortcut"}

    def res(rest: str) -> str:
        for d, n in resnet.items():
            if rest.startswith(d + "."):
                return n + rest[len(d):]
            if rest == d:
                return n
        return rest

    out = {}
    for key, value in state_dict.items():
        new = key
        if key.startswith("quant_conv."):
            new = "conv1." + key[len("quant_conv."):]
        elif key.startswith("post_quant_conv."):
            new = "conv2." + key[len("post_quant_conv."):]
        elif m := re.match(r"(encoder|decoder)\.conv_in\.(.*)", key):
            new = f"{m[1]}.conv1.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.gamma", key):
            new = f"{m[1]}.head.0.gamma"
        elif m := re.match(r"(encoder|decoder)\.conv_out\.(.*)", key):
            new = f"{m[1]}.head.2.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
            new = f"{m[1]}.middle.{2 * int(m[2])}.{res(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            new = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
            new = f"encoder.downsamples.{m[1]}.{res(m[2])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{res(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        out[new] = value
    return out


def save_native_vae(vae_dir, out_file) -> Path:
    """Write a diffusers VAE folder's weights as a native Wan VAE file (.pth or .safetensors)."""
    from safetensors.torch import load_file, save_file

    sd = vae_to_native(load_file(str(Path(vae_dir) / "diffusion_pytorch_model.safetensors")))
    out_file = Path(out_file)
    if out_file.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out_file))
    else:
        torch.save(sd, str(out_file))
    return out_file


def build_tiny_tokenizer(out_dir) -> Path:
    """Save a word-level tokenizer that adds ``</s>`` like T5's (``tokenizers`` library).

    Returns:
        ``out_dir``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_text_encoder(out_dir, tokenizer_dir=None, *, d_model: int = 32, seed: int = 0) -> Path:
    """Save a tiny ``UMT5EncoderModel`` as a transformers folder (and the tiny tokenizer).

    Args:
        out_dir: Folder for the encoder.
        tokenizer_dir: Folder for the tokenizer (default ``out_dir``).
        d_model: Embedding size, the cache's ``text_dim`` (Wan's is 4096).
        seed: Initialisation seed.

    Returns:
        ``out_dir``.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(TINY_VOCAB),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    UMT5EncoderModel(config).eval().save_pretrained(str(out_dir))
    build_tiny_tokenizer(tokenizer_dir or out_dir)
    return Path(out_dir)


def save_native_text_encoder(encoder_dir, out_file) -> Path:
    """Write a transformers UMT5 folder as Wan's native encoder ``.pth`` (Wan's key names)."""
    from safetensors.torch import load_file

    weights = Path(encoder_dir) / "model.safetensors"
    torch.save(convert_t5_keys(load_file(str(weights)), weights, to="native"), str(out_file))
    return Path(out_file)
