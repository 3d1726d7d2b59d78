from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zar.config import DATA_KEYS, FIELD_TYPES, NOT_SEARCHED, ConfigError, TrainConfig, from_dict, load_config
from zar.learn.data import load_data

ROOT = Path(__file__).resolve().parents[1]


def test_default_params_file_is_the_study():
    cfg = load_config(ROOT / "params" / "default.yaml")
    assert cfg == TrainConfig()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.workers, cfg.seed) == (1e-3, 32, 10, 0, 42)
    assert (cfg.optimizer, cfg.weight_decay, cfg.val_ratio, cfg.image_size) == ("adamw", 1e-4, 0.2, 32)


def test_seed_params_file_is_the_study_at_224():
    cfg = load_config(ROOT / "params" / "seed.yaml")
    assert cfg == TrainConfig(image_size=224)


def test_overrides_win_and_none_means_unset(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("epochs: 3\nlr: 1e-2\n")  # PyYAML reads 1e-2 as a string; it is still a float
    cfg = load_config(path, {"epochs": 5, "batch_size": None})
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (5, 0.01, 32)


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: 0\n", "config key 'epochs' must be >= 1, got 0"),
        ("val_ratio: 1.0\n", "config key 'val_ratio' must be between 0 and 1 (exclusive), got 1.0"),
        ("lr: -1\n", "config key 'lr' must be > 0 and finite, got -1.0"),
        ("lr: .nan\n", "config key 'lr' must be > 0 and finite, got nan"),
        ("epochs: ten\n", "config key 'epochs' must be int, got str 'ten'"),
        ("epochs: 2.5\n", "config key 'epochs' must be int, got float 2.5"),
        ("batch_size: true\n", "config key 'batch_size' must be int, got bool True"),
        ("optimizer: lion\n", "config key 'optimizer' must be one of adamw, adam, sgd, got 'lion'"),
        ("depth: 50\n", "config key 'depth' must be one of 18, 34, got 50"),
        ("learning_rate: 0.1\n", "unknown config key 'learning_rate'"),
        ("epochs: [1, 2\n", "malformed YAML"),
        ("- 1\n- 2\n", "must hold a mapping of config keys, got list"),
        ("seed: 4294967296\n", "config key 'seed' must be between 0 and 4294967295, got 4294967296"),
        ("split_seed: -1\n", "config key 'split_seed' must be between 0 and 4294967295, got -1"),
        ("lr: [0.1, 0.01]\n", "config key 'lr' in bad.yaml must be a single float, got a list"),
        ("data: {path: x}\n", "config key 'data' in bad.yaml must be a single str, got a dict"),
        ("epochs:\n", "config key 'epochs' in bad.yaml must be a single int, got nothing"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in err.value.message.replace(str(tmp_path) + "/", "")
    assert "\n" not in err.value.message
    assert err.value.exit_code == 2


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        TrainConfig().lr = 0.1  # type: ignore[misc]


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
keys = st.one_of(st.sampled_from(sorted(FIELD_TYPES)), st.text(min_size=1, max_size=10))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=5))
def test_any_config_is_valid_or_one_clear_error(raw):
    """Property: every mapping either loads into a valid config or raises one ConfigError line naming a key."""
    try:
        cfg = from_dict(raw)
    except ConfigError as e:
        assert "\n" not in e.message
        assert "config key" in e.message
        assert any(repr(k) in e.message for k in raw)
    else:
        assert cfg.epochs >= 1 and 0 < cfg.val_ratio < 1 and cfg.lr > 0
        assert from_dict(cfg.to_dict()) == cfg  # what is logged loads back to the same config
        assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()


def test_errors_quote_at_most_about_200_characters_of_input(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(f"optimizer: {'x' * 100_000}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "config key 'optimizer'" in err.value.message and len(err.value.message) < 400
    assert "(100002 chars)" in err.value.message


# --- what each key is -------------------------------------------------------------------------------


def test_every_key_a_sweep_may_not_search_says_why_and_every_data_seed_and_runtime_key_is_one():
    from zar.config import DATA, ROLE, RUNTIME, SEED

    for name, role in ROLE.items():
        if role in (DATA, SEED, RUNTIME):
            assert NOT_SEARCHED.get(name), f"{name} ({role}) needs the reason a sweep may not search it"
    assert set(NOT_SEARCHED) <= set(ROLE)


def test_only_data_keys_change_the_loaded_data():
    """A study shares one load between children that differ only in other keys: that must be safe."""
    base = TrainConfig(data="synthetic", image_size=16, scheduler="cosine", epochs=3)
    loaded = load_data(base)
    for f in fields(TrainConfig):
        value = getattr(base, f.name)
        if f.metadata["choices"]:
            changed = next(c for c in f.metadata["choices"] if c != value)
        elif f.type == "str":
            changed = "digits"  # data, the one free-text key
        elif f.type == "bool":
            changed = not value
        else:
            changed = value + 1 if f.type == "int" else (value / 2 or 0.1)
        again = load_data(base.replace(**{f.name: changed}))
        same = (again.fingerprint, again.data_fingerprint) == (loaded.fingerprint, loaded.data_fingerprint)
        if f.name not in DATA_KEYS:
            assert same, f"changing {f.name} changed the data: declare it with role=DATA"
        elif f.name != "skip_bad_images":  # the synthetic data has no bad image to skip
            assert not same, f"{f.name} is declared a data key, yet changing it left the data as it was"
