"""Render samples with diffusers' ``WanPipeline`` and write them with what made them.

The prompts are encoded once, by the same code ``slotsmith cache`` uses
(``encode_texts``: what the DiT was trained on), and handed to the pipeline
as embeddings, so the text encoder can be freed before the DiT loads. The
scheduler is built in code (UniPC with flow sigmas, as Wan's pipelines use),
so nothing is read from a model hub.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from slotsmith.data.cache import TEXT_LEN
from slotsmith.data.encoders import encode_texts, vae_spatial_factor
from slotsmith.errors import SlotsmithError
from slotsmith.io.writer import atomic_file, write_all
from slotsmith.sampling.prompts import SampleSpec

METADATA_KEY = "slotsmith"
"""PNG text chunk holding the sample's record (JSON); an MP4 holds it as its comment."""
FPS = 16
"""Wan's frame rate."""
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Renderer:
    """Turns a DiT and a ``SampleSpec`` into frames.

    Args:
        vae: A Wan VAE (``slotsmith.data.encoders.load_vae``).
        contexts: Prompt text -> its ``[L, D]`` embedding (see ``encode_prompts``).
        device: Where the DiT computes.
        mixed_precision: ``no``, ``bf16`` or ``fp16``: autocast around the denoising.
        progress: Show a bar over the denoising steps.
    """

    def __init__(self, vae, contexts: dict[str, torch.Tensor], device: torch.device,
                 mixed_precision: str = "no", progress: bool = False):
        self.vae = vae
        self.contexts = contexts
        self.device = torch.device(device)
        self.amp_dtype = AMP_DTYPES.get(mixed_precision)
        self.progress = progress

    def check(self, spec: SampleSpec, patch_size: Sequence[int]) -> None:
        """Refuse a size the model cannot make (the pipeline would quietly crop it).

        Raises:
            SlotsmithError: Names where the spec came from and the multiple needed.
        """
        multiple = vae_spatial_factor(self.vae) * patch_size[1]
        if spec.width % multiple or spec.height % multiple:
            raise SlotsmithError(
                f"{spec.where}: width and height must be multiples of {multiple} for this model, "
                f"got {spec.width}x{spec.height}"
            )

    def _embedding(self, text: str, dtype: torch.dtype) -> torch.Tensor:
        context = self.contexts[text]
        padded = context.new_zeros(TEXT_LEN, context.shape[1])  # zero-padded to 512 tokens, as in training
        padded[: context.shape[0]] = context
        return padded.unsqueeze(0).to(self.device, dtype)

    def render(
        self, model: torch.nn.Module, spec: SampleSpec, high: torch.nn.Module | None = None,
        boundary: float | None = None,
    ) -> np.ndarray:
        """Sample one image or video (see ``render_batch``).

        Returns:
            ``uint8 [frames, height, width, 3]``.
        """
        return self.render_batch(model, [spec], high, boundary)[0]

    @torch.no_grad()
    def render_batch(
        self, model: torch.nn.Module, specs: Sequence[SampleSpec], high: torch.nn.Module | None = None,
        boundary: float | None = None,
    ) -> list[np.ndarray]:
        """Sample several prompts at once; each result equals that spec rendered alone.

        Every spec's noise comes from its own generator seeded by its seed;
        the global random state is left as it was, and so are the models'
        train/eval modes.

        Args:
            model: A ``WanTransformer3DModel`` (any placement: offloaded, fp8...);
                with ``high``, the low-noise expert.
            specs: What to sample; all with the same size, frames, steps,
                guidance, flow shift and negative prompt.
            high: Wan 2.2 A14B's high-noise expert: it denoises the steps whose
                timestep is at or above ``boundary`` x 1000, ``model`` the rest
                (``WanPipeline``'s ``transformer`` and ``transformer_2``).
            boundary: The expert boundary in (0, 1); needed with ``high``.

        Returns:
            ``uint8 [frames, height, width, 3]`` per spec.
        """
        from diffusers import UniPCMultistepScheduler, WanPipeline

        first = specs[0]
        shared = {k: v for k, v in first.settings().items() if k != "seed"}
        if any({k: v for k, v in s.settings().items() if k != "seed"} != shared for s in specs):
            raise ValueError("render_batch needs specs that differ only in prompt and seed")
        for spec in specs:
            self.check(spec, model.config.patch_size)
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
            flow_shift=first.flow_shift,
        )
        # WanPipeline: `transformer` takes t >= boundary_ratio * 1000 (high noise), `transformer_2` the rest.
        experts = {} if high is None else {"transformer_2": model, "boundary_ratio": boundary}
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=self.vae, scheduler=scheduler,
                           transformer=model if high is None else high, **experts)
        pipe.set_progress_bar_config(disable=not self.progress, leave=False, desc=first.prompt[:30])
        dtype = model.dtype if self.amp_dtype is None else torch.float32
        guided = first.guidance > 1.0
        models = [model] if high is None else [model, high]
        was_training = [m.training for m in models]
        for m in models:
            m.eval()
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), amp:
                frames = pipe(
                    prompt_embeds=torch.cat([self._embedding(s.prompt, dtype) for s in specs]),
                    negative_prompt_embeds=(
                        torch.cat([self._embedding(s.negative_prompt, dtype) for s in specs]) if guided else None
                    ),
                    height=first.height, width=first.width, num_frames=first.frames,
                    num_inference_steps=first.steps, guidance_scale=first.guidance,
                    generator=[torch.Generator(self.device).manual_seed(s.seed) for s in specs], output_type="np",
                ).frames
        finally:
            for m, mode in zip(models, was_training):
                m.train(mode)
        return [(np.clip(np.asarray(f, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8) for f in frames]


def encode_prompts(tokenizer, text_encoder, specs: Sequence[SampleSpec]) -> dict[str, torch.Tensor]:
    """Each distinct prompt and negative prompt of ``specs``, encoded as ``slotsmith cache`` encodes captions.

    Returns:
        Text -> float32 ``[L, D]`` (real tokens only).
    """
    texts = sorted({s.prompt for s in specs} | {s.negative_prompt for s in specs if s.guidance > 1.0})
    return dict(zip(texts, encode_texts(tokenizer, text_encoder, texts)))


def sample_name(index: int, spec: SampleSpec, label: str = "") -> str:
    """A file name that sorts in prompt order and says what it is: ``03-a-red-cat-s42[-label].png``."""
    slug = re.sub(r"[^a-z0-9]+", "-", spec.prompt.lower()).strip("-")[:40] or "prompt"
    extra = "-" + re.sub(r"[^A-Za-z0-9.+_-]+", "_", label) if label else ""
    return f"{index:02d}-{slug}-s{spec.seed}{extra}" + (".png" if spec.frames == 1 else ".mp4")


def record(spec: SampleSpec, made_with: dict) -> dict:
    """The metadata a sample carries: prompt, seed, settings, and the base and slots that made it."""
    return {"prompt": spec.prompt, "seed": spec.seed, "settings": spec.settings(), **made_with}


def png_bytes(image: np.ndarray, metadata: dict | None = None) -> bytes:
    """``uint8 [H, W, 3]`` as PNG bytes, ``metadata`` (JSON) in a text chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if metadata is not None:
        info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def mp4_bytes(frames: np.ndarray, metadata: dict, fps: int = FPS) -> bytes:
    """``uint8 [F, H, W, 3]`` as H.264 MP4 bytes, ``metadata`` (JSON) as the file's comment."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        container.metadata["comment"] = json.dumps(metadata, sort_keys=True)
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def write_sample(path: Path, frames: np.ndarray, metadata: dict, *, force: bool = False) -> Path:
    """Write one sample atomically: a PNG for one frame, else an MP4.

    Raises:
        SlotsmithError: The file exists (without ``force``) or cannot be written.
    """
    data = png_bytes(frames[0], metadata) if len(frames) == 1 else mp4_bytes(frames, metadata)
    with atomic_file(path, force=force) as fd:
        write_all(fd, data)
    return path


def read_metadata(path: str | Path) -> dict:
    """The record a sample written by ``write_sample`` carries (PNG text chunk or MP4 comment)."""
    path = Path(path)
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            return json.loads(image.text[METADATA_KEY])
    import av

    with av.open(str(path)) as container:
        return json.loads(container.metadata["comment"])


def contact_sheet(cells: Sequence[Sequence[np.ndarray]], rows: Sequence[str], columns: Sequence[str]):
    """A labelled grid: one row per prompt, one column per variant.

    Args:
        cells: ``cells[r][c]``: ``uint8 [H, W, 3]`` images (any sizes).
        rows: A label per row (shown at its left).
        columns: A label per column (shown above it).

    Returns:
        The sheet, a PIL image.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, line = 4, 12
    cell_w = max(max(img.shape[1] for img in row) for row in cells)
    cell_h = max(max(img.shape[0] for img in row) for row in cells)
    col_w = max(cell_w, *(int(font.getlength(c)) + 2 * pad for c in columns))
    wrap = max(12, 150 // 6)
    row_text = [_wrap(r, wrap) for r in rows]
    label_w = max(int(font.getlength(t)) for text in row_text for t in text) + 2 * pad
    head_h = line + 2 * pad
    sheet = Image.new("RGB", (label_w + len(columns) * (col_w + pad), head_h + len(rows) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((label_w + c * (col_w + pad) + pad, pad), name, fill="black", font=font)
    for r, row in enumerate(cells):
        top = head_h + r * (cell_h + pad)
        for k, text in enumerate(row_text[r][: max(1, cell_h // line)]):
            draw.text((pad, top + k * line), text, fill="black", font=font)
        for c, img in enumerate(row):
            sheet.paste(Image.fromarray(img), (label_w + c * (col_w + pad), top))
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap to ``width`` characters."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]
