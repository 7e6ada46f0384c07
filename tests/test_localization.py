"""The committed embedded models load as the Space loads them, and their maps point at the named objects.

Floors sit below the numbers `benchmarks/eval_localization.py` measures on 300 held-out scenes (see the README
tables), on a smaller fixed held-out set (and fewer scenes for deletion/insertion) so the test stays fast.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipviz import scenes

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "embedded"
MODELS = ("clipviz-tiny-vit", "clipviz-tiny-resnet")
SINGLE, MULTI, FAITHFUL, STEPS = 200, 96, 8, 8

# Floors per model, a little under what this set measures (in brackets, 96 scenes, deletion/insertion on 8):
# zero-shot top-1; for the model's default explanation (its config's `explain_method` / `explain_options`),
# pointing with one cell of tolerance, a ceiling on the wrong-object rate, a floor on the pair test, and how far its
# deletion / insertion AUCs beat the random map's; every method's strict-pointing margin over the random map.
FLOORS = {
    "clipviz-tiny-vit": {  # occlusion (window 2)
        "top1": 0.95,  # [1.000]
        "point±1": 0.97,  # [1.000]
        "wrong": 0.03,  # [0.004]
        "pair": 0.97,  # [1.000]
        "deletion": 0.25,  # [0.263 vs random 0.558]
        "insertion": 0.20,  # [0.944 vs random 0.665]
        "margin": 0.20,  # [smallest: attention 0.397 vs random 0.120]
    },
    "clipviz-tiny-resnet": {  # relevance
        "top1": 0.95,  # [1.000]
        "point±1": 0.95,  # [1.000]
        "wrong": 0.05,  # [0.000]
        "pair": 0.95,  # [1.000]
        "deletion": 0.25,  # [0.404 vs random 0.709]
        "insertion": 0.20,  # [0.953 vs random 0.703]
        "margin": 0.10,  # [smallest: attention 0.426 vs random 0.240]
    },
}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("eval_localization", ROOT / "benchmarks" / "eval_localization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    # one thread: the tiny models' ops are too small to split, and two threads on a busy 2-core machine wait
    # on each other at every op (measured: 100x slower per call under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_benchmark()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=MODELS)
def loaded(request, bench):
    return bench.load(EMBEDDED / request.param)


@pytest.fixture(scope="module")
def results(loaded, bench):
    """Every registry method with its defaults, and the model's default explanation (the first row)."""
    return bench.localization(loaded, MULTI, bench.method_variants(loaded), faithfulness=FAITHFUL, steps=STEPS)


def test_folder_ships_weights_code_tokenizer_processor_and_card(loaded):
    folder = EMBEDDED / loaded.name
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json", "README.md"):
        assert (folder / name).is_file(), name
    # the remote code is the repository's own code: links, see tests/test_train_embedded.py
    for code in ("modeling_clipviz.py", "configuration_clipviz.py", "explaining_clipviz.py", "tokenization_clipviz.py"):
        assert (folder / code).is_file(), code
    assert type(loaded.model).__name__ == "CLIPVizModel" and hasattr(loaded.model, "explain")
    assert (folder / "model.safetensors").stat().st_size < 40_000_000


def test_processor_matches_what_training_fed_the_model(loaded):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(EMBEDDED / loaded.name)
    scene = scenes.make_scene(scenes.scene_seed("eval", 3), size=loaded.size)
    via_processor = processor(images=scene.image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(via_processor, scenes.to_pixel_values([scene.image], loaded.mean, loaded.std))


def test_zero_shot_top1_floor(loaded, bench):
    assert bench.zero_shot_top1(loaded, SINGLE) >= FLOORS[loaded.name]["top1"]


def test_every_registry_method_is_measured(loaded, bench, results):
    for method in bench.registry_methods(loaded):
        assert method in results, (method, list(results))


def test_pointing_game_floors_and_controls(loaded, bench, results):
    floors = FLOORS[loaded.name]
    random = results["random map"]
    default = results[bench.default_variant(loaded)]
    assert default["point±1"] >= floors["point±1"], default
    for name, metrics in results.items():
        if name != "random map":
            assert metrics["point"] >= random["point"] + floors["margin"], (name, metrics, random)
            assert metrics["energy"] > random["energy"], (name, metrics, random)
    # the map for one object's caption lands on another object rarely, and depends on the caption
    assert default["wrong"] <= floors["wrong"]
    assert default["pair"] >= floors["pair"]
    assert random["pair"] == pytest.approx(0.5, abs=0.1)


def test_the_default_map_ranks_what_the_model_needs_first(loaded, bench, results):
    """Deletion in the default map's order drops the prompt's logit sooner, and insertion raises it sooner, than
    in a random order."""
    floors = FLOORS[loaded.name]
    default, random = results[bench.default_variant(loaded)], results["random map"]
    assert default["del↓"] <= random["del↓"] - floors["deletion"], (default, random)
    assert default["ins↑"] >= random["ins↑"] + floors["insertion"], (default, random)


def test_prompt_independent_methods_cannot_tell_objects_apart(loaded, results):
    assert results["attention"]["pair"] == pytest.approx(0.5, abs=1e-9)
    if loaded.backbone == "vit":
        assert results["rollout"]["pair"] == pytest.approx(0.5, abs=1e-9)


def test_scores_are_fractions(bench, results):
    for metrics in results.values():
        values = np.array([metrics[name] for name in bench.LOCALIZATION])
        assert np.all((values >= 0) & (values <= 1))
        assert np.isfinite([metrics["del↓"], metrics["ins↑"]]).all()


def test_the_saved_default_is_the_one_training_writes(loaded):
    """config.json's default explanation is `train_embedded.EXPLAIN_DEFAULTS` (so a retrained model keeps it)."""
    from clipviz.train_embedded import EXPLAIN_DEFAULTS

    config = loaded.model.config
    assert (config.explain_method, config.explain_options) == EXPLAIN_DEFAULTS[loaded.backbone]
