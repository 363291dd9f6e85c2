"""Wan DiT model layouts: tensor names and shapes from a handful of sizes.

One function (``wan_tensor_shapes``) derives every tensor of a Wan DiT from
its configuration; ``scripts/gen_layouts.py`` uses it to write the YAML files
under ``slotsmith/layouts/``, and the trainer uses the inverse
(``config_from_shapes``) to read a base's configuration off its tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from slotsmith.errors import SlotsmithError

HEAD_DIM = 128
"""Wan's attention head size: heads = dim / 128 in every released model."""


@dataclass(frozen=True)
class WanConfig:
    """The sizes that fix a Wan DiT's tensors.

    Attributes:
        dim: Hidden size.
        ffn_dim: Feed-forward inner size.
        num_layers: Number of transformer blocks.
        in_dim: Latent channels in (16; 36 for I2V; 48 for TI2V 5B).
        out_dim: Latent channels out.
        text_dim: UMT5 embedding size.
        freq_dim: Sinusoidal timestep embedding size.
        patch_size: Patch of (frames, height, width).
        image_dim: CLIP image embedding size of the Wan 2.1 I2V branch, or 0
            when the model has no image branch.
    """

    dim: int
    ffn_dim: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    image_dim: int = 0

    @property
    def num_heads(self) -> int:
        return self.dim // HEAD_DIM

    @property
    def conditions_on_images(self) -> bool:
        """Whether the DiT takes image conditioning (I2V: channels beyond its latents, or a CLIP branch)."""
        return self.in_dim != self.out_dim or bool(self.image_dim)


def wan_tensor_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan DiT with its shape, in native names.

    Args:
        cfg: The model's sizes.

    Returns:
        Canonical name -> shape, in Wan's state-dict order.
    """
    d, pt, ph, pw = cfg.dim, *cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    shapes["patch_embedding.weight"] = (d, cfg.in_dim, pt, ph, pw)
    shapes["patch_embedding.bias"] = (d,)
    linear("text_embedding.0", d, cfg.text_dim)
    linear("text_embedding.2", d, d)
    linear("time_embedding.0", d, cfg.freq_dim)
    linear("time_embedding.2", d, d)
    linear("time_projection.1", 6 * d, d)
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                linear(f"{b}{attn}.{proj}", d, d)
            shapes[f"{b}{attn}.norm_q.weight"] = (d,)
            shapes[f"{b}{attn}.norm_k.weight"] = (d,)
            if attn == "self_attn":
                shapes[b + "norm3.weight"] = (d,)
                shapes[b + "norm3.bias"] = (d,)
        if cfg.image_dim:
            linear(b + "cross_attn.k_img", d, d)
            linear(b + "cross_attn.v_img", d, d)
            shapes[b + "cross_attn.norm_k_img.weight"] = (d,)
        linear(b + "ffn.0", cfg.ffn_dim, d)
        linear(b + "ffn.2", d, cfg.ffn_dim)
    shapes["head.modulation"] = (1, 2, d)
    linear("head.head", cfg.out_dim * pt * ph * pw, d)
    if cfg.image_dim:
        e = cfg.image_dim
        shapes["img_emb.proj.0.weight"] = (e,)
        shapes["img_emb.proj.0.bias"] = (e,)
        linear("img_emb.proj.1", e, e)
        linear("img_emb.proj.3", d, e)
        shapes["img_emb.proj.4.weight"] = (d,)
        shapes["img_emb.proj.4.bias"] = (d,)
    return shapes


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> WanConfig:
    """Read a Wan DiT's configuration off its tensor shapes.

    Args:
        shapes: Canonical name -> shape of every tensor of a checkpoint.

    Returns:
        The configuration whose ``wan_tensor_shapes`` equals ``shapes``.

    Raises:
        SlotsmithError: The tensors are not those of a Wan DiT.
    """
    try:
        d, in_dim, pt, ph, pw = shapes["patch_embedding.weight"]
        cfg = WanConfig(
            dim=d,
            ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
            num_layers=sum(1 for n in shapes if n.startswith("blocks.") and n.endswith(".modulation")),
            in_dim=in_dim,
            out_dim=shapes["head.head.weight"][0] // (pt * ph * pw),
            text_dim=shapes["text_embedding.0.weight"][1],
            freq_dim=shapes["time_embedding.0.weight"][1],
            patch_size=(pt, ph, pw),
            image_dim=shapes["img_emb.proj.1.weight"][0] if "img_emb.proj.1.weight" in shapes else 0,
        )
    except (KeyError, ValueError, IndexError):
        raise SlotsmithError("not a Wan DiT: its tensors lack the Wan layout") from None
    expected = wan_tensor_shapes(cfg)
    if expected != {n: tuple(s) for n, s in shapes.items()}:
        stray = sorted(set(shapes).symmetric_difference(expected)) or sorted(
            n for n in shapes if tuple(shapes[n]) != expected[n]
        )
        raise SlotsmithError(f"not a Wan DiT: tensor {stray[0]!r} does not fit the Wan layout")
    return cfg


@dataclass(frozen=True)
class KnownModel:
    """A released Wan model: its layout and, for Wan 2.2 A14B, its experts.

    Attributes:
        name: Layout name, e.g. ``wan2.2-t2v-a14b``.
        description: One line for humans.
        config: Tensor sizes.
        dtype: The dtype of the released weights.
        experts: Expert name -> (low, high) timestep range in [0, 1], for the
            two-expert Wan 2.2 A14B models; empty otherwise.
    """

    name: str
    description: str
    config: WanConfig
    dtype: str = "BF16"
    experts: dict[str, tuple[float, float]] | None = None


_14B = dict(dim=5120, ffn_dim=13824, num_layers=40)
KNOWN_MODELS = {
    m.name: m
    for m in (
        KnownModel("wan2.1-t2v-1.3b", "Wan 2.1 text-to-video 1.3B", WanConfig(1536, 8960, 30)),
        KnownModel("wan2.1-t2v-14b", "Wan 2.1 text-to-video 14B", WanConfig(**_14B)),
        KnownModel(
            "wan2.1-i2v-14b",
            "Wan 2.1 image-to-video 14B (with the CLIP image branch)",
            WanConfig(**_14B, in_dim=36, image_dim=1280),
        ),
        KnownModel(
            "wan2.2-t2v-a14b",
            "Wan 2.2 text-to-video A14B (two experts of one layout)",
            WanConfig(**_14B),
            experts={"high": (0.875, 1.0), "low": (0.0, 0.875)},
        ),
        KnownModel(
            "wan2.2-i2v-a14b",
            "Wan 2.2 image-to-video A14B (two experts of one layout)",
            WanConfig(**_14B, in_dim=36),
            experts={"high": (0.9, 1.0), "low": (0.0, 0.9)},
        ),
        KnownModel(
            "wan2.2-ti2v-5b",
            "Wan 2.2 text-image-to-video 5B",
            WanConfig(3072, 14336, 30, in_dim=48, out_dim=48),
        ),
    )
}


def layout_yaml(model: KnownModel) -> str:
    """Render a known model's layout file (what ``scripts/gen_layouts.py`` writes)."""
    cfg = asdict(model.config)
    cfg["patch_size"] = list(model.config.patch_size)
    doc = {
        "name": model.name,
        "description": model.description,
        "config": cfg,
        "experts": {k: list(v) for k, v in (model.experts or {}).items()},
        "tensors": {
            n: {"shape": list(s), "dtype": model.dtype} for n, s in wan_tensor_shapes(model.config).items()
        },
    }
    header = f"# Layout of {model.name}. Generated by scripts/gen_layouts.py; do not edit by hand.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=200)


def layouts_dir() -> Path:
    """The folder holding the shipped layout YAML files."""
    return Path(__file__).parent / "layouts"
