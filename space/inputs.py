"""A slider whose value, as sent by any client, is checked with a message that names the control.

Why not plain ``gr.Slider``: its preprocessing compares the payload with the bounds before our code runs, so an API
client sending ``opacity="abc"`` gets Python's ``TypeError`` as Gradio's generic "Error" instead of a sentence it can
act on. This component keeps ``gr.Slider``'s front end (``is_template``) and checks the value first.
"""

from __future__ import annotations

import gradio as gr
from errors import UserError
from explainer import parse_number


class CheckedSlider(gr.Slider):
    """``gr.Slider`` that refuses a non-numeric or out-of-range value with a readable ``gr.Error``."""

    is_template = True  # no __init__ override: Gradio reads the front-end props from gr.Slider's signature

    def preprocess(self, payload) -> float:
        """The value as a float within ``[minimum, maximum]``, rounded as ``gr.Slider`` does."""
        name = (self.label or "slider value").lower()
        try:
            value = parse_number(payload, name)
        except UserError as error:
            raise gr.Error(str(error), print_exception=False) from error
        if not self.minimum <= value <= self.maximum:
            raise gr.Error(
                f"The {name} must be between {self.minimum:g} and {self.maximum:g}, not {value:g}.",
                print_exception=False,
            )
        return super().preprocess(value)
