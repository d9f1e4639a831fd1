"""Recipes: YAML over dataclass defaults, dotted overrides, one-line errors naming the key."""

from __future__ import annotations

import pytest

from omni_train.config import RecipeError, load_recipe, to_yaml

RECIPE = """
name: unit
data:
  seq_len: 512
  train: [{shards: "shards/x-{000000..000003}.tar", weight: 2.0}]
  audio: {num_mel_bins: 80}
model:
  audio: {num_mel_bins: 80}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_recipe_merges_defaults_and_overrides(recipe):
    cfg = load_recipe(recipe, ["data.seq_len=1024", "data.train.0.weight=0.5", "data.video.fps=1.0"])
    assert cfg.data.seq_len == 1024 and cfg.data.train[0].weight == 0.5 and cfg.data.video.fps == 1.0
    assert cfg.data.audio.num_mel_bins == 80 and cfg.data.audio.sample_rate_hz == 16000
    assert cfg.output_dir == "runs/unit"
    assert "seq_len: 1024" in to_yaml(cfg)


@pytest.mark.parametrize("override,match", [
    ("data.seq_lenn=3", r"^data.seq_lenn: Key 'seq_lenn' not in 'DataConfig'"),
    ("data.seq_len=abc", r"^data.seq_len: Value 'abc'"),
    ("data.overlong=cut", r"^data.overlong must be one of error, skip"),
    ("data.train.0.weight=-1", r"^data.train\[0\].weight must be > 0"),
    ("data.audio.num_mel_bins=0", r"^data.audio.num_mel_bins must be an integer in"),
    ("seq_len", r"not key=value"),
])
def test_bad_values_name_the_key(recipe, override, match):
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(recipe, [override])
    assert "\n" not in str(info.value)


def test_model_and_data_must_agree(recipe):
    with pytest.raises(RecipeError, match=r"model.audio.num_mel_bins=128 does not match data.audio.num_mel_bins=80"):
        load_recipe(recipe, ["model.audio.num_mel_bins=128"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
