"""Frozen text encoders (ldm/modules/encoders/modules.py): tokenizers, SD key names, forward passes, hooks."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ldm.modules.encoders.modules import (
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
    clip_checkpoint_key_fixups,
    clip_tokenizer_dir,
    load_text_encoder_weights,
)
from tests._tiny_text_encoders import TINY_CLIP_TEXT_CONFIG, tiny_clip, tiny_openclip

torch.set_num_threads(2)

EOS = 49407
PROMPTS = [
    "a photo of a *",
    "a * toy on the beach, at sunset!!",
    "Hello,world... (test) [brackets] {braces} -- 'quotes' \"double\" 50% #tag @user",
    "café naïve Ünïcödé 日本語 emoji 🐶 ß Ελληνικά",
    "&amp; html entities &lt;b&gt;",
    "  extra   spaces\tand\nnewlines  ",
    "",
    "a very long prompt " + " ".join(f"word{i} and more" for i in range(60)),  # far beyond 77 tokens
]


@pytest.fixture(scope="module")
def clip_encoder():
    return tiny_clip(seed=0)


@pytest.fixture(scope="module")
def openclip_encoder():
    return tiny_openclip(seed=0)


def _open_clip_ids_padded_with_eos(prompts):
    ids = open_clip.tokenize(prompts)
    for row in ids:
        first_eos = int((row == EOS).nonzero()[0, 0])
        row[first_eos + 1 :] = EOS
    return ids


# ---------------------------------------------------------------- tokenizers
def test_clip_tokenizer_equals_open_clip_with_eos_padding(clip_encoder):
    tokens = clip_encoder.tokenize(PROMPTS)
    assert tokens.shape == (len(PROMPTS), 77) and tokens.dtype == torch.long
    assert torch.equal(tokens, _open_clip_ids_padded_with_eos(PROMPTS))
    assert (tokens[:, 0] == 49406).all()
    long_row = tokens[-1]
    assert long_row[-1] == EOS and (long_row[:-1] != EOS).all()  # truncated: 75 text tokens, EOS last
    star_id = tokens[0, 5]
    assert tokens[0, 6] == EOS and int(star_id) == int(open_clip.tokenize(["*"])[0, 1])
    assert (clip_encoder.pad_token_id, clip_encoder.bos_token_id, clip_encoder.eos_token_id) == (EOS, 49406, EOS)


def test_openclip_tokenizer_pads_with_zero(openclip_encoder):
    tokens = openclip_encoder.tokenize(PROMPTS)
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS))
    assert tokens[0, 7:].eq(0).all() and tokens[0, 6] == EOS
    assert (openclip_encoder.pad_token_id, openclip_encoder.bos_token_id, openclip_encoder.eos_token_id) == (0, 49406, EOS)


def test_tokenizer_files_written_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("PERFUSION_CACHE", str(tmp_path))
    folder = clip_tokenizer_dir()
    assert folder == tmp_path / "clip_tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == EOS
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    assert sorted(vocab.values()) == list(range(49408))


# ---------------------------------------------------------------- parameter names and counts
def _sd1_keys(n_layers):
    p = "transformer.text_model."
    keys = {p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight"}
    keys |= {p + f"final_layer_norm.{s}" for s in ("weight", "bias")}
    for i in range(n_layers):
        for sub in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                    "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{p}encoder.layers.{i}.{sub}.{s}" for s in ("weight", "bias")}
    return keys


def _sd2_keys(n_layers):
    keys = {"model.token_embedding.weight", "model.positional_embedding", "model.text_projection",
            "model.logit_scale", "model.ln_final.weight", "model.ln_final.bias"}
    for i in range(n_layers):
        b = f"model.transformer.resblocks.{i}."
        keys |= {b + "attn.in_proj_weight", b + "attn.in_proj_bias"}
        for sub in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            keys |= {b + f"{sub}.{s}" for s in ("weight", "bias")}
    return keys


def test_full_size_models_on_meta_have_sd_names_and_sizes():
    with torch.device("meta"):
        sd1 = FrozenCLIPEmbedder()
        sd2 = FrozenOpenCLIPEmbedder()
    assert sum(p.numel() for p in sd1.parameters()) == 123_060_480
    assert sum(p.numel() for p in sd2.parameters()) == 354_032_641
    sd1_state, sd2_state = sd1.state_dict(), sd2.state_dict()
    assert set(sd1_state) == _sd1_keys(12)
    assert set(sd2_state) == _sd2_keys(24)
    assert sd1_state["transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd1_state["transformer.text_model.encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
    assert sd2_state["model.positional_embedding"].shape == (77, 1024)
    assert sd2_state["model.text_projection"].shape == (1024, 1024)
    assert sd2_state["model.logit_scale"].shape == ()
    assert sd2_state["model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert (sd1.width, sd2.width, sd1.max_length, sd2.max_length) == (768, 1024, 77, 77)
    assert sd1.transformer.text_model.config.hidden_act == "quick_gelu"


def test_tiny_models_have_sd_names(clip_encoder, openclip_encoder):
    assert set(clip_encoder.state_dict()) == _sd1_keys(2)
    assert set(openclip_encoder.state_dict()) == _sd2_keys(3)


def test_checkpoint_key_fixups_and_weight_loading(clip_encoder):
    sd_like = {"cond_stage_model." + k: v.clone() for k, v in clip_encoder.state_dict().items()}
    sd_like["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None].float()
    sd_like["model.diffusion_model.out.0.weight"] = torch.zeros(3)
    assert clip_checkpoint_key_fixups(sd_like) == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    fresh = tiny_clip(seed=5)
    load_text_encoder_weights(fresh, sd_like)
    for k, v in clip_encoder.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    with pytest.raises(ValueError, match="missing"):
        load_text_encoder_weights(tiny_openclip(), sd_like)
    with pytest.raises(ValueError, match="wrong shapes"):
        load_text_encoder_weights(FrozenCLIPEmbedder(text_config={**TINY_CLIP_TEXT_CONFIG, "hidden_size": 16}), sd_like)


# ---------------------------------------------------------------- forward passes
def test_clip_forward_equals_transformers_forward(clip_encoder):
    tokens = clip_encoder.tokenize(PROMPTS)
    out = clip_encoder.encode(PROMPTS)
    assert out.shape == (len(PROMPTS), 77, 32) and out.dtype == torch.float32
    reference = clip_encoder.transformer.text_model(input_ids=tokens, output_hidden_states=True)
    torch.testing.assert_close(out, reference.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert torch.equal(clip_encoder(PROMPTS), out)

    hidden = tiny_clip(seed=0, layer="hidden", layer_idx=1)
    torch.testing.assert_close(hidden.encode_tokens(tokens), reference.hidden_states[1], rtol=1e-5, atol=1e-5)
    penultimate = tiny_clip(seed=0, layer="penultimate")
    torch.testing.assert_close(penultimate.encode_tokens(tokens), reference.hidden_states[-2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(penultimate.encode_tokens(tokens), out, atol=1e-3)
    with pytest.raises(ValueError, match="layer_idx"):
        tiny_clip(layer="hidden")


def _reference_openclip(model, tokens, n_blocks):
    """Textbook pre-LN causal transformer from the raw weights (independent of open_clip's modules)."""
    x = model.token_embedding.weight[tokens] + model.positional_embedding[: tokens.shape[1]]
    width, length = x.shape[-1], x.shape[1]
    heads = 4
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)

    def ln(t, norm):
        return F.layer_norm(t, (width,), norm.weight, norm.bias, eps=norm.eps)

    for block in model.transformer.resblocks[:n_blocks]:
        h = ln(x, block.ln_1)
        q, k, v = (h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(t.shape[0], length, heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(width // heads)
        attn = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(x.shape)
        x = x + attn @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
        h = ln(x, block.ln_2)
        x = x + F.linear(F.gelu(F.linear(h, block.mlp.c_fc.weight, block.mlp.c_fc.bias)),
                         block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    return ln(x, model.ln_final)


def test_openclip_penultimate_and_last_equal_reference(openclip_encoder):
    tokens = openclip_encoder.tokenize(PROMPTS)
    out = openclip_encoder.encode_tokens(tokens)
    assert out.shape == (len(PROMPTS), 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(out, _reference_openclip(openclip_encoder.model, tokens, 2), rtol=1e-5, atol=1e-5)
        last = tiny_openclip(seed=0, layer="last")
        torch.testing.assert_close(last.encode(PROMPTS), _reference_openclip(last.model, tokens, 3), rtol=1e-5, atol=1e-5)
        # open_clip's own text path (before pooling) agrees with our "last" layer as well
        model = last.model
        x = model.token_embedding(tokens) + model.positional_embedding
        own = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        torch.testing.assert_close(last.encode(PROMPTS), own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_clip, tiny_openclip], ids=["clip", "openclip"])
def test_embedding_hook_is_causal_and_identity_is_exact(make):
    encoder = make(seed=1)
    tokens = encoder.tokenize(["a photo of a * on a table", "a * next to a *"])
    star = int(open_clip.tokenize(["*"])[0, 1])
    position = int((tokens[0] == star).nonzero()[0, 0])
    assert position == 5
    plain = encoder.encode_tokens(tokens)
    assert torch.equal(encoder.encode_tokens(tokens, embedding_hook=lambda t, e: e), plain)

    new_vector = torch.randn(encoder.width, generator=torch.Generator().manual_seed(3), requires_grad=True)
    seen = {}

    def insert_concept(tok, embeds):
        seen["shape"] = embeds.shape
        return torch.where((tok == star)[..., None], new_vector.to(embeds.dtype), embeds)

    hooked = encoder.encode_tokens(tokens, embedding_hook=insert_concept)
    assert seen["shape"] == (2, 77, encoder.width)
    assert torch.equal(hooked[0, :position], plain[0, :position])  # causal: earlier positions untouched
    changed = (hooked[0, position:] - plain[0, position:]).abs().amax(dim=-1)
    assert (changed > 1e-6).all()  # the token itself and everything after it (padding included) changes
    # the learned vector receives gradients through the frozen encoder
    # (a random projection: a plain sum of a LayerNorm output has zero gradient by construction)
    weights = torch.randn(encoder.width, generator=torch.Generator().manual_seed(4))
    (hooked[0, position:] * weights).sum().backward()
    assert new_vector.grad is not None and new_vector.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    with pytest.raises(ValueError, match="embedding_hook"):
        encoder.encode_tokens(tokens, embedding_hook=lambda t, e: e[:, :3])


@pytest.mark.parametrize("make", [tiny_clip, tiny_openclip], ids=["clip", "openclip"])
def test_frozen_and_state_dict_roundtrip(make, tmp_path):
    encoder = make(seed=2)
    assert not encoder.training and all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert make(seed=2, freeze=False).train().training

    path = tmp_path / "text_encoder.pt"
    torch.save(encoder.state_dict(), path)
    fresh = make(seed=7)
    prompts = ["a photo of a *", "a dog"]
    assert not torch.allclose(fresh.encode(prompts), encoder.encode(prompts))
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert torch.equal(fresh.encode(prompts), encoder.encode(prompts))


def test_clip_from_local_folder_loads_its_weights(tmp_path, clip_encoder):
    clip_encoder.transformer.text_model.save_pretrained(tmp_path)
    loaded = FrozenCLIPEmbedder(version=str(tmp_path))
    assert loaded.width == TINY_CLIP_TEXT_CONFIG["hidden_size"]
    assert torch.equal(loaded.encode(PROMPTS[:3]), clip_encoder.encode(PROMPTS[:3]))


def test_clear_errors_for_bad_versions(tmp_path):
    with pytest.raises(OSError, match="built in"):
        FrozenCLIPEmbedder(version="someone/not-a-cached-model", text_config=dict(TINY_CLIP_TEXT_CONFIG))
    with pytest.raises(FileNotFoundError, match="config.json"):
        FrozenCLIPEmbedder(version=str(tmp_path))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        FrozenOpenCLIPEmbedder(arch="ViT-Nonexistent-99")
    with pytest.raises(ValueError, match="layer"):
        tiny_openclip(layer="hidden")
    with pytest.raises(ValueError, match="token ids"):
        tiny_clip().encode_tokens(torch.full((1, 77), 50000))
