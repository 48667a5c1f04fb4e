"""The LoRA file layout (docs/design.md §8): diffusers and ComfyUI load what save_lora writes at the trained
strength, the header says what it should, and no bad file gets past load_lora/inspect_lora as
anything but one LoraFormatError."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import tiny_models as tm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import (
    FAMILIES,
    assert_close,
    captured_log,
    comfy_forward,
    comfy_model,
    forward,
    fresh_pipeline,
    key_warnings,
)

import comfy_pec
from comfy_pec import lora_format
from comfy_pec.lora_format import (
    LoraFormatError,
    format_lora_info,
    guess_architecture,
    inspect_lora,
    load_lora,
    lora_key_coverage,
    module_path,
    save_lora,
)
from trainer import cli

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def lora_modules_in(model: torch.nn.Module) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def file_modules(tensors) -> set[str]:
    return {module_path(k) for k in tensors if k.endswith(".lora_A.weight")}


def adapter_config(metadata: dict) -> dict:
    return json.loads(metadata["lora_adapter_metadata"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per family: (LoRA-adapted model, reference output, base output, fp32 file path)."""
    out = {}
    folder = tmp_path_factory.mktemp("trained")
    for family, (build, inputs, _, targets) in FAMILIES.items():
        base = forward(build(), inputs())
        model = tm.add_random_lora(build(), r=4, alpha=8, targets=targets)
        ref = forward(model, inputs())
        path = folder / f"{family}.safetensors"
        save_lora(
            model, path, dtype=torch.float32, base_model=f"tiny/{family}", provenance={"method": "pec", "beta": 0.05}
        )
        out[family] = (model, ref, base, path)
    return out


# ----------------------------------------------------------------------------- diffusers round trip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_loads_the_file_at_trained_strength(trained, family):
    model, ref, base, path = trained[family]
    assert (ref - base).abs().max() > 1e-2 * ref.abs().max(), "the random LoRA should change the output"
    pipe = fresh_pipeline(family)
    with captured_log("diffusers") as messages:
        pipe.load_lora_weights(str(path))
    assert key_warnings(messages) == []
    assert_close(forward(pipe.transformer, FAMILIES[family][1]()), ref, rel=1e-5)
    tensors, _ = load_lora(path)
    assert lora_modules_in(pipe.transformer) == file_modules(tensors) == lora_modules_in(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_file_loads_close(trained, tmp_path, family):
    model, ref, _, _ = trained[family]
    path = tmp_path / "bf16.safetensors"
    save_lora(model, path)  # bf16 is the default
    tensors, _ = load_lora(path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    pipe = fresh_pipeline(family)
    pipe.load_lora_weights(str(path))
    assert_close(forward(pipe.transformer, FAMILIES[family][1]()), ref, rel=3e-2)


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, alpha=6, rank_pattern={"to_q": 2, "add_k_proj": 8}, alpha_pattern={"to_k": 3, "add_k_proj": 5}),
        dict(r=4, alpha=3, use_rslora=True),
    ],
    ids=["rank+alpha patterns", "rslora"],
)
def test_per_module_scales_are_baked(tmp_path, config):
    model = tm.add_random_lora(tm.tiny_sd3_transformer(), **config)
    ref = forward(model, tm.sd3_inputs())
    path = tmp_path / "lora.safetensors"
    metadata = save_lora(model, path, dtype=torch.float32)

    adapter = adapter_config(metadata)
    assert adapter["transformer.lora_alpha"] == adapter["transformer.r"]
    assert adapter["transformer.alpha_pattern"] == adapter["transformer.rank_pattern"]
    assert adapter["transformer.use_rslora"] is False
    if "rank_pattern" in config:
        assert adapter["transformer.rank_pattern"]["^transformer_blocks.0.attn.add_k_proj"] == 8
    pipe = fresh_pipeline("sd3.5-medium", transformer=tm.tiny_sd3_transformer())
    with captured_log("diffusers") as messages:
        pipe.load_lora_weights(str(path))
    assert key_warnings(messages) == []
    assert_close(forward(pipe.transformer, tm.sd3_inputs()), ref, rel=1e-5)


def test_peft_model_wrapper_gives_the_same_file(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=tm.ATTENTION_TARGETS)
    wrapped = tm.randomize_lora(get_peft_model(tm.tiny_sd3_transformer(), config))
    plain = tm.randomize_lora(tm.tiny_sd3_transformer())
    plain.add_adapter(config)
    plain.load_state_dict({k.removeprefix("base_model.model."): v for k, v in wrapped.state_dict().items()})
    a, b = tmp_path / "wrapped.safetensors", tmp_path / "plain.safetensors"
    save_lora(wrapped, a, dtype=torch.float32)
    save_lora(plain, b, dtype=torch.float32)
    ta, tb = load_lora(a)[0], load_lora(b)[0]
    assert ta.keys() == tb.keys() and all(k.startswith("transformer.transformer_blocks.") for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_dora_is_refused(tmp_path):
    from peft import LoraConfig

    model = tm.tiny_sd3_transformer()
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(LoraFormatError, match="DoRA"):
        save_lora(model, tmp_path / "dora.safetensors")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- tensor dicts and metadata


def _tensor_dict(rank=4):
    g = torch.Generator().manual_seed(0)
    return {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(rank, 128, generator=g),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, rank, generator=g),
        "base_model.model.transformer_blocks.1.attn.add_v_proj.lora_A.weight": torch.randn(rank, 128, generator=g),
        "base_model.model.transformer_blocks.1.attn.add_v_proj.lora_B.weight": torch.randn(128, rank, generator=g),
    }


def test_tensor_dict_save_writes_the_design_layout(tmp_path):
    source = _tensor_dict()
    path = tmp_path / "pec_lora.safetensors"
    provenance = {
        "method": "pec",
        "beta": 0.05,
        "encoder": "dinov2",
        "rewards": ["pickscore"],
        "noise_level": 0.7,
        "group_size": 24,
        "global_step": 300,
        "config_hash": "abc123",
        "eval": {"vendi_dino": 4.2},
    }
    written = save_lora(
        source,
        path,
        rank=4,
        alpha=8,
        dtype=torch.float32,
        base_model="stabilityai/stable-diffusion-3.5-medium",
        title="Diverse portraits",
        resolution=1024,
        license="stabilityai-ai-community",
        usage_hint="strength 1.0",
        provenance=provenance,
    )
    assert sorted(os.listdir(tmp_path)) == ["pec_lora.safetensors"], "no temporary file may remain"
    tensors, metadata = load_lora(path)
    assert metadata == written

    assert sorted(tensors) == [
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
        "transformer.transformer_blocks.1.attn.add_v_proj.lora_A.weight",
        "transformer.transformer_blocks.1.attn.add_v_proj.lora_B.weight",
    ]
    q = "transformer.transformer_blocks.0.attn.to_q"
    assert torch.equal(tensors[q + ".lora_A.weight"], source[q + ".lora_A.weight"])
    assert torch.allclose(tensors[q + ".lora_B.weight"], 2.0 * source[q + ".lora_B.weight"])  # alpha/r baked

    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["format"] == "pt"
    adapter = adapter_config(metadata)
    assert all(k.startswith("transformer.") for k in adapter)
    assert adapter["transformer.r"] == adapter["transformer.lora_alpha"] == 4
    assert adapter["transformer.target_modules"] == [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.add_v_proj",
    ]
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v3-medium/lora"  # no attn2, 2 blocks: "sd3"
    assert metadata["modelspec.implementation"] == "diffusers"
    assert metadata["modelspec.title"] == "Diverse portraits"
    assert metadata["modelspec.resolution"] == "1024x1024"
    assert metadata["modelspec.license"] == "stabilityai-ai-community"
    assert metadata["modelspec.usage_hint"] == "strength 1.0"
    assert metadata["modelspec.date"][:2] == "20" and "T" in metadata["modelspec.date"]
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_base_model_version"]) == (
        "4",
        "4",
        "sd3",
    )
    assert metadata["pec.base_model_id"] == "stabilityai/stable-diffusion-3.5-medium"
    assert metadata["pec.trainer_version"] == comfy_pec.__version__
    assert metadata["pec.method"] == "pec" and metadata["pec.config_hash"] == "abc123"
    assert json.loads(metadata["pec.beta"]) == 0.05 and json.loads(metadata["pec.rewards"]) == ["pickscore"]
    assert json.loads(metadata["pec.eval"]) == {"vendi_dino": 4.2}

    info = inspect_lora(path)
    assert info.provenance["eval"] == {"vendi_dino": 4.2} and info.provenance["group_size"] == 24
    assert info.architecture == "sd3" and info.scale_baked and not info.architecture_mismatch


def test_explicit_architecture_and_flux_schnell(tmp_path):
    metadata = save_lora(
        _tensor_dict(), tmp_path / "a.safetensors", alpha=4, architecture="flux", base_model="x/FLUX.1-schnell"
    )
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"
    assert metadata["ss_base_model_version"] == "flux1"
    info = inspect_lora(tmp_path / "a.safetensors")
    assert info.architecture_mismatch and "declares flux-1-schnell/lora" in " ".join(info.notes)
    with pytest.raises(ValueError, match="architecture"):
        save_lora(_tensor_dict(), tmp_path / "b.safetensors", alpha=4, architecture="sdxl")
    with pytest.raises(ValueError, match="dtype"):
        save_lora(_tensor_dict(), tmp_path / "b.safetensors", alpha=4, dtype=torch.int8)


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_lora(_tensor_dict(), path, alpha=4)
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora_format.safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_lora(_tensor_dict(), path, alpha=4)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["lora.safetensors"]


@pytest.mark.parametrize(
    "mutate, kwargs, error, match",
    [
        (lambda d: d, {}, ValueError, "alpha"),
        (lambda d: d, {"rank": 8, "alpha": 8}, LoraFormatError, "rank 4, but rank=8"),
        (
            lambda d: {k: v for k, v in d.items() if "to_q.lora_B" not in k},
            {"alpha": 4},
            LoraFormatError,
            "no matching lora_B",
        ),
        (lambda d: {**d, "x.alpha": torch.tensor(4.0)}, {"alpha": 4}, LoraFormatError, "not lora_A/lora_B"),
        (
            lambda d: {**d, "m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(3, 5)},
            {"alpha": 4},
            LoraFormatError,
            "rank mismatch",
        ),
        (lambda d: {}, {"alpha": 4}, LoraFormatError, "no lora_A/lora_B pairs"),
    ],
    ids=["no alpha", "rank differs", "orphan A", "alpha tensor", "rank mismatch", "empty"],
)
def test_tensor_dict_errors(tmp_path, mutate, kwargs, error, match):
    with pytest.raises(error, match=match):
        save_lora(mutate(_tensor_dict()), tmp_path / "x.safetensors", **kwargs)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- architecture, inspect, coverage


def test_guess_architecture():
    from peft.utils import get_peft_model_state_dict

    sd35m, sd3, flux = tm.tiny_sd35m_transformer(), tm.tiny_sd3_transformer(), tm.tiny_flux_transformer()
    assert guess_architecture(sd35m.state_dict()) == "sd3.5-medium"
    assert guess_architecture(sd3.state_dict()) == "sd3"
    assert guess_architecture(flux.state_dict()) == "flux"
    for model, expected in ((sd35m, "sd3.5-medium"), (sd3, "sd3"), (flux, "flux")):
        tm.add_random_lora(model, targets=tm.FLUX_TARGETS if expected == "flux" else tm.ATTENTION_TARGETS)
        lora = {"transformer." + k: v for k, v in get_peft_model_state_dict(model).items()}
        assert guess_architecture(lora) == expected
    block30 = {"transformer.transformer_blocks.30.attn.to_q.lora_A.weight": (4, 1536)}
    assert guess_architecture(block30) == "sd3.5-large"
    assert guess_architecture({"transformer_blocks.3.attn.to_k.lora_A.weight": (4, 2432)}) == "sd3.5-large"
    assert guess_architecture({"transformer_blocks.3.attn.to_k.lora_A.weight": (4, 3072)}) == "flux"
    assert guess_architecture({"transformer_blocks.3.attn.to_k.lora_A.weight": (4, 1536)}) == "sd3"
    assert guess_architecture({"down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}) == "unknown"
    assert guess_architecture({"single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 1536)}) == "flux"


def test_inspect_and_format(trained):
    _, _, _, path = trained["flux"]
    info = inspect_lora(path)
    assert (info.architecture, info.declared_architecture, info.architecture_mismatch) == (
        "flux",
        "flux-1-dev/lora",
        False,
    )
    assert info.rank == 4 and info.ranks == [4] and info.module_count == 18 and info.dtypes == ["F32"]
    assert info.module_kinds["transformer_blocks.*.attn.to_q"] == 1
    assert info.module_kinds["single_transformer_blocks.*.proj_mlp"] == 1
    assert info.scale_baked and info.notes == []
    assert info.base_model == "tiny/flux" and info.provenance["beta"] == 0.05
    tensors, _ = load_lora(path)
    assert info.parameter_count == sum(t.numel() for t in tensors.values())
    assert info.file_bytes == path.stat().st_size
    json.dumps(info.to_dict())

    text = format_lora_info(info)
    for expected in ("flux", "tiny/flux", "pec", "β=0.05", "rank", "18 LoRA pairs", "strength 1.0"):
        assert expected in text


def test_inspect_flags_raw_peft_and_kohya_files(tmp_path):
    raw = {k.replace("transformer.", "base_model.model.", 1): v for k, v in _tensor_dict().items()}
    raw["base_model.model.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(8.0)
    safetensors.torch.save_file(raw, tmp_path / "peft.safetensors")
    info = inspect_lora(tmp_path / "peft.safetensors")
    assert not info.scale_baked
    assert any("base_model.model." in n for n in info.notes) and any(".alpha" in n for n in info.notes)

    kohya = {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}
    safetensors.torch.save_file(kohya, tmp_path / "kohya.safetensors")
    with pytest.raises(LoraFormatError, match="kohya"):
        load_lora(tmp_path / "kohya.safetensors")


def test_lora_key_coverage(trained):
    path = trained["sd3.5-medium"][3]
    tensors, _ = load_lora(path)
    base_names = [name for name, _ in tm.tiny_sd35m_transformer().named_modules()]
    coverage = lora_key_coverage(tensors, base_names)
    assert coverage.unmatched == [] and len(coverage.matched) == len(file_modules(tensors))
    missing = "transformer_blocks.0.attn2.to_q"
    matched, unmatched = lora_key_coverage(tensors, [n for n in base_names if n != missing])
    assert unmatched == [missing] and missing not in matched


# ----------------------------------------------------------------------------- pec inspect on bad files


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _header_file(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    return _write(path, struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


BAD_FILES = {  # kind -> (good file, folder) -> bad path
    "truncated": lambda good, d: _write(d / "t.safetensors", good.read_bytes()[: good.stat().st_size // 2]),
    "empty": lambda good, d: _write(d / "e.safetensors", b""),
    "png": lambda good, d: _write(d / "p.safetensors", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
    "text": lambda good, d: _write(d / "x.safetensors", b"this is\nnot a LoRA\n" * 20),
    "not a lora": lambda good, d: _write(d / "n.safetensors", safetensors.torch.save({"weight": torch.zeros(3, 3)})),
    "header 2**60": lambda good, d: _header_file(d / "h.safetensors", {}, length=2**60),
    "huge tensor": lambda good, d: _header_file(
        d / "s.safetensors", {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, bytes(16)
    ),
    "bad dtype": lambda good, d: _header_file(
        d / "d.safetensors", {"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)
    ),
    "directory": lambda good, d: _mkdir(d / "dir.safetensors"),
    "missing": lambda good, d: d / "missing.safetensors",
}


def test_cli_inspect_good_file(trained, capsys):
    _, _, _, path = trained["sd3.5-medium"]
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sd3.5-medium" in out and "19 LoRA pairs" in out
    assert cli.main(["inspect", "--json", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "sd3.5-medium" and data["module_count"] == 19


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_cli_inspect_bad_file_is_one_line(trained, tmp_path, capsys, kind):
    bad = BAD_FILES[kind](trained["sd3.5-medium"][3], tmp_path)
    assert cli.main(["inspect", str(bad)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pec inspect: error: ") and str(bad) in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    if kind == "not a lora":
        assert "has 1 tensors but no lora_A/lora_B pairs" in lines[0]


def test_cli_subprocess_bad_file(trained, tmp_path):
    bad = BAD_FILES["huge tensor"](trained["flux"][3], tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "inspect", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


# ----------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz():
    """(valid small LoRA file bytes, scratch file path)."""
    with tempfile.TemporaryDirectory() as folder:
        good = Path(folder) / "good.safetensors"
        save_lora(
            {
                "transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4),
                "transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(4, 2),
            },
            good,
            alpha=2,
            dtype=torch.float32,
            provenance={"beta": 0.1},
        )
        yield good.read_bytes(), Path(folder) / "fuzz.safetensors"


def _only_format_errors(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    for read in (load_lora, inspect_lora):
        try:
            read(path)
        except LoraFormatError as err:
            assert "\n" not in str(err)


FUZZ = settings(max_examples=350, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(fuzz, data):
    _only_format_errors(fuzz[1], data)


def _split(good: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", good[:8])[0]
    return json.loads(good[8 : 8 + length]), good[8 + length :]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def mutated_lora(draw, good: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "length", "json"]))
    if kind == "flip":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "length":
        length = draw(st.integers(0, 2**64 - 1) | st.integers(0, len(good)))
        return struct.pack("<Q", length) + good[8:]
    header, body = _split(good)
    key = draw(st.sampled_from(sorted(header)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "alias", "whole", "delete", "metadata"]))
    value = draw(_json_values)
    if field == "alias":  # one tensor's data range given to another: overlaps and gaps
        tensors = [k for k in header if k != "__metadata__"]
        header[draw(st.sampled_from(tensors))]["data_offsets"] = header[draw(st.sampled_from(tensors))]["data_offsets"]
    elif field == "delete":
        del header[key]
    elif field == "whole":
        header[key] = value
    elif field == "metadata":
        header["__metadata__"] = {**header.get("__metadata__", {}), draw(st.text(max_size=20)): value}
    elif key != "__metadata__":
        header[key][field] = value
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@FUZZ
@given(st.data())
def test_fuzz_mutated_lora(fuzz, data):
    _only_format_errors(fuzz[1], data.draw(mutated_lora(fuzz[0])))


_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "U8": 1, "BOOL": 1, "F8_E4M3": 1}
_dtypes = st.sampled_from([*_DTYPE_BYTES, "F4", "Q8", ""])
_shapes = st.lists(st.integers(0, 4) | st.integers(0, 2**70), max_size=3)
_names = st.sampled_from(["m.lora_A.weight", "m.lora_B.weight", "n.lora_A.weight", "n.alpha", "x"]) | st.text(
    max_size=10
)


@st.composite
def random_header_file(draw) -> bytes:
    """Random tensor entries; half of them with offsets that fit their shape, so that layouts with
    gaps, overlaps and matching LoRA pairs reach safetensors' own checks and the LoRA checks."""
    header = {}
    for name in draw(st.lists(_names, max_size=5)):
        dtype, shape = draw(_dtypes), draw(_shapes)
        begin = draw(st.integers(0, 40))
        size = math.prod(shape) * _DTYPE_BYTES.get(dtype, 1)
        consistent = size <= 64 and draw(st.booleans())
        end = begin + size if consistent else draw(st.integers(0, 80))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": sorted([begin, end])}
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=6), st.text(max_size=6) | st.integers(), max_size=3)
        )
    raw = json.dumps(header).encode()
    data_end = max([e["data_offsets"][1] for e in header.values() if "data_offsets" in e] + [0])
    return struct.pack("<Q", len(raw)) + raw + bytes(max(0, data_end + draw(st.integers(-4, 4))))


@FUZZ
@given(data=random_header_file())
def test_fuzz_random_headers(fuzz, data):
    _only_format_errors(fuzz[1], data)


# ----------------------------------------------------------------------------- ComfyUI


@pytest.fixture(scope="module")
def comfy():
    return tm.import_comfy()


@pytest.mark.comfyui
@pytest.mark.parametrize("family", list(FAMILIES))
def test_comfyui_loads_every_key_at_trained_strength(comfy, trained, family, caplog):
    _, ref, _, path = trained[family]
    build, inputs, _, _ = FAMILIES[family]
    base_state = build().state_dict()
    patcher = comfy_model(comfy, family, base_state)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    tensors, _ = load_lora(path)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, key_map)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    modules = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    assert modules <= key_map.keys() and len(patches) == len(modules)

    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    # One unfused check: to_q is the first slice of ComfyUI's fused qkv weight.
    q = "transformer.transformer_blocks.0.attn.to_q"
    fused = "joint_blocks.0.x_block.attn.qkv" if family != "flux" else "double_blocks.0.img_attn.qkv"
    weight = patcher.model.diffusion_model.get_submodule(fused).weight
    expected = (
        base_state["transformer_blocks.0.attn.to_q.weight"]
        + tensors[q + ".lora_B.weight"] @ tensors[q + ".lora_A.weight"]
    )
    assert torch.allclose(weight[: expected.shape[0]], expected, atol=1e-6)
    # And the whole patched model reproduces the PEFT-trained diffusers model.
    assert_close(comfy_forward(patcher, family, inputs()), ref, rel=1e-5)
