"""An image input whose bytes reach :func:`imaging.decode_image` untouched.

Why not plain ``gr.Image``: its preprocessing opens the upload with Pillow's default limits before our code runs, and
anything Pillow cannot read surfaces as a generic "Error processing input" instead of a sentence the user can act on.
This component keeps ``gr.Image``'s front end (upload, paste, webcam; ``is_template`` tells Gradio to use it) and
hands over only the file Gradio has already checked and stored in its upload cache; decoding, limits and error
messages are ours.
"""

from __future__ import annotations

import base64
import binascii

import gradio as gr
import imaging


class UploadImage(gr.Image):
    """``gr.Image`` that passes the stored upload's path (or a data URL's bytes) to the handler without decoding."""

    is_template = True  # no __init__ override: Gradio reads the front-end props from gr.Image's signature

    def preprocess(self, payload) -> str | bytes | None:
        """The cached upload's path (Gradio has already refused paths outside its cache), or a data URL's bytes."""
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            try:
                return decode_data_url(payload.url)
            except imaging.ImageRejected as error:
                raise gr.Error(str(error), print_exception=False) from error
        if not payload.path:
            raise gr.Error("The image did not arrive; please upload it again.")
        return payload.path


def decode_data_url(url: str) -> bytes:
    """Bytes of a base64 ``data:`` URL, refusing oversized or malformed ones before decoding them."""
    header, _, data = url.partition(",")
    if not header.endswith(";base64") or not data:
        raise imaging.ImageRejected("The pasted image could not be read (expected a base64 data URL).")
    if len(data) > imaging.MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise imaging.ImageRejected(
            f"This image is larger than the {imaging.MAX_UPLOAD_BYTES / 2**20:.0f} MB limit. Please use a smaller one."
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise imaging.ImageRejected("The pasted image could not be read (invalid base64 data).") from error
