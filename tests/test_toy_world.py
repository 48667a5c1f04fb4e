"""The embedded shapes world: data set determinism, grammar, prompt splits, and pixel rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.world.rewards import adherence_reward, preference_reward, to_image_tensor
from trainer.world.scenes import (
    COLOUR_NAMES,
    COLOURS,
    HELDOUT_COMBOS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    PromptSpec,
    Scene,
    ShapeObject,
    ShapesDataset,
    all_captions,
    caption,
    format_prompt,
    heldout_prompts,
    parse_prompt,
    render,
    sample_scene,
    scene_matches,
    spec_of,
    train_prompts,
)


def _scene(
    shape="circle", colour="red", size=0.25, cx=0.5, cy=0.5, rotation=0.0, saturation=1.0, bg=0.5, second=None
) -> Scene:
    return Scene(shape, colour, size, cx, cy, rotation, saturation, 0.0, (bg, bg, bg), second)


def _blur(images, sigma: float) -> torch.Tensor:
    x = to_image_tensor(images)
    rad = int(np.ceil(3 * sigma))
    t = torch.arange(-rad, rad + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (rad, rad, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, rad, rad), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


@pytest.fixture(scope="module")
def shape_colour_set():
    """Random scenes (free size/position/rotation/background) of every shape x colour, 2 each."""
    rng = np.random.default_rng(1234)
    images, truth = [], []
    for shape in SHAPES:
        for colour in COLOUR_NAMES:
            for _ in range(2):
                sc = sample_scene(rng, PromptSpec.simple(colour, shape))
                images.append(render(sc))
                truth.append((colour, shape))
    return np.stack(images), truth


def _confusion(images, truth) -> tuple[np.ndarray, np.ndarray]:
    """conf[i, j] = mean adherence of images of true shape i under prompt shape j (right colour);
    also the per-image score under the true prompt."""
    conf = np.zeros((len(SHAPES), len(SHAPES)))
    for j, s in enumerate(SHAPES):
        r = adherence_reward(images, [f"a {c} {s}" for c, _ in truth]).numpy()
        for i, s_true in enumerate(SHAPES):
            conf[i, j] = r[[k for k, (_, st) in enumerate(truth) if st == s_true]].mean()
    own = adherence_reward(images, [f"a {c} {s}" for c, s in truth]).numpy()
    return conf, own


# ----------------------------------------------------------------------------------------------
# data set
# ----------------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_order_independent():
    a = ShapesDataset(24, seed=7, as_tensor=False)
    b = ShapesDataset(24, seed=7, as_tensor=False)
    assert a.images().tobytes() == b.images().tobytes()
    assert a.captions() == b.captions()
    # item i depends only on (seed, i): reading backwards or alone gives the same bytes
    back = np.stack([b.image(i) for i in reversed(range(24))])[::-1]
    assert back.tobytes() == a.images().tobytes()
    assert ShapesDataset(100, seed=7, as_tensor=False).image(5).tobytes() == a.image(5).tobytes()
    c = ShapesDataset(24, seed=8, as_tensor=False)
    assert c.images().tobytes() != a.images().tobytes()
    assert c.captions() != a.captions()


def test_dataset_items_format():
    ds = ShapesDataset(8, seed=0)
    img, cap = ds[3]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32
    assert img.shape == (3, 64, 64) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert isinstance(cap, str) and parse_prompt(cap) == ds.spec(3)
    arr, cap2 = ShapesDataset(8, seed=0, as_tensor=False)[3]
    assert arr.dtype == np.uint8 and arr.shape == (64, 64, 3) and cap2 == cap
    assert torch.equal(img, torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0)
    assert ShapesDataset(2, seed=0, size=32, as_tensor=False).image(0).shape == (32, 32, 3)
    assert len(ds) == 8
    with pytest.raises(IndexError):
        ds[8]


def test_dataset_scenes_match_their_captions():
    ds = ShapesDataset(300, seed=3, split="all", p_second=0.3, p_size=0.5, p_position=0.5)
    forms = set()
    for i in range(len(ds)):
        sc, spec = ds.scene(i), ds.spec(i)
        assert scene_matches(sc, spec), (i, ds.caption(i), sc)
        o = spec.objects[0]
        forms.add((len(spec.objects), spec.relation, o.size is not None, o.position is not None))
    assert len(forms) >= 8  # every grammar form occurs


def test_render_antialiased_and_in_frame():
    img = render(_scene(size=0.3, bg=0.5)).astype(int)
    grey = round(0.5 * 255)
    # anti-aliased: intermediate values on the edge
    n_edge = np.sum((img[..., 1] != grey) & (img[..., 1] != img[32, 32, 1]))
    assert n_edge > 20
    # the border stays background (objects keep MARGIN inside the frame)
    rng = np.random.default_rng(0)
    for _ in range(50):
        sc = sample_scene(rng)
        im = render(sc).astype(int)
        bg = np.rint(np.asarray(sc.background) * 255).astype(int)
        assert np.abs(im[0] - bg).max() <= 1 and np.abs(im[:, -1] - bg).max() <= 1


# ----------------------------------------------------------------------------------------------
# grammar
# ----------------------------------------------------------------------------------------------


def test_every_caption_parses_back_to_its_spec():
    caps = all_captions("all")
    assert len(caps) == len(set(caps))
    n_single = len(COLOURS) * len(SHAPES) * (1 + len(SIZE_WORDS)) * (1 + len(POSITIONS))
    n_pair = (len(COLOURS) * len(SHAPES)) * (len(COLOURS) - 1) * len(SHAPES) * len(RELATIONS)
    assert len(caps) == n_single + n_pair
    for text in caps:
        spec = parse_prompt(text)
        assert format_prompt(spec) == text


@pytest.mark.parametrize("mention", [(), ("size",), ("position",), ("size", "position"), ("relation",)])
def test_scene_captions_parse_and_match(mention):
    rng = np.random.default_rng(5)
    for _ in range(60):
        sc = sample_scene(rng)
        text = caption(sc, mention)
        spec = parse_prompt(text)
        assert spec == spec_of(sc, mention)
        assert scene_matches(sc, spec), (text, sc)


def test_parser_is_tolerant_and_strict_where_it_matters():
    assert parse_prompt("A Red Circle.") == PromptSpec.simple("red", "circle")
    assert parse_prompt("an image of a big blue star in the center") == PromptSpec.simple(
        "blue", "star", "large", "centre"
    )
    two = parse_prompt("a green triangle and a yellow star")
    assert two.relation == "and" and [o.shape for o in two.objects] == ["triangle", "star"]
    assert parse_prompt("a red square to the left of a cyan ring").relation == "left_of"
    assert parse_prompt("a red square below a cyan ring").relation == "below"
    assert parse_prompt("a red circle on the left").objects[0].position == "left"
    for bad in ["a circle", "a red thing", "", "a red blue circle"]:
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_train_and_heldout_prompts():
    train, held = train_prompts(), heldout_prompts()
    assert len(held) >= 5 and len(train) >= 20
    assert not set(train) & set(held)
    assert not set(train_prompts(True)) & set(heldout_prompts(True))
    assert set(train) <= set(train_prompts(True))
    train_words = {w for p in train for w in p.split()}
    assert {w for p in held for w in p.split()} <= train_words  # known words only
    held_pairs = {(parse_prompt(p).colour, parse_prompt(p).shape) for p in held}
    assert held_pairs == set(HELDOUT_COMBOS)
    # the training split never draws a held-out (colour, shape), not even as a second object
    ds = ShapesDataset(400, seed=11, split="train", p_second=0.5)
    for i in range(len(ds)):
        for o in ds.spec(i).objects:
            assert (o.colour, o.shape) not in held_pairs
    dh = ShapesDataset(50, seed=11, split="heldout")
    assert all((dh.spec(i).colour, dh.spec(i).shape) in held_pairs for i in range(50))


def test_unmentioned_attributes_vary():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, "a red circle") for _ in range(64)]
    assert all(scene_matches(s, "a red circle") for s in scenes)
    pos = {(round(s.cx, 1), round(s.cy, 1)) for s in scenes}
    sizes = np.array([s.size for s in scenes])
    assert len(pos) >= 20
    assert sizes.max() - sizes.min() > 0.15 and len({round(v, 2) for v in sizes}) >= 15
    assert len({round(s.bg_luma, 2) for s in scenes}) >= 32
    assert len({round(s.saturation, 2) for s in scenes}) >= 16
    imgs = np.stack([render(s) for s in scenes])
    assert len({im.tobytes() for im in imgs}) == 64
    sq = [sample_scene(rng, "a blue square") for _ in range(64)]
    assert len({round(s.rotation) for s in sq}) >= 30
    # a named attribute is pinned, the others still vary
    named = [sample_scene(rng, "a small green star on the left") for _ in range(64)]
    assert all(s.size <= 0.18 and s.cx <= 0.38 for s in named)
    assert np.ptp([s.cy for s in named]) > 0.4 and np.ptp([s.rotation for s in named]) > 40
    pairs = [sample_scene(rng, "a red circle and a blue square") for _ in range(64)]
    assert all(scene_matches(s, "a red circle and a blue square") for s in pairs)
    horizontal = [abs(s.cx - s.second.cx) > abs(s.cy - s.second.cy) for s in pairs]
    assert 10 < sum(horizontal) < 54  # both layouts occur


# ----------------------------------------------------------------------------------------------
# adherence
# ----------------------------------------------------------------------------------------------


def test_adherence_red_circle_vs_blue_square():
    red_circle = render(_scene("circle", "red"))
    red_square = render(_scene("square", "red"))
    r = adherence_reward(
        np.stack([red_circle, red_circle, red_square]), ["a red circle", "a blue square", "a red circle"]
    )
    assert r.dtype == torch.float32 and r.shape == (3,)
    assert r[0] >= 0.8
    assert r[1] <= 0.2
    assert r[2] <= r[0] - 0.4  # right colour, wrong shape: partial credit only
    assert r[2] >= 0.1


def test_adherence_confusion_matrix(shape_colour_set):
    images, truth = shape_colour_set
    conf, own = _confusion(images, truth)
    assert own.min() >= 0.8
    diag = np.diag(conf)
    off = conf[~np.eye(len(SHAPES), dtype=bool)]
    assert diag.min() >= 0.9
    assert off.max() <= 0.45
    # per image: the true shape beats every wrong shape by a clear margin
    for s in SHAPES:
        wrong = adherence_reward(images, [f"a {c} {s}" for c, _ in truth]).numpy()
        mask = np.array([st != s for _, st in truth])
        assert (own[mask] - wrong[mask]).min() >= 0.3
    # wrong colour (right shape) scores low, for every shift of the palette
    for shift in range(1, len(COLOUR_NAMES)):
        prompts = [f"a {COLOUR_NAMES[(COLOUR_NAMES.index(c) + shift) % 6]} {s}" for c, s in truth]
        assert adherence_reward(images, prompts).max() <= 0.2


def test_adherence_robust_to_blur_and_noise(shape_colour_set):
    images, truth = shape_colour_set
    g = torch.Generator().manual_seed(0)
    blurred = _blur(images, 0.8)
    noisy = (to_image_tensor(images) + 0.03 * torch.randn(blurred.shape, generator=g)).clamp(0, 1)
    both = (blurred + 0.02 * torch.randn(blurred.shape, generator=g)).clamp(0, 1)
    for x in (blurred, noisy, both):
        conf, own = _confusion(x, truth)
        assert own.min() >= 0.7
        assert np.diag(conf).min() >= 0.85
        assert conf[~np.eye(len(SHAPES), dtype=bool)].max() <= 0.5


def test_adherence_attributes_and_relations():
    big_left = render(_scene("circle", "red", size=0.28, cx=0.32, cy=0.5))
    small_right = render(_scene("circle", "red", size=0.13, cx=0.8, cy=0.3))
    imgs = np.stack([big_left, small_right])
    for good, bad in [
        ("a large red circle", "a small red circle"),
        ("a red circle on the left", "a red circle on the right"),
    ]:
        r_good = adherence_reward(big_left, good)
        r_bad = adherence_reward(big_left, bad)
        assert r_good >= 0.9 and r_bad <= r_good - 0.3
    r = adherence_reward(imgs, ["a small red circle at the top", "a small red circle at the top"])
    assert r[1] >= 0.9 and r[0] <= 0.5
    pair = render(
        _scene(
            "circle", "red", size=0.15, cx=0.25, cy=0.5, second=ShapeObject("square", "blue", 0.15, 0.75, 0.45, 20.0)
        )
    )
    r = adherence_reward(
        np.stack([pair] * 5),
        [
            "a red circle and a blue square",
            "a red circle to the left of a blue square",
            "a blue square to the right of a red circle",
            "a red circle to the right of a blue square",
            "a red circle above a blue square",
        ],
    )
    assert r[:3].min() >= 0.9 and r[3:].max() <= 0.5
    r = adherence_reward(
        np.stack([pair, render(_scene("circle", "red"))]),
        ["a red circle and a blue star", "a red circle and a blue square"],
    )
    assert r.max() <= 0.7  # a wrong or missing second object costs a lot


def test_dataset_images_score_high_for_their_own_captions():
    ds = ShapesDataset(128, seed=21, split="all", p_second=0.3, p_size=0.5, p_position=0.5, as_tensor=False)
    imgs, caps = ds.images(), ds.captions()
    own = adherence_reward(imgs, caps)
    assert own.min() >= 0.85 and own.mean() >= 0.95
    shifted = adherence_reward(imgs, caps[1:] + caps[:1])
    differ = torch.tensor([a != b for a, b in zip(caps, caps[1:] + caps[:1])])
    assert shifted[differ].mean() <= 0.15


# ----------------------------------------------------------------------------------------------
# preference
# ----------------------------------------------------------------------------------------------


def test_preference_prefers_large_centred_saturated():
    best = render(_scene("circle", "red", size=0.3, cx=0.5, cy=0.5, saturation=1.0, bg=0.12))
    worst = render(_scene("circle", "red", size=0.12, cx=0.2, cy=0.78, saturation=0.65, bg=0.5))
    r = preference_reward(np.stack([best, worst]), ["a red circle"] * 2)
    assert r[0] >= 0.9 and r[0] - r[1] >= 0.4


@pytest.mark.parametrize(
    "attr,values,direction",
    [
        ("size", [0.11, 0.15, 0.19, 0.23, 0.27, 0.30], +1),
        ("cx", [0.5, 0.55, 0.6, 0.65, 0.7, 0.75], -1),
        ("saturation", [0.6, 0.7, 0.8, 0.9, 1.0], +1),
        ("bg", [0.12, 0.2, 0.3, 0.4, 0.5], -1),  # towards the trough between the two optima
        ("bg", [0.5, 0.6, 0.7, 0.8, 0.88], +1),
        ("rotation", [0.0, 9.0, 18.0, 27.0, 36.0], -1),
    ],
)
@pytest.mark.parametrize("shape", ["circle", "star"])
def test_preference_is_monotone_along_sweeps(attr, values, direction, shape):
    if attr == "rotation" and shape == "circle":
        shape = "square"
    base = {"shape": shape, "colour": "blue", "size": 0.24, "cx": 0.5, "cy": 0.5, "saturation": 0.9, "bg": 0.4}
    imgs = np.stack([render(_scene(**{**base, attr: v})) for v in values])
    r = preference_reward(imgs, [f"a blue {shape}"] * len(values)).numpy()
    steps = np.diff(r) * direction
    assert (steps > 0).all(), r


def test_preference_optimum_has_two_modes():
    rng = np.random.default_rng(4)
    data = np.stack([render(sample_scene(rng, "a green square")) for _ in range(64)])
    r_data = preference_reward(data, "a green square")
    dark, mid, light = (render(_scene("square", "green", size=0.3, saturation=1.0, bg=bg)) for bg in (0.12, 0.5, 0.88))
    r_dark, r_mid, r_light = preference_reward(np.stack([dark, mid, light]), "a green square")
    assert min(r_dark, r_light) > r_data.max()
    assert abs(r_dark - r_light) < 0.02  # equally good peaks, a trough between them
    assert max(r_dark, r_light) - r_mid > 0.1
    assert float(r_data.std()) > 0.05  # the free attributes spread the reward: GRPO can climb it
    # without prompts the best-matching shape is used: same answer for single objects
    assert torch.allclose(preference_reward(data), r_data, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# robustness, conventions, speed
# ----------------------------------------------------------------------------------------------


def test_degenerate_images_do_not_produce_nan():
    rng = np.random.default_rng(0)
    imgs = np.stack(
        [
            np.zeros((64, 64, 3), np.uint8),
            np.full((64, 64, 3), 255, np.uint8),
            np.full((64, 64, 3), 128, np.uint8),
            rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            np.clip(128 + 8 * rng.standard_normal((64, 64, 3)), 0, 255).astype(np.uint8),
            np.broadcast_to(np.array(COLOURS["red"], np.uint8), (64, 64, 3)),
        ]
    )
    for prompts in (["a red circle"] * 6, ["a red circle and a blue square"] * 6):
        a = adherence_reward(imgs, prompts)
        p = preference_reward(imgs, prompts)
        for r in (a, p):
            assert torch.isfinite(r).all() and r.min() >= 0 and r.max() <= 1
        assert a[:5].max() <= 0.2  # nothing red there
        assert p[:5].max() <= 0.2  # no object: no preference
    assert torch.isfinite(preference_reward(imgs)).all()
    nan_img = torch.full((1, 3, 64, 64), float("nan"))
    assert torch.isfinite(adherence_reward(nan_img, "a red circle")).all()


def test_input_conventions_agree():
    ds = ShapesDataset(6, seed=2, as_tensor=False)
    u8 = ds.images()
    caps = ds.captions()
    f_chw = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    for fn in (adherence_reward, preference_reward):
        ref = fn(u8, caps)
        assert torch.allclose(fn(f_chw, caps), ref, atol=1e-6)
        assert torch.allclose(fn(list(u8), caps), ref, atol=1e-6)
        assert torch.allclose(fn(torch.from_numpy(u8), caps), ref, atol=1e-6)
        assert torch.allclose(fn(u8[0], caps[0]), ref[:1], atol=1e-6)
        assert torch.equal(fn(u8, [parse_prompt(c) for c in caps]), ref)
        assert torch.equal(fn(u8, caps), ref)  # deterministic
    torch.set_num_threads(2)
    r, terms = adherence_reward(u8, caps, return_terms=True)
    assert torch.get_num_threads() == 2  # the single-threaded section restores the setting
    assert {"colour", "shape", "attributes", "relation", "purity"} <= set(terms)
    r, terms = preference_reward(u8, caps, return_terms=True)
    assert {"size", "centre", "saturation", "background", "upright", "objectness"} <= set(terms)
    with pytest.raises(ValueError):
        adherence_reward(u8, caps[:2])
    with pytest.raises(ValueError):
        adherence_reward(u8[:1], "a red thing")


def test_rewards_work_at_other_resolutions():
    for size in (32, 128):
        ds = ShapesDataset(24, seed=9, size=size, split="all", as_tensor=False)
        r = adherence_reward(ds.images(), ds.captions())
        assert r.min() >= 0.7 and r.mean() >= 0.9
        assert torch.isfinite(preference_reward(ds.images(), ds.captions())).all()
