"""The committed embedded models load as the Space loads them, and their maps point at the named objects.

Floors sit below the numbers `benchmarks/eval_localization.py` measures on 500 held-out scenes (see the README
table), on a smaller fixed held-out set so the test stays fast.
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
SINGLE, MULTI = 200, 96

# Floors per model (measured on this set: ViT top-1 1.00, relevance over all layers 0.92 strict pointing, 0.08
# wrong object, 0.98 pair, smallest margin over the random map 0.28 (attention, rollout); ResNet top-1 1.00,
# relevance 1.00 / 0.00 / 1.00): zero-shot top-1, the best method's strict pointing, its wrong-object ceiling and
# text-conditioning floor, and every method's margin over the random map.
FLOORS = {
    "clipviz-tiny-vit": {
        "top1": 0.95,
        "best": ("relevance (all layers)", 0.86),
        "wrong": 0.13,
        "pair": 0.95,
        "margin": 0.20,
    },
    "clipviz-tiny-resnet": {"top1": 0.95, "best": ("relevance", 0.95), "wrong": 0.05, "pair": 0.95, "margin": 0.10},
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
    return bench.localization(loaded, MULTI)


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


def test_pointing_game_floors_and_controls(loaded, results):
    floors = FLOORS[loaded.name]
    random = results["random map"]
    best_name, best_floor = floors["best"]
    assert results[best_name]["point"] >= best_floor, results[best_name]
    for name, metrics in results.items():
        if name != "random map":
            assert metrics["point"] >= random["point"] + floors["margin"], (name, metrics, random)
            assert metrics["energy"] > random["energy"], (name, metrics, random)
    # the map for one object's caption lands on another object rarely, and depends on the caption
    assert results[best_name]["wrong"] <= floors["wrong"]
    assert results[best_name]["pair"] >= floors["pair"]
    assert random["pair"] == pytest.approx(0.5, abs=0.1)


def test_prompt_independent_methods_cannot_tell_objects_apart(loaded, results):
    assert results["attention"]["pair"] == pytest.approx(0.5, abs=1e-9)
    if loaded.backbone == "vit":
        assert results["rollout"]["pair"] == pytest.approx(0.5, abs=1e-9)


def test_scores_are_fractions(results):
    for metrics in results.values():
        values = np.array(list(metrics.values()))
        assert np.all((values >= 0) & (values <= 1))
