"""Reward models (PickScore, CLIP score, HPSv2.1, Aesthetic v2.5, ImageReward) built tiny from configs,
saved in the published on-disk layout, loaded back through the real loaders, and checked against a
direct recomputation of each published definition."""

import math
import types

import pytest
import tiny_reward_models as tiny
import torch
import torch.nn.functional as F

from comfy_pec import PECError
from comfy_pec.encoders import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from trainer.config import ConfigError, load_config
from trainer.rewards import REWARDS, build_reward

PROMPTS = ["a red circle", "a photo of the cat", "a blue square on the dog", "a dog"]


def _normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return types.SimpleNamespace(
        clip=tiny.save_tiny_clip(root / "clip"),
        hps=tiny.save_tiny_hps(root / "hps"),
        aesthetic=tiny.save_tiny_aesthetic(root / "aesthetic"),
        imagereward=tiny.save_tiny_imagereward(root / "imagereward"),
    )


def _images(n: int, size: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- PickScore and CLIP score ---------------------------------------------------------------------


def _clip_cosine(directory, images, prompts):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(directory).eval()
    tok = CLIPTokenizer.from_pretrained(directory)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=_normalise(images, CLIP_MEAN, CLIP_STD)).pooler_output
        txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
    return F.cosine_similarity(img, txt, dim=-1), model.logit_scale.exp()


def test_pickscore_is_logit_scale_times_cosine(dirs):
    images = _images(4, 32)  # the tower's input size: preprocessing is the normalisation only
    reward = REWARDS["pickscore"](path=str(dirs.clip), device="cpu")
    cosine, scale = _clip_cosine(dirs.clip, images, PROMPTS)
    assert scale.item() == pytest.approx(100.0, rel=1e-3)
    torch.testing.assert_close(reward(images, PROMPTS), scale * cosine, rtol=1e-5, atol=1e-4)


def test_clip_score_is_clamped_cosine(dirs):
    images = _images(4, 32)
    cosine, _ = _clip_cosine(dirs.clip, images, PROMPTS)
    reward = REWARDS["clip_score"](path=str(dirs.clip), device="cpu")
    torch.testing.assert_close(reward(images, PROMPTS), cosine.clamp_min(0), rtol=1e-5, atol=1e-6)
    negative = reward.rule(torch.tensor([-0.3, 0.2]))
    assert negative.tolist() == pytest.approx([0.0, 0.2])


def test_pickscore_shapes_batching_and_layouts(dirs):
    images = _images(5, 40)
    prompts = (PROMPTS + PROMPTS)[:5]
    whole = REWARDS["pickscore"](path=str(dirs.clip), device="cpu")
    scores = whole(images, prompts)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    whole.batch_size = 2
    whole.tower.memo.clear()
    torch.testing.assert_close(whole(images, prompts), scores, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(whole(images.permute(0, 2, 3, 1), prompts), scores, rtol=1e-5, atol=1e-4)
    with pytest.raises(PECError, match="5 images but 4 prompts"):
        whole(images, prompts[:4])


# -- HPSv2.1 --------------------------------------------------------------------------------------


def test_hpsv21_is_cosine_of_the_open_clip_model(dirs):
    import open_clip
    from open_clip.model import CLIP

    images = _images(3, 32)
    model = CLIP(**tiny.HPS_CONFIG).eval()
    model.load_state_dict(torch.load(dirs.hps / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        img = model.encode_image(_normalise(images, CLIP_MEAN, CLIP_STD), normalize=True)
        txt = model.encode_text(open_clip.tokenize(PROMPTS[:3]), normalize=True)
    expected = (img * txt).sum(-1)
    reward = REWARDS["hpsv21"](path=str(dirs.hps), device="cpu")
    scores = reward(images, PROMPTS[:3])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores.abs().max() <= 1.0  # no logit scale (the checkpoint's is 3.0)
    from_file = REWARDS["hpsv21"](path=str(dirs.hps / "HPS_v2.1_compressed.pt"), device="cpu")  # the file itself
    torch.testing.assert_close(from_file(images, PROMPTS[:3]), expected, rtol=1e-5, atol=1e-6)


# -- Aesthetic v2.5 -------------------------------------------------------------------------------


def test_aesthetic_is_the_linear_head_on_normalised_siglip_pooled_features(dirs):
    from transformers import SiglipVisionModel

    images = _images(3, 28)
    encoder = SiglipVisionModel.from_pretrained(dirs.aesthetic).eval()
    head = torch.load(dirs.aesthetic / "aesthetic_predictor_v2_5.pth", weights_only=True)
    with torch.no_grad():
        x = F.normalize(encoder(pixel_values=_normalise(images, SIGLIP_MEAN, SIGLIP_STD)).pooler_output, dim=-1)
        for i in (0, 2, 4, 6, 8):  # no activation between the layers
            x = x @ head[f"scoring_head.{i}.weight"].T + head[f"scoring_head.{i}.bias"]
    reward = REWARDS["aesthetic"](path=str(dirs.aesthetic), device="cpu")
    scores = reward(images, ["ignored"] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, x.squeeze(-1), rtol=1e-5, atol=1e-5)


# -- ImageReward ----------------------------------------------------------------------------------


def _layer_norm(x, state, key, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"], eps)


def _linear(x, state, key):
    return x @ state[f"{key}.weight"].T + state[f"{key}.bias"]


def _attention(q, k, v, heads, mask=None):
    b, n, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        logits = logits + (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's extended mask
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def imagereward_reference(state, pixels, input_ids, attention_mask):
    """ImageReward's score from the original-layout state dict, written out op by op: BLIP ViT
    (timm blocks) → med BERT with cross-attention → [CLS] → MLP → (x - mean) / std."""
    v, w = "blip.visual_encoder.", tiny.IR_VISION["width"]
    x = F.conv2d(
        pixels, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=tiny.IR_VISION["patch"]
    )
    x = (
        torch.cat([state[v + "cls_token"].expand(len(x), 1, w), x.flatten(2).transpose(1, 2)], 1)
        + state[v + "pos_embed"]
    )
    for i in range(tiny.IR_VISION["depth"]):
        b = f"{v}blocks.{i}."
        q, k, val = _linear(_layer_norm(x, state, b + "norm1", 1e-6), state, b + "attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attention(q, k, val, w // 64), state, b + "attn.proj")
        x = x + _linear(
            F.gelu(_linear(_layer_norm(x, state, b + "norm2", 1e-6), state, b + "mlp.fc1")), state, b + "mlp.fc2"
        )
    image = _layer_norm(x, state, v + "norm", 1e-6)
    t, eps, heads = "blip.text_encoder.", 1e-12, tiny.IR_MED["num_attention_heads"]
    h = state[t + "embeddings.word_embeddings.weight"][input_ids]
    h = _layer_norm(
        h + state[t + "embeddings.position_embeddings.weight"][: input_ids.shape[1]],
        state,
        t + "embeddings.LayerNorm",
        eps,
    )
    for i in range(tiny.IR_MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, source, mask in (("attention", None, attention_mask), ("crossattention", image, None)):
            kv = h if source is None else source
            a = _attention(
                _linear(h, state, f"{b}{part}.self.query"),
                _linear(kv, state, f"{b}{part}.self.key"),
                _linear(kv, state, f"{b}{part}.self.value"),
                heads,
                mask,
            )
            h = _layer_norm(_linear(a, state, f"{b}{part}.output.dense") + h, state, f"{b}{part}.output.LayerNorm", eps)
        ff = _linear(F.gelu(_linear(h, state, b + "intermediate.dense")), state, b + "output.dense")
        h = _layer_norm(ff + h, state, b + "output.LayerNorm", eps)
    feature = h[:, 0]
    r = feature
    for i in (0, 2, 4, 6, 7):
        r = _linear(r, state, f"mlp.layers.{i}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072, feature


def test_imagereward_port_matches_the_original_architecture(dirs):
    from trainer.rewards.image_reward import MAX_LENGTH

    images = _images(3, 32)
    reward = REWARDS["imagereward"](path=str(dirs.imagereward), device="cpu")
    tokens = reward.tokenizer(
        PROMPTS[:3], padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    assert tokens.input_ids.shape == (3, 35) and (tokens.input_ids[:, 0] == reward.tokenizer.cls_token_id).all()
    assert len(reward.tokenizer) == len(tiny.BERT_VOCAB) + 2  # [DEC] and [ENC] added as in BLIP
    state = torch.load(dirs.imagereward / "ImageReward.pt", weights_only=True)
    with torch.no_grad():
        expected, feature = imagereward_reference(
            state, _normalise(images, CLIP_MEAN, CLIP_STD), tokens.input_ids, tokens.attention_mask
        )
    scores = reward(images, PROMPTS[:3])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reward.features(images, PROMPTS[:3]), feature, rtol=1e-4, atol=1e-4)


def test_imagereward_conversion_rejects_foreign_state_dicts(dirs, tmp_path):
    from trainer.rewards.image_reward import ImageRewardModel

    state = torch.load(dirs.imagereward / "ImageReward.pt", weights_only=True)
    med = {**tiny.IR_MED, "vocab_size": len(tiny.BERT_VOCAB) + 2}
    with pytest.raises(PECError, match="does not fit ImageReward"):
        ImageRewardModel.from_original({k: v for k, v in state.items() if not k.startswith("mlp.")}, med)
    with pytest.raises(PECError, match="not an ImageReward checkpoint"):
        ImageRewardModel.from_original({"visual.conv1.weight": torch.zeros(1)}, med)


# -- registry, config, errors ---------------------------------------------------------------------


def test_weighted_multi_reward_from_config_terms(dirs):
    cfg = load_config(
        "demo",
        None,
        [
            f"rewards=[{{name: pickscore, weight: 0.01, path: {dirs.clip}}}, {{name: hpsv21, weight: 2.0, path: {dirs.hps}}}]"
        ],
    )
    assert cfg.rewards[0].path == str(dirs.clip)
    reward = build_reward(cfg.rewards, device="cpu")
    images = _images(2, 32)
    total, parts = reward(images, PROMPTS[:2])
    assert set(parts) == {"pickscore", "hpsv21"}
    torch.testing.assert_close(total, 0.01 * parts["pickscore"] + 2.0 * parts["hpsv21"])
    with pytest.raises(ConfigError, match="unknown key rewards.0.paht; did you mean rewards.0.path"):
        load_config("demo", None, ["rewards=[{name: pickscore, paht: x}]"])


@pytest.mark.parametrize("name", ["pickscore", "clip_score", "hpsv21", "aesthetic", "imagereward"])
def test_bad_path_is_a_pec_error_naming_it(name, tmp_path, dirs):
    missing = tmp_path / "nowhere"
    with pytest.raises(PECError, match=str(missing)):
        REWARDS[name](path=str(missing), device="cpu")
    wrong = {
        "pickscore": dirs.hps,
        "clip_score": dirs.aesthetic,
        "hpsv21": dirs.clip,
        "aesthetic": dirs.clip,
        "imagereward": dirs.clip,
    }[name]
    with pytest.raises(PECError, match=str(wrong)):
        REWARDS[name](path=str(wrong), device="cpu")


def test_toy_rewards_take_no_path():
    with pytest.raises(PECError, match="model-free"):
        REWARDS["toy_preference"](path="x")
