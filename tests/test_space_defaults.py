"""Right by default: the Space, with nothing changed from its defaults, maps each prompt of every bundled scene
example onto the object it names, for both embedded models.

The request goes through ``space/explainer.py`` as a click would (``run_request`` with default ``Settings``: the
model's own ``explain_method`` / ``explain_options``); the grid maps it draws are captured at ``draw``. Scene examples record their seed, so the objects' masks are rebuilt
with :mod:`clipviz.scenes`; a prompt naming an absent object (each scene has one) is not scored.
"""

import json
from pathlib import Path

import explainer  # the Space's module (setup.cfg puts space/ on pytest's path)
import numpy as np
import pytest
import torch
from PIL import Image

from clipviz import metrics, scenes

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = ROOT / "space" / "examples"
SCENE_ROWS = [row for row in json.loads((EXAMPLES / "examples.json").read_text()) if "seed" in row]


@pytest.fixture(scope="module", params=explainer.EMBEDDED_NAMES)
def cache(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread (see test_localization)
    label = explainer.EMBEDDED_PREFIX + request.param
    yield explainer.ModelCache([explainer.ModelChoice(label, str(ROOT / "embedded" / request.param))]), label
    torch.set_num_threads(threads)


def test_there_are_scene_examples_to_check_and_the_space_starts_on_the_models_default():
    assert len(SCENE_ROWS) >= 3
    assert explainer.Settings().method == explainer.DEFAULT_METHOD


@pytest.mark.parametrize("row", SCENE_ROWS, ids=[row["file"] for row in SCENE_ROWS])
def test_default_maps_peak_on_the_named_object(cache, row, monkeypatch):
    models, label = cache
    drawn = []
    draw = explainer.draw

    def capture(prepared, grid_map, settings, display=None):
        if display is None:  # the per-prompt overlays (the head grid passes thumbnails)
            drawn.append(grid_map)
        return draw(prepared, grid_map, settings, display)

    monkeypatch.setattr(explainer, "draw", capture)
    result = explainer.run_request(models, str(EXAMPLES / row["file"]), "\n".join(row["prompts"]), label,
                                   explainer.Settings())  # fmt: skip
    assert len(result.overlays) == len(drawn) == len(row["prompts"])
    scene = scenes.make_scene(row["seed"])
    np.testing.assert_array_equal(np.asarray(Image.open(EXAMPLES / row["file"]).convert("RGB")), scene.image)
    scored = 0
    for prompt, grid_map in zip(row["prompts"], drawn, strict=True):
        if prompt not in scene.captions:
            continue
        named = scene.objects[scene.captions.index(prompt)]
        coverage = metrics.cell_coverage(named.mask, grid_map.shape)
        assert metrics.pointing_game(grid_map, coverage, tolerance=1), (label, row["file"], prompt)
        scored += 1
    assert scored == len(scene.objects)
