"""Loading Wan's VAE and UMT5 text encoder from local files, and encoding with them.

Everything loads offline from what the user already has on disk:

- VAE: a native Wan 2.1 file (``Wan2.1_VAE.pth`` or ``.safetensors``, keys
  converted with diffusers' own ``convert_wan_vae_to_diffusers``), a
  diffusers-format single file, or a diffusers folder (any Wan VAE, the 2.2
  TI2V one included; a pipeline folder's ``vae/`` is found too).
- Text encoder: Wan's native ``models_t5_umt5-xxl-enc-bf16.pth`` (loaded with
  ``weights_only=True``), a safetensors file with Wan's or transformers'
  keys, or a transformers folder.
- Tokenizer: a local tokenizer folder (``google/umt5-xxl``'s files:
  ``tokenizer.json``, or ``spiece.model`` with ``tokenizer_config.json``).

Latents are normalised as Wan does, ``(mu - mean) / std`` per channel with the
VAE config's ``latents_mean``/``latents_std``; contexts are Wan's: at most 512
tokens, only the real ones kept (the trainer pads with zeros).
"""

from __future__ import annotations

import html
import re
import string
from pathlib import Path

import torch

from slotsmith.data.cache import TEXT_LEN
from slotsmith.errors import SlotsmithError
from slotsmith.io.header import SNIFF_BYTES, sniff_format

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``float32|bfloat16|float16`` -> torch dtype.

    Raises:
        SlotsmithError: Unknown name.
    """
    if name not in DTYPES:
        raise SlotsmithError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a single weights file (safetensors, or a torch file read with ``weights_only=True``).

    Args:
        path: The file.

    Returns:
        Name -> tensor, on CPU.

    Raises:
        SlotsmithError: Missing, unreadable or not a flat dict of tensors.
    """
    if not path.is_file():
        raise SlotsmithError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            found = sniff_format(f.read(SNIFF_BYTES))
    except OSError as e:
        raise SlotsmithError(f"{path}: cannot read weights: {e.strerror or e}") from None
    # A torch file is fine here (Wan ships its VAE and encoder as .pth), unless it is named .safetensors.
    if found is not None and (not found[0].startswith("a PyTorch") or path.suffix == ".safetensors"):
        raise SlotsmithError(f"{path}: is {found[0]}; {found[1]}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - every loader error means "not a weights file we can read"
        raise SlotsmithError(f"{path}: cannot read weights: {str(e).splitlines()[0]}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SlotsmithError(f"{path}: not a flat dict of tensors")
    return sd


# ---------------------------------------------------------------- VAE


def _vae_folder(path: Path) -> Path | None:
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    return None


def _vae_config_from_state_dict(sd: dict, path: Path) -> dict:
    """The few config values a native-structured Wan 2.1 VAE's weights determine."""
    try:
        base_dim = sd["encoder.conv_in.weight"].shape[0]
        z_dim = sd["post_quant_conv.weight"].shape[0]
    except KeyError as e:
        raise SlotsmithError(f"{path}: not a Wan VAE (no {e.args[0]!r})") from None
    if "encoder.down_blocks.0.resnets.0.norm1.gamma" in sd or z_dim != 16:
        raise SlotsmithError(
            f"{path}: looks like the Wan 2.2 VAE (z_dim {z_dim}); load it from a diffusers folder "
            "(e.g. the vae/ folder of Wan2.2-TI2V-5B-Diffusers) instead of a single file"
        )
    return {"base_dim": base_dim, "z_dim": z_dim}


def load_vae(path, device="cpu", dtype: torch.dtype = torch.float32):
    """Load a Wan VAE (``diffusers.AutoencoderKLWan``) from local files.

    Args:
        path: Native or diffusers-key single file, or a diffusers folder
            (the ``vae`` folder or a pipeline folder holding one).
        device: Where to put it.
        dtype: Its weights' dtype.

    Returns:
        The VAE in eval mode.

    Raises:
        SlotsmithError: Missing path, not a Wan VAE, keys that do not match.
    """
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if path.is_dir():
        folder = _vae_folder(path)
        if folder is None:
            raise SlotsmithError(f"{path}: a VAE folder needs config.json (or vae/config.json)")
        try:
            vae = AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise SlotsmithError(f"{folder}: cannot load the VAE: {str(e).splitlines()[0]}") from None
    else:
        sd = load_state_dict(path)
        if "encoder.conv1.weight" in sd:  # Wan's own names
            from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

            sd = convert_wan_vae_to_diffusers(sd)
        # A native file holds no latents mean/std: the config defaults are Wan 2.1's.
        with torch.device("meta"):
            vae = AutoencoderKLWan(**_vae_config_from_state_dict(sd, path))
        try:
            vae.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
        except RuntimeError as e:
            raise SlotsmithError(f"{path}: weights do not fit a Wan 2.1 VAE: {str(e).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_spatial_factor(vae) -> int:
    """Pixels per latent along height and width (8 for Wan 2.1, 16 for Wan 2.2 TI2V)."""
    return int(vae.config.scale_factor_spatial or 8)


def vae_temporal_factor(vae) -> int:
    """Frames per latent frame after the first (4 for both Wan VAEs)."""
    return int(vae.config.scale_factor_temporal or 4)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Encode pixel clips to normalised latents, as Wan does.

    Args:
        vae: From `load_vae`.
        pixels: ``[B, 3, F, H, W]`` in ``[-1, 1]``, F = 4N+1.

    Returns:
        float32 ``[B, C, (F-1)/4+1, H/s, W/s]``: the posterior mean,
        ``(mu - latents_mean) / latents_std`` per channel.
    """
    param = next(vae.parameters())
    mu = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mode().float()
    c = mu.shape[1]
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=mu.device).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=mu.device).view(1, c, 1, 1, 1)
    return ((mu - mean) / std).cpu()


# ---------------------------------------------------------------- text encoder

_T5_NAMES = [
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.{p}.weight", "encoder.block.{i}.layer.0.SelfAttention.{p}.weight"),
    (
        "blocks.{i}.pos_embedding.embedding.weight",
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
]
"""Wan's own T5 encoder names (wan/modules/t5.py) <-> transformers' UMT5 names.

Pairs of templates (``{i}``: block index, ``{p}``: attention projection),
read in either direction. Wan's feed-forward is ``fc2(fc1(x) * gelu(gate(x)))``,
transformers' is ``wo(gelu(wi_0(x)) * wi_1(x))``, hence gate -> wi_0 and fc1 -> wi_1.
"""

_T5_FIELDS = {"i": r"\d+", "p": "[qkvo]"}


def _template_regex(template: str) -> re.Pattern:
    """A regex matching ``template``'s names, its fields as named groups."""
    parts = [
        re.escape(literal) + (f"(?P<{field}>{_T5_FIELDS[field]})" if field else "")
        for literal, field, _, _ in string.Formatter().parse(template)
    ]
    return re.compile("".join(parts))


_T5_RULES = {
    "transformers": [(_template_regex(native), hf) for native, hf in _T5_NAMES],
    "native": [(_template_regex(hf), native) for native, hf in _T5_NAMES],
}
_T5_SOURCES = {"transformers": "Wan's UMT5 encoder", "native": "transformers' UMT5 encoder"}


def convert_t5_keys(sd: dict, path: Path, to: str) -> dict:
    """Rename UMT5 encoder keys between Wan's native names and transformers' ``UMT5EncoderModel`` names.

    Args:
        sd: Name -> tensor, every key in the other convention.
        path: The file ``sd`` came from (for messages).
        to: ``"transformers"`` (from Wan's names) or ``"native"`` (from transformers').

    Returns:
        The same tensors under the new names.

    Raises:
        SlotsmithError: A key that is not part of the source convention's T5 encoder.
    """
    out = {}
    for key, value in sd.items():
        for pattern, target in _T5_RULES[to]:
            if m := pattern.fullmatch(key):
                out[target.format(**m.groupdict())] = value
                break
        else:
            raise SlotsmithError(f"{path}: unexpected key {key!r} for {_T5_SOURCES[to]}")
    return out


def _t5_config(sd: dict, path: Path):
    from transformers import UMT5Config

    try:
        vocab, d_model = sd["shared.weight"].shape
        inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    except KeyError as e:
        raise SlotsmithError(f"{path}: not a UMT5 encoder (no {e.args[0]!r})") from None
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.block.")})
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu",
    )


def load_text_encoder(path, device="cpu", dtype: torch.dtype = torch.float32):
    """Load the UMT5 text encoder (``transformers.UMT5EncoderModel``) from local files.

    Args:
        path: Wan's native ``.pth``, a safetensors file (Wan's or
            transformers' keys), or a transformers folder.
        device: Where to put it.
        dtype: Its weights' dtype.

    Returns:
        The encoder in eval mode.

    Raises:
        SlotsmithError: Missing path, not a UMT5 encoder, keys that do not match.
    """
    from transformers import UMT5EncoderModel

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlotsmithError(f"{path}: a text encoder folder needs config.json")
        try:
            model = UMT5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise SlotsmithError(f"{path}: cannot load the text encoder: {str(e).splitlines()[0]}") from None
        return model.to(device).eval().requires_grad_(False)
    sd = load_state_dict(path)
    if "token_embedding.weight" in sd:
        sd = convert_t5_keys(sd, path, to="transformers")
    sd.setdefault("encoder.embed_tokens.weight", sd.get("shared.weight"))
    config = _t5_config(sd, path)
    # Built on the meta device so a 5.7B-parameter encoder is not first
    # allocated with random values; the file's tensors are assigned in place.
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise SlotsmithError(f"{path}: weights do not fit a UMT5 encoder: {str(e).splitlines()[0]}") from None
    model.tie_weights()
    return model.to(device).eval().requires_grad_(False)


def _sentencepiece_problem(spiece: Path) -> str | None:
    """Why ``spiece.model`` cannot become a tokenizer here, or None when it can.

    transformers converts it to a fast tokenizer with sentencepiece and
    protobuf; without them, or with a damaged file, it falls back to tiktoken
    and blames tiktoken, which is never the problem for Wan's tokenizer.
    """
    try:
        import google.protobuf  # noqa: F401 - only its presence matters
        import sentencepiece
    except ImportError:
        return (
            "reading spiece.model (there is no tokenizer.json) needs sentencepiece and protobuf: "
            "pip install 'slotsmith[train]'"
        )
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    except (OSError, RuntimeError):  # its messages repeat the path and add nothing
        return "spiece.model is not a readable sentencepiece model"
    return None


def load_tokenizer(path):
    """Load a tokenizer from a local folder (``google/umt5-xxl``'s files for Wan).

    The folder holds ``tokenizer.json``, or ``spiece.model`` with
    ``tokenizer_config.json`` (converted with sentencepiece and protobuf).

    Raises:
        SlotsmithError: Not a folder, no tokenizer files in it, an
            ``spiece.model`` that cannot be read (or no sentencepiece or
            protobuf to read it), or files transformers cannot load.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise SlotsmithError(f"{path}: the tokenizer must be a folder (e.g. google/umt5-xxl's files)")
    if not (path / "tokenizer.json").is_file():
        if not (path / "spiece.model").is_file():
            raise SlotsmithError(
                f"{path}: not a tokenizer folder: no tokenizer.json or spiece.model (google/umt5-xxl's files)"
            )
        if not (path / "tokenizer_config.json").is_file():
            # Without it transformers cannot tell which tokenizer spiece.model is for.
            raise SlotsmithError(f"{path}: spiece.model needs tokenizer_config.json beside it (google/umt5-xxl's)")
        if problem := _sentencepiece_problem(path / "spiece.model"):
            raise SlotsmithError(f"{path}: {problem}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - damaged files raise KeyError, AttributeError...: all mean "cannot load"
        # transformers spreads some messages over several lines; all of them are needed to make sense.
        raise SlotsmithError(f"{path}: cannot load a tokenizer: {' '.join(str(e).split())}") from None


def clean_caption(text: str) -> str:
    """Wan's prompt cleaning without ftfy: unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, captions: list[str]) -> list[torch.Tensor]:
    """Encode captions as Wan does: up to 512 tokens, real tokens only.

    Padding is to the batch's longest caption rather than to 512: with the
    attention mask, padding never changes the real tokens' outputs.

    Args:
        tokenizer: From `load_tokenizer`.
        text_encoder: From `load_text_encoder`.
        captions: Raw captions.

    Returns:
        One float32 ``[L, D]`` per caption, L its token count (<= 512).
    """
    tokens = tokenizer(
        [clean_caption(c) for c in captions],
        padding="longest",
        max_length=TEXT_LEN,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
    lengths = mask.sum(dim=1).tolist()
    return [hidden[i, : max(1, n)].clone() for i, n in enumerate(lengths)]

