"""The demo's base: a random DiT whose cross-attention looks at the prompt rather than at Wan's zero pads."""

from __future__ import annotations

import torch

from slotsmith.data.cache import TEXT_LEN
from slotsmith.demo.run import DEMO_CONFIG, DEMO_HEAD_DIM, attend_to_prompt
from slotsmith.training.wan import build_model

_REAL_TOKENS = 6
"""A demo caption's length: five words and ``</s>``."""
_IMAGE_TOKENS = 16
"""A 64x64 demo image: 8x8 latents in 2x2 patches."""


def _prompt_share(model: torch.nn.Module, generator: torch.Generator) -> float:
    """Mean share of block 0's cross-attention that lands on the real tokens of a zero-padded prompt."""
    context = torch.zeros(1, TEXT_LEN, DEMO_CONFIG.text_dim)
    # Unit-RMS token embeddings, as the UMT5 encoder's final norm gives them.
    context[0, :_REAL_TOKENS] = torch.randn(_REAL_TOKENS, DEMO_CONFIG.text_dim, generator=generator)
    hidden = torch.randn(1, _IMAGE_TOKENS, DEMO_CONFIG.dim, generator=generator)
    attn = model.blocks[0].attn2
    with torch.no_grad():
        text = model.condition_embedder.text_embedder(context)
        q = attn.norm_q(attn.to_q(model.blocks[0].norm2(hidden)))
        k = attn.norm_k(attn.to_k(text))
    heads = DEMO_CONFIG.dim // DEMO_HEAD_DIM
    q = q.view(_IMAGE_TOKENS, heads, DEMO_HEAD_DIM).transpose(0, 1)
    k = k.view(TEXT_LEN, heads, DEMO_HEAD_DIM).transpose(0, 1)
    weights = torch.softmax(q @ k.transpose(1, 2) / DEMO_HEAD_DIM**0.5, dim=-1)
    return weights[..., :_REAL_TOKENS].sum(-1).mean().item()


def test_the_prompt_takes_most_of_the_cross_attention_only_once_set_up():
    torch.manual_seed(0)
    model = build_model(DEMO_CONFIG, DEMO_HEAD_DIM).eval()
    before = _prompt_share(model, torch.Generator().manual_seed(1))
    attend_to_prompt(model)
    after = _prompt_share(model, torch.Generator().manual_seed(1))
    assert before < 0.1  # 512 pads drown six words
    assert after > 0.5


def test_a_zero_pad_becomes_a_zero_key_and_value():
    torch.manual_seed(0)
    model = build_model(DEMO_CONFIG, DEMO_HEAD_DIM).eval()
    attend_to_prompt(model)
    with torch.no_grad():
        pad = model.condition_embedder.text_embedder(torch.zeros(1, DEMO_CONFIG.text_dim))
        for block in model.blocks:
            assert torch.count_nonzero(block.attn2.to_k(pad)) == 0
            assert torch.count_nonzero(block.attn2.to_v(pad)) == 0
