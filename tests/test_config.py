"""Configuration: presets, YAML, overrides, and errors that name the file and the key."""

import subprocess
import sys

import pytest

from trainer.cli import main
from trainer.config import Config, ConfigError, load_config, parse_override, preset_names


def test_presets_load_and_overrides_apply():
    assert {"demo", "sd35m-pickscore", "flux-dev-pickscore"} <= set(preset_names())
    cfg = load_config("demo", None, ["pec.beta=0.25", "train.iterations=3", "rewards=[{name: toy_adherence}]"])
    assert cfg.pec.beta == 0.25 and cfg.train.iterations == 3 and cfg.rewards[0].name == "toy_adherence"
    flux = load_config("flux-dev-pickscore")
    assert flux.model.family == "flux" and flux.lora.rank == 64 and flux.sampling.noise_level == 0.9


def test_yaml_file_over_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  group_size: 4\n  batch_size: 4\npec:\n  method: pcvae\n")
    cfg = load_config("demo", str(f))
    assert cfg.train.group_size == 4 and cfg.pec.method == "pcvae" and cfg.lora.rank == 8  # rest from demo


def test_unknown_key_names_file_key_and_nearest(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("pec:\n  betta: 0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config("demo", str(f))
    message = str(err.value)
    assert str(f) in message and "pec.betta" in message and "did you mean pec.beta" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"--set trian.iterations=3: unknown key trian; did you mean train"):
        load_config("demo", None, ["trian.iterations=3"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  iterations: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: malformed YAML"):
        load_config(None, str(f))
    g = tmp_path / "list.yaml"
    g.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(None, str(g))


def test_impossible_group_size_states_the_rule():
    with pytest.raises(ConfigError, match=r"train.batch_size \(5\) must divide .* \(4 × 8 = 32\)"):
        load_config("demo", None, ["train.batch_size=5"])
    with pytest.raises(ConfigError, match="group_size"):
        load_config("demo", None, ["train.group_size=1"])
    with pytest.raises(ConfigError, match="start_max"):
        load_config("demo", None, ["sampling.window.start_min=3", "sampling.window.start_max=1"])
    with pytest.raises(ConfigError, match="pec.bonus_clip bounds z-scored energies"):
        load_config("demo", None, ["pec.bonus_clip=1.0", "pec.step_norm=none"])
    with pytest.raises(ConfigError, match="bonus_clip"):
        load_config("demo", None, ["pec.bonus_clip=0"])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean demo"):
        load_config("dmeo")


def test_override_parsing():
    assert parse_override("a.b.c=0.5") == {"a": {"b": {"c": 0.5}}}
    assert load_config("demo", None, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads a string; pydantic coerces
    assert parse_override("x=[1, 2]") == {"x": [1, 2]}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_fingerprint_ignores_run_dir_only():
    a = load_config("demo", None, ["run.dir=/tmp/a"])
    b = load_config("demo", None, ["run.dir=/tmp/b"])
    c = load_config("demo", None, ["pec.beta=0.9"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert Config().fingerprint() == Config().fingerprint()


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "typo.yaml"
    f.write_text("train:\n  iteratons: 3\n")
    assert main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.iteratons" in err and str(f) in err
    out = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--config", str(f)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and "iteratons" in out.stderr
