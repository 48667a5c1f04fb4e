"""A headless ComfyUI server ($COMFYUI_PATH/main.py, CPU, 127.0.0.1, a free port) with the pack linked
into a temporary base directory, for the tests that drive ComfyUI over HTTP or in a browser."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def wait_for_prompt(url: str, prompt_id: str, deadline: float) -> dict:
    """Poll /history until prompt ``prompt_id`` finishes; returns its history entry."""
    while time.monotonic() < deadline:
        entry = get_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"]["completed"] or entry and entry["status"]["status_str"] == "error":
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def run_prompt(url: str, prompt: dict, deadline: float) -> dict:
    """POST an API-format workflow and wait for it; returns its history entry."""
    body = json.dumps({"prompt": prompt, "client_id": "pec-test"}).encode()
    request = urllib.request.Request(f"{url}/prompt", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        prompt_id = json.loads(response.read())["prompt_id"]
    return wait_for_prompt(url, prompt_id, deadline)


@contextlib.contextmanager
def comfyui_server(base: Path, real_frontend: bool):
    """Start ComfyUI with ``base`` as base directory (the pack linked as custom_nodes/ComfyUI-PEC, as
    ComfyUI-Manager names it); yields ``(url, /object_info)``; stops the process group after.
    ``real_frontend=False`` serves an empty page instead of the front-end package (HTTP tests only)."""
    (base / "custom_nodes").mkdir(exist_ok=True)
    (base / "custom_nodes" / "ComfyUI-PEC").symlink_to(REPO, target_is_directory=True)
    port = _free_port()
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    command += ["--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes"]
    if not real_frontend:
        (base / "frontend").mkdir()
        (base / "frontend" / "index.html").write_text("<html></html>")
        command += ["--front-end-root", str(base / "frontend")]
    log = open(base / "comfyui.log", "wb")
    process = subprocess.Popen(
        command,
        cwd=os.environ["COMFYUI_PATH"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # start-up imports torch and every core node: minutes on a busy CPU
        while True:
            try:
                info = get_json(f"{url}/object_info")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "ComfyUI did not start:\n" + (base / "comfyui.log").read_text()[-3000:]
                    ) from None
                time.sleep(1)
        yield url, info
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
