"""Loading the Wan VAE and UMT5 encoder from every supported file form, and encoding."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from slotsmith.data.encoders import (
    encode_pixels,
    encode_texts,
    load_state_dict,
    load_text_encoder,
    load_tokenizer,
    load_vae,
)
from slotsmith.demo import tiny
from slotsmith.errors import SlotsmithError


def test_native_vae_keys_are_what_diffusers_converts():
    # Our test writer of native files is the exact inverse of diffusers' own
    # converter, so native-file tests exercise the real conversion path.
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = AutoencoderKLWan(base_dim=8).state_dict()
    native = tiny.vae_to_native(sd)
    assert "encoder.conv1.weight" in native and "decoder.upsamples.4.shortcut.weight" in native
    assert set(convert_wan_vae_to_diffusers(native)) == set(sd)


@pytest.mark.parametrize("form", ["vae_dir", "vae_pth", "vae_st"])
def test_vae_loads_from_each_form_with_identical_weights(tiny_models, form):
    reference = load_file(str(tiny_models["vae_dir"] / "diffusion_pytorch_model.safetensors"))
    vae = load_vae(tiny_models[form])
    got = vae.state_dict()
    assert set(got) == set(reference)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_vae_folder_of_a_pipeline_is_found(tiny_models, tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "vae").symlink_to(tiny_models["vae_dir"])
    assert load_vae(tmp_path / "pipe").config.base_dim == 8


def test_latents_shape_and_normalisation(tiny_models):
    vae = load_vae(tiny_models["vae_dir"])
    pixels = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    latents = encode_pixels(vae, pixels)
    assert latents.shape == (2, 16, (9 - 1) // 4 + 1, 32 // 8, 48 // 8)
    assert latents.dtype == torch.float32
    # Undo it the way diffusers' WanPipeline does before decoding:
    # latents / (1 / std) + mean must give back the posterior mean.
    mu = vae.encode(pixels).latent_dist.mean
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents / inv_std + mean, mu, rtol=1e-5, atol=1e-5)


def test_native_vae_has_wan21_latent_statistics(tiny_models):
    # A native file carries no statistics; Wan 2.1's published ones apply.
    vae = load_vae(tiny_models["vae_pth"])
    assert vae.config.latents_mean[:2] == [-0.7571, -0.7089]
    assert vae.config.latents_std[:2] == [2.8184, 1.4541]


def test_text_encoder_native_pth_matches_the_folder(tiny_models):
    tok = load_tokenizer(tiny_models["tok"])
    a = load_text_encoder(tiny_models["t5_dir"])
    b = load_text_encoder(tiny_models["t5_pth"])
    captions = ["a red cat walks slowly", "the man"]
    ca, cb = encode_texts(tok, a, captions), encode_texts(tok, b, captions)
    for x, y in zip(ca, cb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_context_is_real_tokens_only_and_independent_of_batch(tiny_models):
    tok = load_tokenizer(tiny_models["tok"])
    enc = load_text_encoder(tiny_models["t5_dir"])
    long_c, short_c = "a red cat walks slowly in the dark forest", "the man"
    batch = encode_texts(tok, enc, [long_c, short_c])
    alone = encode_texts(tok, enc, [short_c])
    assert [c.shape for c in batch] == [(10, 32), (3, 32)]  # words + </s>
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5)


def test_context_is_cut_at_512_tokens(tiny_models):
    tok = load_tokenizer(tiny_models["tok"])
    enc = load_text_encoder(tiny_models["t5_dir"])
    (context,) = encode_texts(tok, enc, ["cat " * 700])
    assert context.shape == (512, 32)


def test_text_encoder_safetensors_with_transformers_keys(tiny_models, tmp_path):
    sd = load_file(str(tiny_models["t5_dir"] / "model.safetensors"))
    save_file(sd, str(tmp_path / "umt5.safetensors"))
    model = load_text_encoder(tmp_path / "umt5.safetensors")
    assert model.config.num_layers == 2 and model.config.d_model == 32


class _Payload:
    """A class a weights-only load must refuse to rebuild."""


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _Payload()}, path)
    with pytest.raises(SlotsmithError, match="cannot read weights"):
        load_state_dict(path)


def test_wrong_files_give_clear_errors(tiny_models, tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(SlotsmithError, match="not a Wan VAE"):
        load_vae(tmp_path / "x.safetensors")
    with pytest.raises(SlotsmithError, match="not a UMT5 encoder"):
        load_text_encoder(tmp_path / "x.safetensors")
    with pytest.raises(SlotsmithError, match="no such file"):
        load_vae(tmp_path / "absent.pth")
    with pytest.raises(SlotsmithError, match="needs config.json"):
        load_vae(tmp_path)
    with pytest.raises(SlotsmithError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)
    sd = tiny.vae_to_native(load_file(str(tiny_models["vae_dir"] / "diffusion_pytorch_model.safetensors")))
    sd.pop("decoder.head.2.bias")
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(SlotsmithError, match="do not fit a Wan 2.1 VAE"):
        load_vae(tmp_path / "cut.safetensors")


def test_tokenizer_error_is_the_whole_message_on_one_line(tmp_path):
    from transformers import AutoTokenizer

    # spiece.model with a config that names no tokenizer class: transformers' message spans several lines.
    _spiece_model(tmp_path / "sp")
    folder = tmp_path / "tok"
    folder.mkdir()
    (tmp_path / "sp.model").rename(folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(Exception) as original:
        AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert "\n" in str(original.value)
    with pytest.raises(SlotsmithError) as e:
        load_tokenizer(folder)
    message = str(e.value)
    assert "\n" not in message
    assert message == f"{folder}: cannot load a tokenizer: {' '.join(str(original.value).split())}"


_SPIECE_TEXT = """a red cat walks slowly in the dark forest
the man rides a bicycle along the river at dawn
two dogs play with a ball on the green grass
"""


def _spiece_model(prefix):
    """Train a tiny sentencepiece model, T5's ids: pad 0, eos 1, unk 2; returns the ``.model`` path."""
    import sentencepiece

    text = prefix.with_suffix(".txt")
    text.write_text(_SPIECE_TEXT * 20)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=64, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def _spiece_folder(tmp_path):
    """google/umt5-xxl's layout without tokenizer.json: spiece.model + tokenizer_config.json."""
    import shutil

    from transformers import T5Tokenizer

    model = _spiece_model(tmp_path / "sp")
    folder = tmp_path / "umt5"
    T5Tokenizer(vocab_file=str(model), extra_ids=0).save_pretrained(str(folder))
    # Recent transformers saves tokenizer.json (and no spiece.model): make it the layout being tested.
    (folder / "tokenizer.json").unlink(missing_ok=True)
    shutil.copyfile(model, folder / "spiece.model")
    assert sorted(f.name for f in folder.iterdir() if f.name != "special_tokens_map.json") == [
        "spiece.model", "tokenizer_config.json"
    ]
    return folder, model


def test_tokenizer_from_spiece_model_without_tokenizer_json(tmp_path):
    import sentencepiece

    folder, model = _spiece_folder(tmp_path)
    tok = load_tokenizer(folder)
    caption = "a red cat walks along the river"
    expected = sentencepiece.SentencePieceProcessor(model_file=str(model)).encode(caption) + [1]  # + </s>
    assert tok(caption).input_ids == expected


def test_tokenizer_folder_errors_say_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "empty": "not a tokenizer folder: no tokenizer.json or spiece.model (google/umt5-xxl's files)"}
    folder, _ = _spiece_folder(tmp_path)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "spiece.model").write_bytes((folder / "spiece.model").read_bytes())
    cases[no_config] = "spiece.model needs tokenizer_config.json beside it (google/umt5-xxl's)"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "spiece.model").write_bytes(b"not a sentencepiece model")
    (damaged / "tokenizer_config.json").write_bytes((folder / "tokenizer_config.json").read_bytes())
    cases[damaged] = "spiece.model is not a readable sentencepiece model"
    for path, problem in cases.items():
        with pytest.raises(SlotsmithError) as e:
            load_tokenizer(path)
        assert str(e.value) == f"{path}: {problem}"
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(SlotsmithError) as e:
        load_tokenizer(folder)
    assert str(e.value) == (
        f"{folder}: reading spiece.model (there is no tokenizer.json) needs sentencepiece and protobuf: "
        "pip install 'slotsmith[train]'"
    )


def test_encoder_files_that_are_lfs_pointers_or_torch_files_named_safetensors_say_so(tiny_models, tmp_path):
    pointer = tmp_path / "Wan2.1_VAE.pth"
    pointer.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 507609880\n")
    with pytest.raises(SlotsmithError, match=r"Wan2.1_VAE.pth: is a Git LFS pointer, not the weights; run `git lfs pull`"):
        load_vae(pointer)
    misnamed = tmp_path / "vae.safetensors"
    misnamed.write_bytes(tiny_models["vae_pth"].read_bytes())
    with pytest.raises(SlotsmithError, match=r"vae.safetensors: is a PyTorch checkpoint \(\w+\), not safetensors"):
        load_vae(misnamed)
