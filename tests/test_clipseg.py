"""ClipSeg loading (transformers folder vs original layout), key mapping, TorchScript reading, soft masks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipseg.paths
from clipseg.convert import infer_clipseg_config, original_to_hf
from clipseg.model import (IMAGENET_MEAN, IMAGENET_STD, ClipSegMasker, build_offline_clip_tokenizer, load_clipseg,
                           load_state_file)
from clipseg.paths import ClipSegWeightsNotFound
from clipseg.torchscript import is_torchscript_archive, read_torchscript_state_dict
from tests._tiny_clipseg import (
    TINY_EXTRACT_LAYERS,
    TINY_HEADS,
    OriginalDecoder,
    hf_to_original,
    save_tiny_clipseg_folder,
    tiny_clipseg_model,
    tiny_open_clip,
)

torch.set_num_threads(2)
TINY_HEAD_ARGS = dict(extract_layers=TINY_EXTRACT_LAYERS, vision_heads=TINY_HEADS, text_heads=TINY_HEADS,
                      decoder_heads=TINY_HEADS)
PROMPTS = ["a photo of a dog.", "a dog.", "the dog."]


def _images():
    generator = torch.Generator().manual_seed(3)
    sizes = [(50, 40), (33, 71)]  # (width, height), neither square nor the model size
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
            for w, h in sizes]


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_clipseg_model()


def test_offline_tokenizer_matches_openai_clip_ids():
    import open_clip

    from ldm.modules.encoders import modules

    assert build_offline_clip_tokenizer is modules.build_offline_clip_tokenizer  # one builder, shared with SD 1.x
    tokenizer = build_offline_clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-B-16")  # OpenAI's SimpleTokenizer ids
    for prompt in ["a photo of a teddy-bear.", "A cropped photo of Hepburn's CAT!", "café 123"]:
        expected = reference([prompt])[0].tolist()
        expected = expected[: expected.index(49407) + 1]
        assert tokenizer(prompt)["input_ids"] == expected
    assert len(tokenizer) == 49408


def test_key_mapping_round_trip_covers_every_key(tiny_model):
    hf_state = tiny_model.state_dict()
    clip_state, decoder_state = hf_to_original(hf_state)
    # Names of the original layout (OpenAI CLIP + CLIPDensePredT decoder).
    for key in ["visual.conv1.weight", "visual.proj", "visual.transformer.resblocks.2.attn.in_proj_weight",
                "transformer.resblocks.1.mlp.c_fc.weight", "text_projection", "ln_final.bias", "logit_scale"]:
        assert key in clip_state, key
    for key in ["film_mul.weight", "reduces.1.bias", "blocks.0.self_attn.in_proj_weight", "blocks.1.linear2.weight",
                "blocks.1.norm1.bias", "trans_conv.0.weight", "trans_conv.4.bias"]:
        assert key in decoder_state, key
    assert clip_state["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert clip_state["visual.proj"].shape == (32, 16)  # OpenAI's x @ proj orientation

    extra = {"reduce.weight": torch.zeros(16, 32), "reduce.bias": torch.zeros(16)}  # unused original layer
    converted = original_to_hf(clip_state, {**decoder_state, **extra})
    assert set(converted) == set(hf_state), (set(converted) ^ set(hf_state))
    for key, tensor in hf_state.items():
        assert torch.equal(converted[key], tensor), key

    rebuilt = infer_clipseg_config(converted, **TINY_HEAD_ARGS).to_dict()
    original = tiny_model.config.to_dict()
    for field in ["projection_dim", "reduce_dim", "extract_layers", "decoder_intermediate_size",
                  "use_complex_transposed_convolution"]:
        assert rebuilt[field] == original[field], field
    for sub in ["text_config", "vision_config"]:
        for field in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]:
            assert rebuilt[sub][field] == original[sub][field], (sub, field)

    with pytest.raises(ValueError, match="extra_blocks.0.linear1.weight"):
        original_to_hf(clip_state, {**decoder_state, "extra_blocks.0.linear1.weight": torch.zeros(1)})


def test_transformers_folder_and_original_layout_give_same_masks(tiny_model, tmp_path):
    folder = save_tiny_clipseg_folder(tiny_model, tmp_path / "clipseg-tiny", image_size=96)
    clip_state, decoder_state = hf_to_original(tiny_model.state_dict())
    torch.save(decoder_state, tmp_path / "rd-tiny.pth")
    torch.save(clip_state, tmp_path / "ViT-tiny.pt")

    from_folder = load_clipseg(folder)
    assert from_folder.image_size == 96
    from_original = load_clipseg(tmp_path / "rd-tiny.pth", clip_path=tmp_path / "ViT-tiny.pt", image_size=96,
                                 **TINY_HEAD_ARGS)
    images = _images()
    masks_folder = from_folder.masks(images, PROMPTS)
    masks_original = from_original.masks(images, PROMPTS)
    for image, a, b in zip(images, masks_folder, masks_original):
        assert a.shape == b.shape == (image.height, image.width)
        assert a.dtype == torch.float32 and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
        assert float((a - b).abs().max()) <= 1e-6
    assert float(masks_folder[0].std()) > 1e-4  # a real spatial map, not a constant

    # masks() = mean over prompts of sigmoid(logits), each prompt run through the model on its own.
    for index, image in enumerate(images):
        probabilities = []
        for prompt in PROMPTS:
            logits = from_folder.logits([image], [prompt])[0, 0]
            probabilities.append(torch.sigmoid(logits))
        expected = F.interpolate(torch.stack(probabilities).mean(0)[None, None], size=(image.height, image.width),
                                 mode="bilinear", align_corners=False)[0, 0]
        assert torch.allclose(masks_folder[index], expected, atol=5e-5)  # batched vs single: float noise only


def test_preprocess_is_bilinear_resize_and_imagenet_normalisation(tiny_model):
    """The masker's pixels are exactly the original recipe: RGB, PIL bilinear resize to S x S, / 255 in float32,
    ImageNet mean and std."""
    images = _images() + [_images()[0].convert("L"), _images()[1].convert("RGBA")]
    arrays = [np.asarray(im.convert("RGB").resize((96, 96), Image.BILINEAR), np.float32) for im in images]
    pixels = torch.from_numpy(np.stack(arrays) / np.float32(255.0)).permute(0, 3, 1, 2)
    expected = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    got = ClipSegMasker(tiny_model, tokenizer=None, image_size=96).preprocess(images)
    assert got.dtype == torch.float32 and got.shape == (4, 3, 96, 96)
    assert torch.equal(got, expected)


def test_openai_layout_is_interpreted_like_the_original_model():
    """open_clip (OpenAI parameter names) + torch's TransformerEncoderLayer decoder, converted, compute the same."""
    from transformers import CLIPSegForImageSegmentation

    reference_clip, reference_decoder = tiny_open_clip(), OriginalDecoder()
    hf_state = original_to_hf(reference_clip.state_dict(), reference_decoder.state_dict())
    model = CLIPSegForImageSegmentation(infer_clipseg_config(hf_state, **TINY_HEAD_ARGS)).eval()
    model.load_state_dict(hf_state, strict=True)

    ids = torch.zeros(2, 77, dtype=torch.long)  # OpenAI-style zero padding after the end token
    ids[0, :5] = torch.tensor([49406, 320, 1125, 1929, 49407])
    ids[1, :3] = torch.tensor([49406, 1929, 49407])
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))  # 6x6 grid: resized pos-emb
    with torch.no_grad():
        text_reference = reference_clip.encode_text(ids)
        text_hf = model.clip.get_text_features(input_ids=ids).pooler_output
        assert torch.allclose(text_hf, text_reference, atol=1e-5)

        visual = reference_clip.visual
        grid = int(math.sqrt(visual.positional_embedding.shape[0] - 1))
        patch_pos = visual.positional_embedding[1:].T.reshape(1, -1, grid, grid)
        patch_pos = F.interpolate(patch_pos, (6, 6), mode="bicubic", align_corners=False).reshape(-1, 36).T
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1)
        x = visual.ln_pre(x + torch.cat([visual.positional_embedding[:1], patch_pos]))
        activations = []
        for index, block in enumerate(visual.transformer.resblocks):
            x = block(x)
            if index in TINY_EXTRACT_LAYERS:
                activations.append(x.transpose(0, 1))
        logits_reference = reference_decoder(activations, text_reference)
        logits_hf = model(pixel_values=pixels, conditional_embeddings=text_reference).logits
    assert logits_hf.shape == logits_reference.shape == (2, 96, 96)
    assert torch.allclose(logits_hf, logits_reference, atol=1e-5)


def test_torchscript_archive_is_read_without_running_it(tmp_path):
    reference = tiny_open_clip()
    scripted_path = tmp_path / "ViT-tiny-jit.pt"
    torch.jit.script(reference.half()).save(str(scripted_path))  # OpenAI's archives hold fp16 weights
    assert is_torchscript_archive(scripted_path)
    tensors = read_torchscript_state_dict(scripted_path)
    expected = reference.state_dict()
    assert set(expected) <= set(tensors)
    for key, tensor in expected.items():
        assert tensors[key].dtype == torch.float16 and torch.equal(tensors[key], tensor), key
    assert set(load_state_file(scripted_path)) == set(tensors)

    # A pickle that would call os.system is refused before anything runs.
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(str(marker)), protocol=2)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/code/__torch__/x.py", "")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        read_torchscript_state_dict(evil)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_decoder_pth_with_torchscript_clip_loads(tmp_path):
    reference_clip, reference_decoder = tiny_open_clip(), OriginalDecoder()
    torch.jit.script(reference_clip).save(str(tmp_path / "ViT-B-16.pt"))
    torch.save(reference_decoder.state_dict(), tmp_path / "rd64-uni-refined.pth")
    # ViT-B-16.pt next to the decoder weights is found without clip_path.
    masker = load_clipseg(tmp_path / "rd64-uni-refined.pth", image_size=64, **TINY_HEAD_ARGS)
    assert isinstance(masker, ClipSegMasker)
    state = masker.model.state_dict()
    assert torch.equal(state["clip.vision_model.embeddings.patch_embedding.weight"],
                       reference_clip.visual.conv1.weight)
    assert torch.equal(state["decoder.film_mul.weight"], reference_decoder.film_mul.weight)
    mask = masker.masks(_images()[:1], "a dog")[0]
    assert mask.shape == (40, 50)


def test_decoder_pth_with_transformers_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(5)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=TINY_HEADS, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=TINY_HEADS,
                           image_size=64, patch_size=16),
        projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip-vit-tiny")
    torch.save(OriginalDecoder().state_dict(), tmp_path / "rd.pth")
    # Head counts come from the folder's config.json (shapes alone cannot tell 2 heads from 1).
    masker = load_clipseg(tmp_path / "rd.pth", clip_path=tmp_path / "clip-vit-tiny", image_size=64,
                          extract_layers=TINY_EXTRACT_LAYERS, decoder_heads=TINY_HEADS)
    assert masker.model.config.vision_config.num_attention_heads == TINY_HEADS
    state, reference = masker.model.state_dict(), clip.state_dict()
    for key in ["vision_model.encoder.layers.2.self_attn.k_proj.weight", "text_projection.weight", "logit_scale",
                "text_model.final_layer_norm.bias"]:
        assert torch.equal(state[f"clip.{key}"], reference[key]), key
    ids = torch.tensor([[49406, 320, 1929, 49407]])
    with torch.no_grad():
        assert torch.allclose(masker.model.clip.get_text_features(input_ids=ids).pooler_output,
                              clip.get_text_features(input_ids=ids).pooler_output, atol=1e-6)


def test_missing_weights_name_the_downloads(tmp_path, monkeypatch):
    with pytest.raises(ClipSegWeightsNotFound) as missing:
        load_clipseg(tmp_path / "weights" / "rd64-uni-refined.pth")
    message = str(missing.value)
    assert "wget https://owncloud.gwdg.de/index.php/s/ioHbRzFx6th32hn/download -O ./clipseg/weights.zip" in message
    assert "unzip -d ./clipseg/weights -j ./clipseg/weights.zip" in message
    assert "CIDAS/clipseg-rd64-refined" in message and "ViT-B-16.pt" in message

    # Decoder present but no CLIP backbone anywhere: the error says which file and where.
    torch.save(OriginalDecoder().state_dict(), tmp_path / "rd64-uni-refined.pth")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # keep a real ~/.cache/clip/ViT-B-16.pt out of the search
    monkeypatch.setattr(clipseg.paths, "DEFAULT_WEIGHTS_DIR", tmp_path / "no-weights")
    with pytest.raises(ClipSegWeightsNotFound, match="CLIP ViT-B/16 backbone") as missing_clip:
        load_clipseg(tmp_path / "rd64-uni-refined.pth")
    assert "openaipublic.azureedge.net/clip/models" in str(missing_clip.value)
