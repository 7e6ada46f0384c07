"""Click-to-overlay latency of the Space, through its API and in a real browser, plus 8 simultaneous clients.

For each model (the embedded default, and a full-size ViT-B/16 with random weights saved like a converted repo),
``python space/app.py`` is started on 127.0.0.1 and asked for 1 image × 3 prompts with the relevance method:

* API: ``gradio_client`` ``predict`` from call to return, overlays downloaded (what a script sees);
* browser: headless Debian chromium via Playwright, from the click on **Explain** until every overlay of the new
  answer is decoded on the page (what a person sees). The prompts change every request so each answer is new;
* concurrency: 8 clients submit at the same moment; every answer is checked against the same request made alone.

Prints p50/p95 over ``--requests`` (default 20) after 2 warm-up requests, and writes the numbers as JSON.

    python benchmarks/bench_space.py                      # both models, API + browser + concurrency
    python benchmarks/bench_space.py --models vit-b-16 --no-browser --requests 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "space"
IMAGE = SPACE / "examples" / "chelsea.jpg"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]  # fmt: skip
WARMUP = 2


def prompts_for(index: int) -> list[str]:
    """Three prompts, different for every request (a new answer each time), same token count."""
    return [f"a photo of a cat {index}", f"a photo of a dog {index}", f"a photo of a car {index}"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50_s": round(statistics.median(values), 3),
        "p95_s": round(percentile(values, 0.95), 3),
        "min_s": round(min(values), 3),
        "max_s": round(max(values), 3),
    }


# ---- models ----


def save_vit_b16(folder: Path) -> Path:
    """A full-size ViT-B/16 with random weights, saved as a complete model folder (code, tokenizer, processor)."""
    sys.path.insert(0, str(ROOT))
    from transformers import CLIPImageProcessor

    from clipviz.openai_clip import OPENAI_MEAN, OPENAI_STD
    from clipviz.tokenizer_files import write_tokenizer_files
    from configuration_clipviz import CLIPVizConfig
    from modeling_clipviz import CLIPVizModel

    model = CLIPVizModel(CLIPVizConfig.from_preset("ViT-B/16")).eval()
    model.save_pretrained(folder)
    write_tokenizer_files(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD),
    ).save_pretrained(folder)  # fmt: skip
    return folder


def model_env(name: str, workdir: Path) -> dict:
    if name == "embedded":  # the Space's own lookup: $CLIPVIZ_EMBEDDED_DIR, space/models, then embedded/
        roots = [Path(os.environ["CLIPVIZ_EMBEDDED_DIR"])] if os.environ.get("CLIPVIZ_EMBEDDED_DIR") else []
        if not any((root / "clipviz-tiny-vit" / "config.json").is_file() for root in roots + [ROOT / "embedded"]):
            raise SystemExit("embedded/clipviz-tiny-vit is missing: train it first (python -m clipviz.train_embedded)")
        return {}
    if name == "vit-b-16":
        return {"CLIPVIZ_MODEL": str(save_vit_b16(workdir / "vit-b-16"))}
    raise SystemExit(f"unknown model {name!r}: use embedded or vit-b-16")


# ---- server ----


class Server:
    """``python space/app.py`` on a free port of 127.0.0.1."""

    def __init__(self, env: dict, workdir: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = workdir / f"server-{self.port}.log"
        environment = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(self.port),
                       "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(workdir / "gradio"),
                       "HF_HUB_OFFLINE": "1", "CLIPVIZ_QUEUE_SIZE": "32", **env}  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, str(SPACE / "app.py")], cwd=ROOT, env=environment,
                                            stdout=log, stderr=log)  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the Space exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the Space did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


# ---- measurements ----


def api_latencies(url: str, requests: int) -> tuple[list[float], dict]:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    times = []
    for index in range(WARMUP + requests):
        prompts = prompts_for(index)
        start = time.perf_counter()
        overlays, probabilities, *_ = client.predict(
            image=handle_file(str(IMAGE)), prompts="\n".join(prompts), method="relevance", api_name="/explain"
        )
        elapsed = time.perf_counter() - start
        assert [o["caption"].split(" · ")[0] for o in overlays] == prompts and Path(overlays[0]["image"]).is_file()
        if index >= WARMUP:
            times.append(elapsed)
    return times, probabilities


def browser_latencies(url: str, requests: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.wait_for_selector("#model-status :text('heads')")
        page.set_input_files("#image input[type=file]", str(IMAGE))
        page.wait_for_selector("#image img")
        for index in range(WARMUP + requests):
            prompts = prompts_for(1000 + index)
            page.fill("#prompts textarea", "\n".join(prompts))
            start = time.perf_counter()
            page.click("#explain-button")
            page.wait_for_function(
                """prompts => {
                    const gallery = document.querySelector('#overlays');
                    const images = gallery ? [...gallery.querySelectorAll('img')] : [];
                    return prompts.every(p => gallery.innerText.includes(p + ' ·'))
                        && images.length >= prompts.length && images.every(i => i.complete && i.naturalWidth > 0);
                }""",
                arg=prompts,
                polling="raf",
            )
            if index >= WARMUP:
                times.append(time.perf_counter() - start)
        browser.close()
    return times


def concurrent_clients(url: str, clients: int = 8) -> dict:
    """``clients`` requests at once, each with its own prompts; each answer must equal the same request made alone."""
    from gradio_client import Client, handle_file

    def ask(client, index):
        return client.predict(image=handle_file(str(IMAGE)), prompts="\n".join(prompts_for(5000 + index)),
                              method="relevance", api_name="/explain")  # fmt: skip

    alone = [ask(Client(url, verbose=False), i)[1] for i in range(clients)]
    sessions = [Client(url, verbose=False) for _ in range(clients)]
    results, errors, done = [None] * clients, [], [0.0] * clients
    barrier = threading.Barrier(clients)

    def run(index):
        barrier.wait()
        start = time.perf_counter()
        try:
            results[index] = ask(sessions[index], index)
        except Exception as error:  # counted as lost
            errors.append(repr(error))
        done[index] = time.perf_counter() - start

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    correct = 0
    for index, result in enumerate(results):
        if result is None:
            continue
        got = {c["label"]: c["confidence"] for c in result[1]["confidences"]}
        want = {c["label"]: c["confidence"] for c in alone[index]["confidences"]}
        captions = [o["caption"].split(" · ")[0] for o in result[0]]
        if (
            got.keys() == want.keys()
            and all(abs(got[k] - want[k]) < 1e-5 for k in got)
            and captions == prompts_for(5000 + index)
        ):
            correct += 1
    return {"clients": clients, "correct": correct, "lost": len(errors), "errors": errors,
            "slowest_s": round(max(done), 3), "fastest_s": round(min(done), 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,vit-b-16", help="comma-separated: embedded, vit-b-16")
    parser.add_argument("--requests", type=int, default=20, help="measured requests per mode (after 2 warm-ups)")
    parser.add_argument("--no-browser", action="store_true", help="skip the browser measurement")
    parser.add_argument("--output", default=str(ROOT / "artifacts" / "bench_space.json"))
    args = parser.parse_args(argv)
    if args.requests < 20:
        parser.error("--requests must be at least 20 for a meaningful p95")
    browser = not args.no_browser and shutil.which(CHROMIUM) is not None
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "request": "1 image (451x300 JPEG) x 3 prompts, relevance", "models": {},
              "load_average_before": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="bench-space-"))
    try:
        for name in args.models.split(","):
            server = Server(model_env(name, workdir), workdir)
            try:
                api, _ = api_latencies(server.url, args.requests)
                entry = {"api": summary(api)}
                if browser:
                    entry["browser"] = summary(browser_latencies(server.url, args.requests))
                entry["concurrency"] = concurrent_clients(server.url)
            finally:
                server.stop()
            entry["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
            report["models"][name] = entry
            print(f"{name}: {json.dumps(entry)}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(report)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report['request']} on {report['machine']}; load average before: {report['load_average_before']}")
    print(f"{'model':<10} {'mode':<8} {'p50 s':>7} {'p95 s':>7} {'n':>4}")
    for name, entry in report["models"].items():
        for mode in ("api", "browser"):
            if mode in entry:
                row = entry[mode]
                print(f"{name:<10} {mode:<8} {row['p50_s']:>7.3f} {row['p95_s']:>7.3f} {row['n']:>4}")
        c = entry["concurrency"]
        print(f"{name:<10} {'8 at once':<8} correct {c['correct']}/{c['clients']}, lost {c['lost']}, "
              f"slowest {c['slowest_s']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
