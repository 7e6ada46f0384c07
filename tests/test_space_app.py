"""The Space as a server: ``python space/app.py`` launched on 127.0.0.1 in a subprocess, driven by ``gradio_client``
and raw HTTP (overlays, probabilities, token relevance, errors, file-access refusals, upload limit, full queue,
8 clients at once). Also the upload component's own preprocessing."""

import base64
import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.space_server import (
    CAT,
    CONFIGURED_HUB_REPOS,
    EXAMPLES,
    ROOT,
    SCENE,
    SPACE,
    SpaceServer,
    free_port,
    model_env,
    shared_server,
)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe socket is closed


@pytest.fixture(scope="module")
def unconfigured_server() -> SpaceServer:
    """A newcomer's first run without network: no HF_HUB_OFFLINE, no configuration, the Hub simply unreachable; and
    a short cache lifetime (6 s) for the cache test."""
    server = SpaceServer(
        HF_HUB_OFFLINE="0", HF_ENDPOINT=closed_port_url(), CLIPVIZ_CACHE_SECONDS="6", **model_env()
    )  # fmt: skip
    yield server
    server.stop()


def component_props(server: SpaceServer, elem_id: str) -> dict:
    config = httpx.get(server.url + "config", timeout=10).json()
    return next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


@pytest.fixture(scope="module")
def server() -> SpaceServer:
    return shared_server()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, verbose=False)


def explain(client: Client, image: Path, prompts: list[str], **options):
    return client.predict(image=handle_file(str(image)), prompts="\n".join(prompts), api_name="/explain", **options)


# ---- the API ----


def test_explain_endpoint_is_the_only_public_api(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/explain"]
    names = [p["parameter_name"] for p in endpoints["/explain"]["parameters"]]
    page = ["image", "prompts", "model", "method", "head_grid", "opacity", "colormap", "style"]
    from explaining_clipviz import EXPLAIN_METHODS  # every registry option is a parameter, in registry order

    options = list(dict.fromkeys(o.name for m in EXPLAIN_METHODS.values() for o in m.options))
    assert names == page + options and "start_layer" in names


def default_method_title() -> str:
    """The title of the default model's configured explanation method (its config.json), from the registry."""
    from explaining_clipviz import EXPLAIN_METHODS

    config = json.loads((Path(__file__).resolve().parents[1] / "embedded/clipviz-tiny-vit/config.json").read_text())
    return EXPLAIN_METHODS[config["explain_method"]].title


def test_without_a_method_the_models_default_runs(client):
    _, _, _, _, note = explain(client, SCENE, ["a photo of a blue circle"])
    assert note.startswith("This model's default method") and f"**{default_method_title()}**" in note
    _, _, _, _, note = explain(client, SCENE, ["a photo of a blue circle"], method="rollout", style="fade")
    assert note.startswith("**Attention rollout**")


def test_overlays_probabilities_and_token_relevance(client):
    prompts = ["a photo of a purple square", "a photo of a blue circle", "a photo of a red star"]
    overlays, probabilities, tokens, heads, note = explain(client, SCENE, prompts)

    assert [item["caption"].split(" · ")[0] for item in overlays] == prompts
    for item in overlays:
        with Image.open(item["image"]) as overlay:
            assert overlay.format == "JPEG" and overlay.size == (512, 512)  # a square scene stays square

    confidences = {c["label"]: c["confidence"] for c in probabilities["confidences"]}
    assert set(confidences) == set(prompts) and sum(confidences.values()) == pytest.approx(1.0, abs=1e-6)
    assert probabilities["label"] == max(confidences, key=confidences.get)

    words = [entry["token"] for entry in tokens if entry["class_or_confidence"] is not None]
    assert "".join(words).split() == " ".join(prompts).split()
    assert all(0 <= entry["class_or_confidence"] <= 1 for entry in tokens if entry["class_or_confidence"] is not None)
    assert heads == [] and default_method_title() in note


def test_overlays_keep_the_photos_aspect_ratio(client):
    overlays, *_ = explain(client, CAT, ["a photo of a cat"], method="gradcam", opacity=0.7, colormap="viridis")
    with Image.open(overlays[0]["image"]) as overlay:
        assert overlay.size == (512, 341)  # 451x300 scaled to a 512-pixel long side


def test_raw_attention_with_the_all_heads_grid(client):
    overlays, _, _, heads, note = explain(
        client, SCENE, ["a photo of a blue circle"], method="attention", head_grid=True
    )
    assert len(overlays) == 1 and len(heads) >= 2
    assert [item["caption"].split(", ")[-1] for item in heads] == [f"head {h}" for h in range(1, len(heads) + 1)]
    assert "Raw attention" in note


def test_resnet_model_from_the_dropdown(client):
    _, probabilities, *_ = explain(client, SCENE, ["a cat", "a dog"], model="embedded: clipviz-tiny-resnet")
    assert {c["label"] for c in probabilities["confidences"]} == {"a cat", "a dog"}


def test_readme_client_snippet_runs(server, tmp_path, monkeypatch):
    readme = (SPACE / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'api_name="/explain"' in snippet
    monkeypatch.chdir(ROOT)  # where the README says to run things
    exec(snippet.replace("http://127.0.0.1:7860/", server.url), {"print": lambda *args, **kwargs: None})


@pytest.mark.parametrize(
    ("prompts", "options", "message"),
    [
        ("", {}, "Type at least one prompt"),
        ("\n".join(f"p{i}" for i in range(9)), {}, "9 prompts given; the limit is 8"),
        (" ".join(["cat"] * 80), {}, "is 82 tokens long; CLIP reads at most 77 tokens"),
        (
            "a cat",
            {"model": "embedded: clipviz-tiny-resnet", "method": "rollout"},
            "Attention rollout is not available for this model's ResNet image tower",
        ),
        ("a cat", {"method": "attention", "head": "99"}, "The head must be 'mean', 'max' or a number from 1 to"),
        ("a cat", {"method": "attention", "layer": "0"}, "The layer must be 'last' or a number from 1 to"),
        ("a cat", {"style": "soft"}, "soft"),
        (
            "a cat",
            {"model": "clipviz/clip-vit-b-16"},
            "Could not load the model 'clipviz/clip-vit-b-16': HF_HUB_OFFLINE is set and the model is not in the local",
        ),
        ("a cat", {"opacity": "abc"}, "The overlay opacity must be a number, not 'abc'"),
        ("a cat", {"opacity": 3}, "The overlay opacity must be between 0 and 1, not 3"),
        ("a cat", {"method": "rollout", "discard_ratio": "lots"}, "The discard ratio must be a number, not 'lots'"),
        ("a cat", {"head_grid": "maybe"}, "The head_grid option must be true or false, not 'maybe'"),
    ],
)
def test_bad_requests_get_readable_errors(client, prompts, options, message):
    with pytest.raises(AppError, match=message):
        client.predict(image=handle_file(str(SCENE)), prompts=prompts, api_name="/explain", **options)


def test_a_file_that_is_not_an_image_is_refused_readably(client, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_text("this is not a picture")
    with pytest.raises(AppError, match="not a PNG, JPEG, WEBP, GIF or BMP image"):
        explain(client, fake, ["a cat"])


def test_an_unlisted_model_cannot_be_requested(client):
    with pytest.raises(AppError):  # the dropdown refuses values outside its choices: no arbitrary remote code
        explain(client, SCENE, ["a cat"], model="someone/malicious-repo")


# ---- the cache does not grow ----


def cache_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []


def test_uploads_and_results_leave_the_cache_after_their_lifetime(unconfigured_server, tmp_path):
    """With ``CLIPVIZ_CACHE_SECONDS=6``, N requests (each a different upload, with the per-head grid for more
    result files) fill Gradio's cache; a few seconds later it holds no more files than before the first request."""
    cache = unconfigured_server.workdir / "gradio"
    before = len(cache_files(cache))
    client = Client(unconfigured_server.url, verbose=False)
    for index in range(6):
        image = tmp_path / f"scene_{index}.png"
        with Image.open(SCENE) as scene:
            scene.rotate(index * 15).save(image)  # different bytes: a new cache entry each time
        explain(client, image, ["a photo of a blue circle", "a red square"], method="attention", head_grid=True)
    during = len(cache_files(cache))
    assert during >= before + 6 * 3  # at least the upload and two overlays per request
    deadline = time.monotonic() + 60
    while len(cache_files(cache)) > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(cache_files(cache)) <= before, cache_files(cache)


# ---- a first visit without network ----


def test_offline_the_dropdown_offers_only_models_that_load(server, unconfigured_server):
    embedded = ["embedded: clipviz-tiny-vit", "embedded: clipviz-tiny-resnet"]
    choices = [value for _, value in component_props(unconfigured_server, "model")["choices"]]
    assert choices == embedded  # the Hub did not answer: no Hub repo listed
    configured = [value for _, value in component_props(server, "model")["choices"]]
    assert configured == embedded + CONFIGURED_HUB_REPOS.split(",")  # configured: listed (they fail readably)


def test_photo_examples_are_offered_only_with_a_model_that_knows_photos(unconfigured_server):
    """The default embedded model knows shape scenes: the photo examples stay hidden, the scene examples show."""
    assert component_props(unconfigured_server, "photo-examples")["visible"] is False
    config = httpx.get(unconfigured_server.url + "config", timeout=10).json()
    labels = [c["props"].get("label") for c in config["components"] if c["type"] in ("dataset", "examples")]
    assert "Examples: shape scenes" in labels and "Examples: photographs" in labels


def test_checked_slider_refuses_what_a_slider_cannot_hold():
    import gradio as gr
    from inputs import CheckedSlider

    slider = CheckedSlider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
    assert slider.get_block_name() == "slider"  # gr.Slider's front end
    assert slider.preprocess(0.3) == 0.3 and slider.preprocess("0.25") == 0.25
    for bad, message in [("abc", "must be a number, not 'abc'"), (None, "must be a number, not None"),
                         (1.5, "must be between 0 and 1, not 1.5"), ("-1", "must be between 0 and 1, not -1")]:  # fmt: skip
        with pytest.raises(gr.Error, match=f"The overlay opacity {message}"):
            slider.preprocess(bad)


# ---- files the server must not hand out ----


@pytest.mark.parametrize(
    "path",
    [
        "gradio_api/file=/etc/passwd",
        "gradio_api/file=//etc/passwd",
        "gradio_api/file=../../../../../../etc/passwd",
        "gradio_api/file=..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "gradio_api/file=%2Fetc%2Fpasswd",
        "gradio_api/file=%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "gradio_api/file={app}/../../../../../../etc/passwd",
        "gradio_api/file={app}/app.py",
        "file=/etc/passwd",
        "gradio_api/file=http://169.254.169.254/latest/meta-data/",
        "static/../../../../../../etc/passwd",
        "gradio_api/proxy=http://127.0.0.1:1/",
    ],
)
def test_server_files_are_not_served(server, path):
    url = server.url + path.format(app=str(SPACE))
    response = httpx.get(url, timeout=10, follow_redirects=False)
    assert response.status_code in (400, 403, 404, 405, 422), (url, response.status_code)
    assert "root:" not in response.text and "import gradio" not in response.text


def test_a_path_smuggled_into_the_api_payload_is_refused(server):
    """A client naming a server file instead of uploading one gets an error; the file never reaches the handler."""
    message = raw_explain(server, {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "a cat")
    assert message["success"] is False
    assert "root:" not in json.dumps(message)


def test_oversized_upload_gets_413(server):
    big = b"\x00" * (10 * 1024 * 1024 + 1)
    response = httpx.post(server.url + "gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert response.status_code == 413 and "10" in response.text


def raw_explain(server: SpaceServer, image_payload: dict, prompts: str) -> dict:
    """Join the queue with a hand-made payload and read the server-sent events until the job completes."""
    session = uuid.uuid4().hex
    body = {"data": [image_payload, prompts], "fn_index": server.explain_fn_index(), "session_hash": session}
    joined = httpx.post(server.url + "gradio_api/queue/join", json=body, timeout=10)
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", server.url + f"gradio_api/queue/data?session_hash={session}", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the queue stream ended without a result")


# ---- load ----


def at_once(work, count: int) -> list:
    """``work(0)`` ... ``work(count - 1)`` in threads released together; their results. An exception in any of them
    fails the test (collected: a lost request or broken download must not vanish in a thread)."""
    results: list = [None] * count
    errors: list = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and all(result is not None for result in results), errors
    return results


def test_eight_simultaneous_clients_all_get_their_own_correct_answer(server):
    colours = ["red", "green", "blue", "yellow", "purple", "white", "red", "blue"]
    requests = [
        [f"a photo of a {colour} circle", f"a photo of a {colour} square {i}"] for i, colour in enumerate(colours)
    ]
    reference_client = Client(server.url, verbose=False)
    expected = [explain(reference_client, SCENE, prompts)[1] for prompts in requests]  # one at a time
    results = at_once(lambda i: explain(Client(server.url, verbose=False), SCENE, requests[i]), len(requests))
    for prompts, result, reference in zip(requests, results, expected, strict=True):
        overlays, probabilities = result[0], result[1]
        assert [item["caption"].split(" · ")[0] for item in overlays] == prompts
        got = {c["label"]: c["confidence"] for c in probabilities["confidences"]}
        want = {c["label"]: c["confidence"] for c in reference["confidences"]}
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in got)


def test_identical_requests_at_once_all_get_their_files(server):
    """Two visitors clicking the same example get identical overlays; serving one must not break the other's download
    (Gradio rewrites a returned PIL image's cache file in place, so the Space returns files it wrote itself)."""
    prompts = ["a photo of a purple square", "a photo of a blue circle", "a photo of a white triangle"]
    sessions = [Client(server.url, verbose=False) for _ in range(8)]

    def twice(index: int):
        explain(sessions[index], SCENE, prompts, method="attention", head_grid=True)
        return explain(sessions[index], SCENE, prompts, method="attention", head_grid=True)

    pictures = []
    for overlays, _, _, heads, _ in at_once(twice, len(sessions)):
        assert len(overlays) == len(prompts) and heads
        arrays = []
        for item in overlays + heads:
            with Image.open(item["image"]) as picture:
                arrays.append(np.asarray(picture.convert("RGB")))  # complete, decodable files
        pictures.append(arrays)
    for arrays in pictures[1:]:  # every session got the first one's overlays and head grids, pixel for pixel
        assert len(arrays) == len(pictures[0])
        assert all(np.array_equal(got, want) for got, want in zip(arrays, pictures[0], strict=True))


def test_full_queue_answers_with_a_clear_message():
    small = SpaceServer(CLIPVIZ_QUEUE_SIZE="1", CLIPVIZ_CONCURRENCY="1", **model_env())
    try:
        upload = httpx.post(
            small.url + "gradio_api/upload", files={"files": ("cat.jpg", CAT.read_bytes(), "image/jpeg")}, timeout=30
        ).json()[0]
        image = {"path": upload, "meta": {"_type": "gradio.FileData"}, "orig_name": "cat.jpg"}
        prompts = "\n".join(f"a photo of a thing number {i}" for i in range(8))
        fn_index = small.explain_fn_index()
        statuses: list = []

        def join() -> None:
            body = {"data": [image, prompts, None, "attention", True], "fn_index": fn_index,
                    "session_hash": uuid.uuid4().hex}  # fmt: skip
            response = httpx.post(small.url + "gradio_api/queue/join", json=body, timeout=30)
            statuses.append((response.status_code, response.text))

        threads = [threading.Thread(target=join) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        refused = [text for code, text in statuses if code == 503]
        assert refused, statuses
        assert all("Queue is full" in text for text in refused)
        assert any(code == 200 for code, _ in statuses)
    finally:
        small.stop()


# ---- the upload component ----


def test_upload_component_hands_over_the_stored_path_untouched(tmp_path):
    from gradio.data_classes import ImageData
    from upload import UploadImage

    component = UploadImage(type="filepath")
    assert component.get_block_name() == "image"  # gr.Image's front end: upload, paste, webcam
    stored = tmp_path / "not-even-an-image.png"
    stored.write_text("decoding is imaging.py's job, with its own limits and messages")
    assert component.preprocess(ImageData(path=str(stored))) == str(stored)
    assert component.preprocess(None) is None


def test_data_urls_are_decoded_with_limits():
    import gradio as gr
    import imaging
    from gradio.data_classes import ImageData
    from upload import UploadImage, decode_data_url

    png = (EXAMPLES / "scene_1000000000.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert decode_data_url(url) == png
    assert UploadImage(type="filepath").preprocess(ImageData(url=url)) == png
    for bad in ("data:image/png,notbase64", "data:image/png;base64,***", "data:image/png;base64,"):
        with pytest.raises(imaging.ImageRejected, match="could not be read"):
            decode_data_url(bad)
    huge = "data:image/png;base64," + "A" * (imaging.MAX_UPLOAD_BYTES * 4 // 3 + 8)
    with pytest.raises(gr.Error, match="larger than the 10 MB limit"):
        UploadImage(type="filepath").preprocess(ImageData(url=huge))
