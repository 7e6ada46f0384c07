"""Hostile and careless inputs to the converter, the config and the model: each gets a clear error, never a
traceback, never a half-written or destroyed folder, and memory bounded by what the checkpoint declares.

Every hostile file is built here, small, by ``tests/hostile_checkpoints.py``."""

import math

import pytest
import torch

from configuration_clipviz import CLIPVizConfig
from tests.conftest import TINY_TEXT, TINY_VISION, pixels, tiny_config, tiny_model, token_ids

# ---- config values that can only produce NaN/inf are refused when the config is built ----


@pytest.mark.parametrize("value", [0, -1e-5, 0.0, math.inf, math.nan, True, "1e-5"])
@pytest.mark.parametrize("tower", ["text_config", "vision_config"])
def test_layer_norm_eps_must_be_positive_and_finite(tower, value):
    configs = {"text_config": dict(TINY_TEXT), "vision_config": dict(TINY_VISION["vit"])}
    configs[tower]["layer_norm_eps"] = value
    with pytest.raises(ValueError, match="`layer_norm_eps` must be a finite number above 0"):
        CLIPVizConfig(**configs, projection_dim=32)


@pytest.mark.parametrize("field", ["logit_scale_init_value", "initializer_factor"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_top_level_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number"):
        tiny_config("vit", **{field: value})


def test_valid_epsilon_still_builds():
    config = tiny_config("vit")
    config.text_config.layer_norm_eps = 1e-6
    config.text_config.validate_architecture()


# ---- the model: empty texts, explain() on a wrong-size image ----


def test_zero_length_input_ids_get_a_clear_error():
    model = tiny_model("vit")
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="no tokens"):
        model.get_text_features(empty)
    with pytest.raises(ValueError, match="no tokens"):
        model(input_ids=empty, pixel_values=pixels(1, 32))


def test_explain_wrong_image_size_suggests_resizing_only():
    model = tiny_model("vit")
    with pytest.raises(ValueError, match="image processor") as error:
        model.explain(pixels(1, 48), token_ids(1))
    assert "interpolate_pos_encoding" not in str(error.value)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):  # forward() does accept it
        model(input_ids=token_ids(1), pixel_values=pixels(1, 48))
