"""The Space as a server for tests: ``SpaceServer`` runs ``python space/app.py`` in a subprocess on a free port
(offline, its own Gradio temp folder), ``shared_server()`` is one such server per test process, ``model_env()``
says where it finds its models. Used by test_space_app.py, test_space_browser.py and test_publish_space.py."""

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "space"

EXAMPLES = SPACE / "examples"
SCENE = EXAMPLES / "scene_1000000001.png"  # a purple square, a white triangle and a blue circle
CAT = EXAMPLES / "chelsea.jpg"  # 451x300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SpaceServer:
    """``python space/app.py`` in a subprocess on a free port, stopped with the test process."""

    def __init__(self, app: Path = SPACE / "app.py", cwd: Path = ROOT, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.workdir = Path(tempfile.mkdtemp(prefix="clipviz-space-"))
        self.log = self.workdir / "server.log"
        environment = {
            **os.environ,
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(self.port),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_TEMP_DIR": str(self.workdir / "gradio"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(app)], cwd=cwd, env=environment, stdout=log, stderr=log
            )
        atexit.register(self.stop)
        self._wait_until_up()

    def _wait_until_up(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Space exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the Space did not answer within {timeout:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def explain_fn_index(self) -> int:
        config = httpx.get(self.url + "config", timeout=10).json()
        return next(d["id"] for d in config["dependencies"] if d.get("api_name") == "explain")


def model_env() -> dict:
    """Where the server finds its models: the repository's embedded models through the Space's default lookup
    (``../embedded``) when both are there; otherwise a folder with whichever exist and, for the others, tiny random
    models with the same layout (weights + code + tokenizer + processor config)."""
    names = {"clipviz-tiny-vit": "vit", "clipviz-tiny-resnet": "resnet"}
    if all((ROOT / "embedded" / name / "config.json").is_file() for name in names):
        return {}
    from tests.helpers import save_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="clipviz-space-models-"))
    atexit.register(shutil.rmtree, folder, True)
    for name, backbone in names.items():
        real = ROOT / "embedded" / name
        if (real / "config.json").is_file():
            (folder / name).symlink_to(real, target_is_directory=True)
        else:
            save_tiny_model(folder / name, backbone)
    return {"CLIPVIZ_EMBEDDED_DIR": str(folder)}


CONFIGURED_HUB_REPOS = "clipviz/clip-vit-b-16,clipviz/clip-vit-b-32"


@functools.cache
def shared_server() -> SpaceServer:
    """One server for this module and the browser test (started once per test process): offline
    (``HF_HUB_OFFLINE=1``) with two Hub repos configured, which are listed but cannot load."""
    return SpaceServer(CLIPVIZ_HUB_REPOS=CONFIGURED_HUB_REPOS, **model_env())
