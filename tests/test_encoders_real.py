"""Real perceptual encoders (DINOv2, CLIP, PickScore image tower) built tiny from configs, saved, and
loaded back through `load_encoder`: features, torch preprocessing, gradients, sharing with the
PickScore reward, the features memo, and errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_reward_models as tiny
import torch
import torch.nn.functional as F

from comfy_pec import PECError
from comfy_pec.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, FeatureMemo, Preprocess, load_encoder
from trainer.rewards import REWARDS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {"clip": tiny.save_tiny_clip(root / "clip"), "dinov2": tiny.save_tiny_dinov2(root / "dinov2")}


def _path(dirs, name):
    return dirs["clip" if name == "pickscore" else name]


def _images(n, h, w, seed=5):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _normalise(images, mean, std):
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_dinov2_is_the_cls_token_after_the_final_norm(dirs):
    from transformers import Dinov2Model

    images = _images(2, 256, 256)  # the resize size: preprocessing is the central 224² crop, normalised
    model = Dinov2Model.from_pretrained(dirs["dinov2"]).eval()
    with torch.no_grad():
        crop = images[..., 16:240, 16:240]
        hidden = model(pixel_values=_normalise(crop, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state
    raw = load_encoder("dinov2", normalize=False, path=str(dirs["dinov2"]))(images)
    torch.testing.assert_close(raw, hidden[:, 0], rtol=1e-5, atol=1e-5)  # last_hidden_state is after the norm
    assert load_encoder("dinov2", path=str(dirs["dinov2"])).pixels == Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("name", ["clip", "pickscore"])
def test_clip_encoders_are_the_projected_image_embeds(dirs, name):
    from transformers import CLIPModel

    images = _images(3, 32, 32)
    model = CLIPModel.from_pretrained(_path(dirs, name)).eval()
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=_normalise(images, CLIP_MEAN, CLIP_STD)).pooler_output
    encoder = load_encoder(name, path=str(_path(dirs, name)))
    assert encoder.dim == 16 and encoder.name == name
    torch.testing.assert_close(encoder(images), F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dinov2", "clip", "pickscore"])
def test_shapes_layouts_batching_and_gradients(dirs, name):
    encoder = load_encoder(name, path=str(_path(dirs, name)))
    images = _images(3, 40, 56)
    feats = encoder(images)
    assert feats.shape == (3, encoder.dim) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(encoder(images.permute(0, 2, 3, 1)), feats)  # ComfyUI [B, H, W, 3]
    single = torch.cat([encoder(images[i].clone()) for i in range(3)])
    torch.testing.assert_close(single, feats, rtol=1e-5, atol=1e-5)
    pixels = images.clone().requires_grad_(True)
    encoder(pixels)[:, 0].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0  # resize + crop + normalise in torch
    assert not any(p.requires_grad for p in encoder.parameters())


def test_preprocessing_matches_the_published_image_processor():
    """Resize (shortest side, bicubic, antialiased) + center crop + normalise vs transformers' PIL-based
    CLIPImageProcessor on a smooth 8-bit image: equal up to PIL's 8-bit rounding (≤ 1.5/255)."""
    from transformers import CLIPImageProcessor

    coarse = torch.rand(1, 3, 6, 9, generator=torch.Generator().manual_seed(0))
    image = (F.interpolate(coarse, size=(48, 72), mode="bilinear", align_corners=False) * 255).round() / 255
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(
        images=(image[0].permute(1, 2, 0) * 255).round().byte().numpy(), return_tensors="pt"
    ).pixel_values
    ours = Preprocess(32, resize=32, mean=CLIP_MEAN, std=CLIP_STD)(image)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    pixel_error = (ours - expected).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    assert pixel_error.max() < 1.5 and pixel_error.mean() < 0.5


def test_pickscore_encoder_and_reward_share_the_tower_and_the_embedding(dirs):
    encoder = load_encoder("pickscore", path=str(dirs["clip"]))
    reward = REWARDS["pickscore"](path=str(dirs["clip"]), device="cpu")
    assert reward.tower is encoder.tower  # loaded once
    calls = []
    hook = encoder.tower.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        images = _images(6, 32, 32)
        reward(images, ["a dog"] * 6)
        assert len(calls) == 1
        feats = torch.cat([encoder(chunk) for chunk in images.split(4)])  # train.py's chunked embedding
        assert len(calls) == 1  # both chunks are rows of the scored batch: no second embedding
        torch.testing.assert_close(feats, F.normalize(encoder.tower.memo.lookup(images), dim=-1))
        images.mul_(0.5)  # an in-place write bumps the version: recomputed
        encoder(images)
        assert len(calls) == 2
        encoder(images.clone())  # same pixels, other memory: recomputed (a memo hit needs the same tensor)
        assert len(calls) == 3
    finally:
        hook.remove()


def test_feature_memo_lookup_rules():
    memo = FeatureMemo()
    images = torch.rand(6, 3, 4, 4)
    memo.store(images, torch.arange(6.0)[:, None])
    assert memo.lookup(images).flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert memo.lookup(images[2:5]).flatten().tolist() == [2, 3, 4]
    assert memo.lookup(images[:, :, :2]) is None  # not a row range
    assert memo.lookup(images[::2]) is None
    assert memo.lookup(images.permute(0, 2, 3, 1)) is None
    assert memo.lookup(torch.rand(6, 3, 4, 4)) is None


def test_bad_paths_are_pec_errors_naming_the_path(dirs, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(PECError, match=f"{missing} is not a directory"):
        load_encoder("clip", path=str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PECError, match=f"{empty} is not a model directory"):
        load_encoder("dinov2", path=str(empty))
    with pytest.raises(PECError, match=f"{dirs['clip']} holds a 'clip' model, expected 'dinov2'"):
        load_encoder("dinov2", path=str(dirs["clip"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(PECError, match=str(broken)):
        load_encoder("pickscore", path=str(broken))
    with pytest.raises(PECError, match="unknown perceptual encoder"):
        load_encoder("dino")


def test_importing_encoders_stays_cheap():
    code = "import comfy_pec.encoders, sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in mods if m.split(".")[0] in ("transformers", "open_clip", "diffusers", "trainer")]


def test_memo_is_bypassed_for_inference_tensors(dirs):
    encoder = load_encoder("clip", path=str(dirs["clip"]))
    with torch.inference_mode():
        images = _images(2, 32, 32)
        first = encoder(images)
        torch.testing.assert_close(encoder(images), first)
