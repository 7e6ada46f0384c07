"""clipviz Space: drop in a photo, type a few prompts, see where CLIP looks for each.

UI wiring only: every decision (decoding, limits, prompts, models, maps, scores, which controls apply) lives in
``imaging.py`` and ``explainer.py``, which are unit-tested; this file lays out components and connects events.

Run: ``python space/app.py`` (honours ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``). Settings by environment:
``CLIPVIZ_MODEL``/``CLIPVIZ_REVISION`` (see explainer.py), ``CLIPVIZ_QUEUE_SIZE`` (default 16),
``CLIPVIZ_CONCURRENCY`` (default 1: on a 2-core CPU, requests in parallel only slow each other down),
``CLIPVIZ_CACHE_SECONDS`` (default 900: how long uploads and results stay in Gradio's cache).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import explainer
import gradio as gr
import imaging
from errors import UserError
from inputs import CheckedSlider
from upload import UploadImage

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
QUEUE_SIZE = int(os.environ.get("CLIPVIZ_QUEUE_SIZE", "16"))
CONCURRENCY = int(os.environ.get("CLIPVIZ_CONCURRENCY", "1"))
# uploads and results in Gradio's cache live this long, then go (checked every CACHE_SECONDS / 4, at most a minute)
CACHE_SECONDS = max(1, int(os.environ.get("CLIPVIZ_CACHE_SECONDS", "900")))
DELETE_CACHE = (max(1, min(60, CACHE_SECONDS // 4)), CACHE_SECONDS)
INTRO = """# Where does CLIP look?
Upload, paste or capture a photo, type up to 8 prompts (one per line) and press **Explain**. Each prompt gets its own
heat map over the photo; the bars show how CLIP splits its belief between *your* prompts.
The default model is tiny and trained only on synthetic shapes (try the scene examples); for real photos pick a
converted OpenAI model when the list offers one (photo examples appear with it)."""


def option_control(field: explainer.Field):
    """The component for one registry option, hidden until a method that has it is chosen. Its starting value is
    what an API call that omits it sends: "" (the method's default) for dropdowns, the default for sliders."""
    common = {"label": field.label, "info": field.help, "visible": False, "elem_id": f"option-{field.key}"}
    if field.kind in ("int", "float"):
        step = 1 if field.kind == "int" else 0.01
        low = field.minimum if field.minimum is not None else 0
        high = field.maximum if field.maximum is not None else low + 100 * step
        return CheckedSlider(low, high, value=field.default, step=step, **common)
    # layers and heads: choices follow the model; the registry checks choice values (its message lists them)
    return gr.Dropdown(list(field.choices), value="", allow_custom_value=True, **common)


def build_demo(cache: explainer.ModelCache | None = None) -> gr.Blocks:
    """The Blocks app; ``cache`` defaults to the models listed by ``explainer.model_choices()``. Methods and their
    option controls come from the explanation registry (see ``explainer.option_fields``)."""
    cache = cache or explainer.ModelCache.from_env()
    files = explainer.OutputFiles()
    registry = explainer.page_registry(cache)
    fields = explainer.option_fields(registry)
    with gr.Blocks(title="clipviz: where does CLIP look?", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                image = UploadImage(
                    label="Image",
                    type="filepath",
                    sources=["upload", "clipboard", "webcam"],
                    height=320,
                    elem_id="image",
                )
                prompts = gr.Textbox(
                    label=f"Prompts (one per line, up to {explainer.MAX_PROMPTS})",
                    lines=4,
                    max_lines=explainer.MAX_PROMPTS + 2,
                    value="a photo of a red circle\na photo of a blue square",
                    elem_id="prompts",
                )
                model = gr.Dropdown(list(cache.choices), value=cache.default_label, label="Model", elem_id="model")
                method = gr.Radio(
                    explainer.page_methods(registry), value=explainer.DEFAULT_METHOD, label="Method", elem_id="method"
                )
                with gr.Column(elem_id="method-options"):
                    controls = [option_control(field) for field in fields]
                head_grid = gr.Checkbox(False, label="Also show every head of the method's image layer")
                with gr.Row():
                    alpha = CheckedSlider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                    colormap = gr.Dropdown(list(explainer.COLORMAPS), value="jet", label="Colour map")
                style = gr.Radio(
                    [("Full colour map", "full"), ("Strong regions only (low values transparent)", "fade")],
                    value="full", label="Overlay style", elem_id="style",
                )  # fmt: skip
                run = gr.Button("Explain", variant="primary", elem_id="explain-button")
                status = gr.Markdown(elem_id="model-status")
            with gr.Column(scale=2):
                overlays = gr.Gallery(
                    label="Where CLIP looks, per prompt", columns=2, height="auto", object_fit="contain",
                    elem_id="overlays",
                )  # fmt: skip
                probabilities = gr.Label(
                    label="Zero-shot probabilities (softmax over your prompts)",
                    num_top_classes=explainer.MAX_PROMPTS,
                    elem_id="probabilities",
                )
                tokens = gr.HighlightedText(
                    label="Which words carried the match (relevance per token)", show_legend=False, elem_id="tokens"
                )
                heads = gr.Gallery(label="Every head", columns=4, height="auto", object_fit="contain", visible=False)
                note = gr.Markdown(elem_id="how-to-read")
        scene_rows = explainer.load_examples(EXAMPLES_DIR, "scene")
        if scene_rows:
            gr.Examples(scene_rows, [image, prompts, method], label="Examples: shape scenes", cache_examples=False)
        # photographs only with a model trained on photos: the embedded models would give every prompt the same score
        with gr.Column(visible=cache.knows_photos(cache.default_label), elem_id="photo-examples") as photo_examples:
            photo_rows = explainer.load_examples(EXAMPLES_DIR, "photo")
            if photo_rows:
                gr.Examples(photo_rows, [image, prompts, method], label="Examples: photographs", cache_examples=False)

        names = ["image", "prompts", "model", "method", "head_grid", "opacity", "colormap", "style"]
        names += [field.key for field in fields]

        def explain(*values):
            named = dict(zip(names, values, strict=True))
            try:
                settings = explainer.settings_from_ui(
                    named["method"], named["head_grid"], named["opacity"], named["colormap"], named["style"],
                    {field.key: named[field.key] for field in fields},
                )  # fmt: skip
                result = explainer.run_request(cache, named["image"], named["prompts"], named["model"], settings)
            except UserError as error:
                raise gr.Error(str(error), print_exception=False) from error
            overlays, heads = files.save(result.overlays), files.save(result.head_grid)
            return overlays, result.probabilities, result.token_relevance, heads, result.note

        # the API's parameter names are the controls' names (Gradio reads them from the signature)
        explain.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
        )

        def option_updates(loaded, method_name):
            views = explainer.field_views(loaded, fields, method_name)
            updates = [
                gr.update(visible=view.visible, value=view.value, **({"choices": list(view.choices)} if view.choices else {}))
                if view.visible else gr.update(visible=False)
                for view in views
            ]  # fmt: skip
            return [explainer.method_note(loaded, method_name), *updates]

        def show_model(label, method_name):
            photos = gr.update(visible=cache.knows_photos(label))
            try:
                loaded = cache.get(label)
            except UserError as error:  # e.g. a Hub model while offline: say so, keep the controls as they are
                return [gr.skip(), f"⚠️ {error}", photos, gr.skip()] + [gr.skip()] * len(fields)
            offered = explainer.controls(loaded)
            valid = [value for _, value in offered.methods]
            method_name = method_name if method_name in valid else explainer.DEFAULT_METHOD
            note, *updates = option_updates(loaded, method_name)
            return [gr.update(choices=offered.methods, value=method_name), offered.status, photos, note, *updates]

        def show_method(method_name, label):
            try:
                loaded = cache.get(label)
            except UserError:  # already reported in the status line by show_model
                return [gr.skip()] * (len(fields) + 1)
            return option_updates(loaded, method_name)

        private = {"api_visibility": "private"}
        model_outputs = [method, status, photo_examples, note, *controls]
        model.change(show_model, [model, method], model_outputs, **private)
        demo.load(show_model, [model, method], model_outputs, **private)
        method.change(show_method, [method, model], [note, *controls], **private)
        head_grid.change(lambda show: gr.update(visible=show), head_grid, heads, **private)
        run.click(
            explain,
            [image, prompts, model, method, head_grid, alpha, colormap, style, *controls],
            [overlays, probabilities, tokens, heads, note],
            api_name="explain",
            concurrency_limit=CONCURRENCY,
        )
    return demo


def main() -> None:
    imaging.harden_pillow()
    cache = explainer.ModelCache.from_env()
    try:  # load the default model now, so the first visitor does not wait for it
        cache.get(cache.default_label)
    except UserError as error:
        print(f"clipviz: {error}")  # the page shows it too, in the model status line
    demo = build_demo(cache)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    demo.launch(max_file_size=imaging.MAX_UPLOAD_BYTES, ssr_mode=False, show_error=False)


if __name__ == "__main__":
    main()
