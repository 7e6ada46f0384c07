"""clipviz-explain / clipviz-eval on a generated scene dataset with the embedded models (offline).

The scene dataset has 240 rows (the multi-object held-out scenes of ``benchmarks/eval_localization.py``): 15 shards
of 16 rows, and this file stays near a minute and a half on 2 cores.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

datasets = pytest.importorskip("datasets")

from clipviz import metrics, scenes  # noqa: E402
from clipviz.dataset_eval import evaluate  # noqa: E402
from clipviz.dataset_eval import main as eval_main  # noqa: E402
from clipviz.dataset_explain import (  # noqa: E402
    MANIFEST,
    SHARD_NAME,
    ExplainError,
    explain_dataset,
    load_explanations,
    load_input,
    main,
    parse_method,
    upsample_map,
)

ROOT = Path(__file__).resolve().parent.parent
VIT, RESNET = ROOT / "embedded" / "clipviz-tiny-vit", ROOT / "embedded" / "clipviz-tiny-resnet"
ROWS, BATCH, SHARD = 240, 16, 16
CHEAP = ["attention", "relevance"]  # the runs compared across processes and interruptions
MULTI_START = 50_000  # eval_localization's multi-object scenes


def run_args(dataset: Path, output: Path) -> list[str]:
    return [
        str(dataset), str(output), "--model", str(VIT), "--prompt-column", "captions",
        *[arg for method in CHEAP for arg in ("--method", method)],
        "--batch-size", str(BATCH), "--shard-rows", str(SHARD), "--no-progress",
    ]  # fmt: skip


def subprocess_env(tmp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp / "cache")}


def shard_tables(output: Path) -> list:
    return [pq.read_table(path) for path in sorted(output.glob("shard-*.parquet"))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with one thread too: the same kernels, the same values
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scenes") / "scenes"
    scenes.scene_dataset("eval", MULTI_START, ROWS, min_objects=2).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def reference(scene_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "out"
    assert main(run_args(scene_dir, output)) == 0
    return output


def load_model_and_processor(model_dir: Path):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor


@pytest.mark.parametrize(
    "model_dir, methods",
    [
        (
            VIT,
            ["attention", "attention:head=max,layer=-2", "rollout", "relevance", "relevance:start_layer=0", "gradcam"],
        ),
        (RESNET, ["attention", "relevance", "gradcam"]),
    ],
    ids=["vit", "resnet"],
)
def test_outputs_match_model_explain(scene_dir, tmp_path, model_dir, methods):
    rows = load_input(str(scene_dir)).select(range(8))
    manifest = explain_dataset(
        rows, tmp_path / "out", str(model_dir), methods, prompt_column="captions", batch_size=2, shard_rows=4,
        progress=False,
    )  # fmt: skip
    assert manifest["complete"] and manifest["num_shards"] == 2 and manifest["rows_skipped"] == 0
    out = load_explanations(tmp_path / "out", cache_dir=str(tmp_path / "cache")).with_format("numpy")
    prompts = sum(len(c) for c in rows["captions"])
    assert len(out) == manifest["output_rows"] == prompts * len(methods)
    keys = list(zip(*(out.data.column(c).to_pylist() for c in ("row", "prompt_index", "method")), strict=True))
    assert len(set(keys)) == len(keys)  # every (row, prompt, method) once
    by_key = {key: i for i, key in enumerate(keys)}
    model, processor = load_model_and_processor(model_dir)
    for row in range(len(rows)):
        record = rows[row]
        pixel_values = processor.image_processor(images=[record["image"]], return_tensors="pt")["pixel_values"]
        text = processor.tokenizer(record["captions"], padding="longest", return_tensors="pt")
        for method in methods:
            spec = parse_method(method)
            ids, mask = text["input_ids"], text["attention_mask"]
            expected = model.explain(pixel_values, ids, mask, method=spec.name, **spec.options)
            label = spec.label
            for t, caption in enumerate(record["captions"]):
                got = out[by_key[(row, t, label)]]
                assert got["prompt"] == caption
                np.testing.assert_allclose(got["image_map"], expected.image_maps[0, t].numpy(), atol=2e-3)
                length = int(text["attention_mask"][t].sum())
                np.testing.assert_allclose(got["text_map"], expected.text_maps[0, t, :length].numpy(), atol=2e-3)
                np.testing.assert_allclose(got["logit"], expected.logits_per_image[0, t].item(), rtol=1e-4, atol=1e-4)
                assert (got["image_height"], got["image_width"]) == (64, 64)


def test_manifest_records_model_settings_and_dataset(reference, scene_dir):
    manifest = json.loads((reference / MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_shards"] == ROWS // SHARD
    assert manifest["rows_seen"] == ROWS and manifest["rows_skipped"] == 0
    assert manifest["model"]["id"] == str(VIT) and manifest["model"]["config"]["vision_config"]["patch_size"] == 8
    assert [m["label"] for m in manifest["settings"]["methods"]] == CHEAP
    assert manifest["dataset"]["fingerprint"] == load_input(str(scene_dir))._fingerprint
    assert manifest["dataset"]["num_rows"] == ROWS
    assert manifest["clipviz_version"]
    table = pq.read_table(reference / SHARD_NAME.format(0))
    assert str(table.schema.field("image_map").type) == "list<element: list<element: halffloat>>"
    assert {tuple(np.asarray(m).shape) for m in table.column("image_map").to_pylist()} == {(8, 8)}


def test_two_processes_give_the_rows_and_values_of_one(reference, scene_dir, tmp_path):
    with socket.socket() as probe:  # a free port for torch.distributed, so parallel test runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), "-m", "clipviz.dataset_explain", *run_args(scene_dir, output)]
    done = subprocess.run(launch, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = shard_tables(output), shard_tables(reference)
    assert len(two) == len(one) == ROWS // SHARD
    for a, b in zip(two, one, strict=True):
        assert a.equals(b)  # the same rows, prompts, methods and values, bit for bit
    assert json.loads((output / MANIFEST).read_text())["output_rows"] == sum(t.num_rows for t in one)


def test_killed_run_resumes_without_duplicates_or_gaps(reference, scene_dir, tmp_path):
    output = tmp_path / "killed"
    command = [sys.executable, "-m", "clipviz.dataset_explain", *run_args(scene_dir, output)]
    process = subprocess.Popen(command, env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (output / SHARD_NAME.format(1)).exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.kill()  # SIGKILL: no cleanup runs
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    written = sorted(output.glob("shard-*.parquet"))
    assert 2 <= len(written) < ROWS // SHARD, "the run must be stopped mid-way"
    assert not json.loads((output / MANIFEST).read_text())["complete"]
    (output / f".{SHARD_NAME.format(ROWS // SHARD - 1)}.tmp").write_bytes(b"half a shard")  # as a kill mid-write
    assert main(run_args(scene_dir, output)) == 0  # the same command resumes
    resumed, one = shard_tables(output), shard_tables(reference)
    assert len(resumed) == len(one)
    for a, b in zip(resumed, one, strict=True):
        assert a.equals(b)
    assert not list(output.glob(".*.tmp"))
    assert json.loads((output / MANIFEST).read_text())["complete"]


def test_bad_inputs_fail_with_one_clear_line(scene_dir, tmp_path, capsys):
    output = tmp_path / "out"

    def error(*changes: str) -> str:
        args = run_args(scene_dir, output)
        for change in changes:
            key, _, value = change.partition("=")
            if key in args:
                args[args.index(key) + 1] = value
            else:
                args += [key, value]
        assert main(args) == 1
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err
        return errors[0]

    assert "no column 'picture'" in error("--image-column=picture") and "image columns: image" in error(
        "--image-column=picture"
    )
    assert "not images" in error("--image-column=captions")
    assert "no prompt column 'labels'" in error("--prompt-column=labels")
    assert not output.exists()  # nothing written for bad input
    assert "unknown method 'saliency'" in error("--method=saliency")
    message = error("--method=attention:layer=99")
    assert "attention:layer=99" in message and "out of range" in message
    assert "multiple of the batch size" in error("--shard-rows=12")
    assert "is not a format for one value" in error("--template=a {")
    assert "KeyError" in error("--template=a {name}") and "IndexError" in error("--template=a {1}")
    assert "does not put the prompt value in" in error("--template=a photo")
    assert not output.exists()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("x")
    args = run_args(scene_dir, output)
    args[0] = str(text_file)
    assert main(args) == 1 and "not Parquet" in capsys.readouterr().err
    for target, message in ((text_file, f"error: output {text_file} is a file"), (text_file / "out", "is a file")):
        assert main(run_args(scene_dir, target)) == 1
        err = capsys.readouterr().err
        assert message in err and f"{text_file} is a file" in err and "Traceback" not in err
    assert text_file.read_text() == "x"
    args = run_args(scene_dir, output)
    at = args.index("--prompt-column")
    args[at : at + 2] = ["--prompt", "a red circle", "--prompt", ""]
    assert main(args) == 1 and "every --prompt needs text" in capsys.readouterr().err


def test_unwritable_output_and_os_errors_are_one_error_line(scene_dir, tmp_path, capsys, monkeypatch):
    import clipviz.dataset_explain as module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patch:  # a read-only folder (chmod does not stop root, who runs the CI)
        patch.setattr(module.tempfile, "TemporaryFile", refuse)
        assert main(run_args(scene_dir, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write output folder {tmp_path / 'out'}: {tmp_path} is not writable" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    monkeypatch.setattr(module, "explain_dataset", refuse)  # an OSError mid-run (disk full, a lost mount)
    assert main(run_args(scene_dir, tmp_path / "out")) == 1
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied\n"


def test_rerun_with_other_settings_is_refused(reference, tmp_path, capsys, scene_dir):
    args = run_args(scene_dir, reference)
    args[args.index("--batch-size") + 1] = "4"
    assert main(args) == 1
    assert "other settings" in capsys.readouterr().err


def png(color) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unreadable_rows_are_reported_and_skipped(tmp_path, capsys):
    cells = [png("red"), b"not an image", png("blue"), png("green"), b"", png("white")]
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": cell, "path": None} for cell in cells]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    manifest = explain_dataset(
        rows, tmp_path / "out", str(VIT), ["attention"], prompts=["a red square", "a blue square"], batch_size=2,
        shard_rows=4, progress=False,
    )  # fmt: skip
    assert manifest["complete"] and manifest["rows_seen"] == 6 and manifest["rows_skipped"] == 2
    assert [s["row"] for s in manifest["skipped"]] == [1, 4]
    assert "skipped 1 row(s) (unreadable image" in capsys.readouterr().err
    out = load_explanations(tmp_path / "out", cache_dir=str(tmp_path / "cache"))
    assert sorted(set(out.data.column("row").to_pylist())) == [0, 2, 3, 5] and len(out) == 8
    # a non-square image: the map covers the centred square the processor kept, upsampled there
    first = out.with_format("numpy")[0]
    assert (first["image_height"], first["image_width"]) == (24, 40)
    placed = upsample_map(first["image_map"], first["image_height"], first["image_width"])
    assert placed.shape == (24, 40) and not placed[:, :8].any() and not placed[:, 32:].any()
    np.testing.assert_allclose(placed[:, 8:32], metrics.upsample(first["image_map"], (24, 24)))


def test_parquet_image_folder_and_streaming_inputs_give_the_same_maps(scene_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = load_input(str(scene_dir)).select(range(6))
    rows.to_parquet(str(tmp_path / "scenes.parquet"))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(rows["image"]):
        image.save(folder / f"{i:03d}.png")
    results = {}
    sources = {
        "disk": rows,
        "parquet": load_input(str(tmp_path / "scenes.parquet")),
        "folder": load_input(str(folder)),
        "streaming": load_input(str(scene_dir), streaming=True).take(6),
    }
    for name, dataset in sources.items():
        explain_dataset(
            dataset, tmp_path / name, str(VIT), ["attention"], prompts=["a photo of a red circle"], batch_size=2,
            shard_rows=4, progress=False,
        )  # fmt: skip
        results[name] = shard_tables(tmp_path / name)
    for name in ("parquet", "folder", "streaming"):
        assert [t.drop_columns([]).to_pydict() for t in results[name]] == [t.to_pydict() for t in results["disk"]], name


# ---- clipviz-eval


def load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_localization", ROOT / "benchmarks" / "eval_localization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model_dir", [VIT, RESNET], ids=["vit", "resnet"])
def test_eval_reproduces_eval_localization(tmp_path, model_dir):
    bench = load_benchmark()
    loaded = bench.load(model_dir)
    count = 24
    # the benchmark's rows: its registry variants where it has them, else its fixed method table
    variants = getattr(bench, "method_variants", None)
    methods = variants(loaded) if variants else bench.METHODS[loaded.backbone]
    specs = [name + "".join(f":{k}={v}" for k, v in options.items()) for name, options in methods.values()]
    rows = scenes.scene_dataset("eval", MULTI_START, count, size=loaded.size, min_objects=2)  # rendered at 64 / 128 px
    explain_dataset(rows, tmp_path / "out", str(model_dir), specs, prompt_column="captions", batch_size=8,
                    shard_rows=8, progress=False)  # fmt: skip
    report = evaluate(str(tmp_path / "out"), rows)
    expected = bench.localization(loaded, count, methods) if variants else bench.localization(loaded, count)
    maps = sum(len(c) for c in rows["captions"])
    for title, spec in zip(methods, specs, strict=True):
        got, want = report["methods"][spec], expected[title]
        for metric in metrics.SCENE_METRICS:
            # float16 maps: a near-tie for the argmax may flip one map, nothing more
            assert got[metric] == pytest.approx(want[metric], abs=1.01 / maps), (title, metric, got, want)
        assert got["energy"] == pytest.approx(want["energy"], abs=2e-3)
        assert 0 <= got["mIoU"] <= 1 and 0 <= got["p-mIoU"] <= 1 and 0 <= got["mAP"] <= 1


@pytest.mark.parametrize("model_dir", [VIT, RESNET], ids=["vit", "resnet"])
def test_eval_faithfulness_is_eval_localizations_del_and_ins(tmp_path, model_dir):
    """Deletion / insertion: the same rescaled areas (intact logit 1, all removed 0) as the benchmark's del↓ / ins↑,
    on 6 scenes, for the model's default method and raw attention."""
    bench = load_benchmark()
    loaded = bench.load(model_dir)
    count, config = 6, loaded.model.config
    methods = {"default": (config.explain_method, dict(config.explain_options)), "attention": ("attention", {})}
    specs = [name + "".join(f":{k}={v}" for k, v in options.items()) for name, options in methods.values()]
    rows = scenes.scene_dataset("eval", MULTI_START, count, size=loaded.size, min_objects=2)
    explain_dataset(rows, tmp_path / "out", str(model_dir), specs, prompt_column="captions", batch_size=8,
                    progress=False)  # fmt: skip
    report = evaluate(str(tmp_path / "out"), rows, faithfulness=True, steps=8)
    expected = bench.localization(loaded, count, methods, faithfulness=count, steps=8)
    for title, spec in zip(methods, specs, strict=True):
        got, want = report["methods"][spec], expected[title]
        # float16 maps may reorder near-equal pixels; the processor and the benchmark's pixels differ by rounding
        assert got["deletion"] == pytest.approx(want["del↓"], abs=0.02), (title, got, want)
        assert got["insertion"] == pytest.approx(want["ins↑"], abs=0.02), (title, got, want)


def test_eval_cli_table_json_and_faithfulness(reference, tmp_path, capsys):
    report_path = tmp_path / "eval.json"
    assert eval_main([str(reference), "--json", str(report_path), "--faithfulness", "--steps", "2"]) == 0
    table = capsys.readouterr().out
    assert "| attention |" in table and "| relevance |" in table and "deletion" in table
    report = json.loads(report_path.read_text())
    assert report["counts"]["rows"] == ROWS
    for values in report["methods"].values():
        assert {"point", "point±1", "energy", "mIoU", "mAP", "p-mIoU", "deletion", "insertion"} <= set(values)
        assert all(np.isfinite(v) for v in values.values())
    relevance = report["methods"]["relevance"]
    assert relevance["insertion"] > relevance["deletion"]  # the map ranks pixels the logit depends on
    assert relevance["pair"] > 0.75 and report["methods"]["attention"]["pair"] == pytest.approx(0.5)


def test_eval_errors(reference, tmp_path, capsys):
    assert eval_main([str(tmp_path)]) == 1
    assert "no manifest.json" in capsys.readouterr().err
    assert eval_main([str(reference), "--mask-column", "none", "--points-column", "none"]) == 1
    assert "nothing to score" in capsys.readouterr().err
    assert eval_main([str(reference), "--mask-column", "segmentation"]) == 1
    assert "no column 'segmentation'" in capsys.readouterr().err


def test_class_label_column_with_a_template(tmp_path):
    labels = datasets.ClassLabel(names=["red square", "blue square"])
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": png("red"), "path": None}, {"bytes": png("blue"), "path": None}], "label": [0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": labels}),
    )
    explain_dataset(rows, tmp_path / "out", str(VIT), ["attention"], prompt_column="label",
                    template="a photo of a {}", batch_size=2, shard_rows=2, progress=False)  # fmt: skip
    (table,) = shard_tables(tmp_path / "out")
    assert table.column("prompt").to_pylist() == ["a photo of a red square", "a photo of a blue square"]


def test_rows_without_a_label_or_prompt_are_skipped_not_explained(tmp_path):
    images = [{"bytes": png(color), "path": None} for color in ("red", "blue", "green", "white")]
    labelled = datasets.Dataset.from_dict(  # -1: datasets' "no label"; 2: out of range (a cast lets it through)
        {"image": images, "label": [1, -1, 2, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    ).cast_column("label", datasets.ClassLabel(names=["red", "blue"]))
    manifest = explain_dataset(labelled, tmp_path / "labels", str(VIT), ["attention"], prompt_column="label",
                               template="a {0} square", batch_size=2, shard_rows=4, progress=False)  # fmt: skip
    assert manifest["rows_seen"] == 4 and [s["row"] for s in manifest["skipped"]] == [1, 2]
    assert "class label -1" in manifest["skipped"][0]["error"] and "class label 2" in manifest["skipped"][1]["error"]
    (table,) = shard_tables(tmp_path / "labels")
    assert table.column("row").to_pylist() == [0, 3]
    assert table.column("prompt").to_pylist() == ["a blue square", "a red square"]
    captions = [["a red square"], [None], [], ["a green square", ""]]
    lists = datasets.Dataset.from_dict(
        {"image": images, "captions": captions},
        features=datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))}),
    )
    strings = datasets.Dataset.from_dict(
        {"image": images, "caption": [None, "", "a green square", "  "]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    for rows, column, explained in ((lists, "captions", [0]), (strings, "caption", [2])):
        manifest = explain_dataset(rows, tmp_path / column, str(VIT), ["attention"], prompt_column=column,
                                   batch_size=2, shard_rows=4, progress=False)  # fmt: skip
        assert manifest["rows_skipped"] == 3 and all("no prompt" in s["error"] for s in manifest["skipped"])
        (table,) = shard_tables(tmp_path / column)
        assert table.column("row").to_pylist() == explained and "None" not in table.column("prompt").to_pylist()


def test_resume_with_another_model_or_dataset_source_is_refused(scene_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(VIT, model)
    rows = load_input(str(scene_dir)).select(range(2))
    source = {"path": str(scene_dir), "split": None, "name": None, "revision": None}

    def run(**changes):
        kwargs = dict(prompt_column="captions", batch_size=2, shard_rows=2, progress=False, source=source)
        return explain_dataset(rows, tmp_path / "out", str(model), ["attention"], **{**kwargs, **changes})

    first = run()
    assert set(first["model"]["files"]) == {"config.json", "model.safetensors"}
    assert run()["complete"]  # the same model and source: resumed (here: nothing left to do)
    with pytest.raises(ExplainError, match="another dataset .*source.*use a new output folder"):
        run(source={**source, "split": "test"})
    with open(model / "config.json", "a") as config:
        config.write("\n")  # other bytes: another model for the record, whatever its name
    with pytest.raises(ExplainError, match=r"another model \(model files .*use a new output folder"):
        run()


def test_method_registry_entries_decide_gradients():
    from clipviz.dataset_explain import method_registry, needs_grad

    model = load_model_and_processor(VIT)[0]
    registry = method_registry(model)  # the model code's own EXPLAIN_METHODS (its explaining_clipviz)
    assert isinstance(registry, dict) and "relevance" in registry
    for name, entry in registry.items():
        assert needs_grad(model, name) == entry.needs_grad
    assert needs_grad(model, "gradcam") and not needs_grad(model, "attention")


def test_a_resumed_run_spreads_the_remaining_shards_over_the_processes(tmp_path):
    from clipviz.dataset_explain import _my_shards, _todo

    rows = datasets.Dataset.from_dict({"x": list(range(22))})
    for done in (0, 3):
        (tmp_path / SHARD_NAME.format(done)).write_bytes(b"")
    todo = _todo(rows.num_rows, 4, tmp_path)
    assert todo == [1, 2, 4, 5]  # 6 shards of 4 rows, the last one of 2
    shares = [[(k, part["x"][:]) for k, part in _my_shards(rows, 4, rank, 2, tmp_path, todo)] for rank in (0, 1)]
    assert [k for k, _ in shares[0]] == [1, 4] and [k for k, _ in shares[1]] == [2, 5]
    assert shares[1][1][1] == [20, 21] and shares[0][0][1] == [4, 5, 6, 7]
