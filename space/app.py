"""clipviz Space: drop in a photo, type a few prompts, see where CLIP looks for each.

UI wiring only: every decision (decoding, limits, prompts, models, maps, scores, which controls apply) lives in
``imaging.py`` and ``explainer.py``, which are unit-tested; this file lays out components and connects events.

Run: ``python space/app.py`` (honours ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``). Settings by environment:
``CLIPVIZ_MODEL``/``CLIPVIZ_REVISION`` (see explainer.py), ``CLIPVIZ_QUEUE_SIZE`` (default 16),
``CLIPVIZ_CONCURRENCY`` (default 1: on a 2-core CPU, requests in parallel only slow each other down).
"""

from __future__ import annotations

import os
from pathlib import Path

import explainer
import gradio as gr
import imaging
from errors import UserError
from upload import UploadImage

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
QUEUE_SIZE = int(os.environ.get("CLIPVIZ_QUEUE_SIZE", "16"))
CONCURRENCY = int(os.environ.get("CLIPVIZ_CONCURRENCY", "1"))
INTRO = """# Where does CLIP look?
Upload, paste or capture a photo, type up to 8 prompts (one per line) and press **Explain**. Each prompt gets its own
heat map over the photo; the bars show how CLIP splits its belief between *your* prompts.
The default model is tiny and trained only on synthetic shapes (try the scene examples); pick a converted OpenAI
model for real photos."""


def build_demo(cache: explainer.ModelCache | None = None) -> gr.Blocks:
    """The Blocks app; ``cache`` defaults to the models listed by ``explainer.model_choices()``."""
    cache = cache or explainer.ModelCache.from_env()
    files = explainer.OutputFiles()
    with gr.Blocks(title="clipviz: where does CLIP look?") as demo:
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
                    [(explainer.METHOD_LABELS[m], m) for m in explainer.METHODS], value="relevance", label="Method"
                )
                with gr.Group(visible=False) as attention_controls:
                    layer = gr.Dropdown(["last"], value="last", label="Layer", allow_custom_value=True)
                    head = gr.Dropdown(
                        list(explainer.HEAD_FUSIONS), value="mean", label="Head (or mean/max over heads)",
                        allow_custom_value=True,
                    )  # fmt: skip
                    head_grid = gr.Checkbox(False, label="Also show every head of this layer")
                with gr.Accordion("Rollout options", open=False, visible=False) as rollout_controls:
                    head_fusion = gr.Radio(list(explainer.ROLLOUT_FUSIONS), value="mean", label="Head fusion")
                    ratio = explainer.DISCARD_RATIO
                    discard_ratio = gr.Slider(
                        ratio.minimum, ratio.maximum - 0.01 * ratio.maximum_exclusive, value=ratio.default, step=0.01,
                        label="Discard ratio",
                    )  # fmt: skip
                with gr.Accordion("Relevance options", open=False) as relevance_controls:
                    start_layer = gr.Dropdown(
                        ["last"], value="last", label="First layer used (earlier: sharper, slower)",
                        allow_custom_value=True,
                    )  # fmt: skip
                with gr.Row():
                    alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                    colormap = gr.Dropdown(list(explainer.COLORMAPS), value="jet", label="Colour map")
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
                note = gr.Markdown(explainer.method_note("relevance", "vit"), elem_id="how-to-read")
        rows = explainer.load_examples(EXAMPLES_DIR)
        if rows:
            gr.Examples(rows, [image, prompts, method], label="Examples", cache_examples=False)

        def explain(
            image, prompts, model, method, layer, head, head_grid, opacity, colormap, head_fusion, discard_ratio,
            start_layer,
        ):  # fmt: skip
            try:
                settings = explainer.settings_from_ui(
                    method, layer, head, head_grid, opacity, colormap, head_fusion, discard_ratio, start_layer
                )
                result = explainer.run_request(cache, image, prompts, model, settings)
            except UserError as error:
                raise gr.Error(str(error), print_exception=False) from error
            overlays, heads = files.save(result.overlays), files.save(result.head_grid)
            return overlays, result.probabilities, result.token_relevance, heads, result.note

        def show_model(label, method_name):
            try:
                offered = explainer.controls(cache.get(label))
            except UserError as error:  # e.g. a Hub model while offline: say so, keep the controls as they are
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠️ {error}"
            valid = [m for _, m in offered.methods]
            return (
                gr.update(choices=offered.methods, value=method_name if method_name in valid else "relevance"),
                gr.update(choices=offered.layers, value="last", visible=offered.has_layers),
                gr.update(choices=offered.heads, value="mean"),
                gr.update(choices=offered.layers, value="last"),
                gr.update(visible=offered.has_layers and method_name == "relevance"),
                offered.status,
            )

        def show_method(method_name, label):
            try:
                backbone = cache.get(label).backbone
            except UserError:  # already reported in the status line by show_model
                backbone = "vit"
            return (
                gr.update(visible=method_name == "attention"),
                gr.update(visible=method_name == "rollout"),
                gr.update(visible=method_name == "relevance" and backbone == "vit"),
                explainer.method_note(method_name, backbone),
            )

        private = {"api_visibility": "private"}
        model_outputs = [method, layer, head, start_layer, relevance_controls, status]
        model.change(show_model, [model, method], model_outputs, **private)
        demo.load(show_model, [model, method], model_outputs, **private)
        method.change(
            show_method, [method, model], [attention_controls, rollout_controls, relevance_controls, note], **private
        )
        head_grid.change(lambda show: gr.update(visible=show), head_grid, heads, **private)
        run.click(
            explain,
            [image, prompts, model, method, layer, head, head_grid, alpha, colormap, head_fusion, discard_ratio,
             start_layer],
            [overlays, probabilities, tokens, heads, note],
            api_name="explain",
            concurrency_limit=CONCURRENCY,
        )  # fmt: skip
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
