"""The one exception type whose message is written for the person using the Space.

Why a shared base: the UI layer (``app.py``) turns exactly these into ``gr.Error`` toasts and lets anything else
surface as an internal error. Modules below it (image decoding, prompt parsing, model loading) stay free of Gradio
and are unit-tested on their own.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the request (image, prompts, options, model choice) that the user can fix; the message says how."""
