"""Start a real headless ComfyUI with this pack, queue API prompts over HTTP, collect results, stop it.

The server runs with `--base-directory` pointing at a fresh folder holding links to this pack (and
the dev nodes the tests and demo use) and to the model files, so the ComfyUI tree is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

log = logging.getLogger("tlora.harness")

ROOT = Path(__file__).resolve().parents[2]
DEV_NODES = ROOT / "tools" / "comfy_dev_nodes"


def comfy_path() -> Path:
    p = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".host" / "ComfyUI")
    if not (p / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {p}: run `bash scripts/setup_host.sh` or set COMFYUI_PATH")
    return p


def host_version(path: Path | None = None) -> str:
    """The ComfyUI version of a host (`comfyui_version.py`), e.g. "0.3.75"."""
    text = ((path or comfy_path()) / "comfyui_version.py").read_text()
    m = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return m.group(1) if m else "unknown"


def pinned_frontend(path: Path | None = None) -> str | None:
    """The frontend version a host pins in its requirements.txt, e.g. "1.49.6"."""
    req = (path or comfy_path()) / "requirements.txt"
    m = re.search(r"^comfyui-frontend-package==([\d.]+)", req.read_text() if req.is_file() else "", re.M)
    return m.group(1) if m else None


def frontend_static(version: str) -> Path:
    """Where scripts/setup_host.sh installs frontend `version`: the folder `--front-end-root` takes."""
    return ROOT / ".host" / "frontend" / version / "comfyui_frontend_package" / "static"


def frontend_root(path: Path | None = None) -> Path | None:
    """The frontend this host pins, where scripts/setup_host.sh installed it for the host (.host/frontend/<v>)."""
    version = pinned_frontend(path)
    return frontend_static(version) if version and frontend_static(version).is_dir() else None


def venv_python() -> str:
    py = ROOT / ".venv" / "bin" / "python"
    return str(py) if py.exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """A ComfyUI process on a free loopback port. Use as a context manager."""

    def __init__(self, base_dir: Path, models: dict[str, list[Path]] | None = None, env: dict | None = None,
                 extra_args: list[str] | None = None, startup_timeout: float = 120, gpu: bool = False,
                 frontend: str | None = None):
        self.base = Path(base_dir)
        self.models = models or {}
        self.env = env or {}
        self.extra_args = extra_args or []
        self.startup_timeout = startup_timeout
        self.gpu = gpu  # False: --cpu (tests); True: ComfyUI picks its device and memory mode (benchmarks on a GPU)
        self.frontend = frontend  # a frontend version from .host/frontend; None: the one the host pins
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.client_id = uuid.uuid4().hex

    # --- lifecycle ---------------------------------------------------------------------------
    def _layout(self) -> None:
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self._link(ROOT, self.base / "custom_nodes" / "ComfyUI-TLoRA")
        self._link(DEV_NODES, self.base / "custom_nodes" / "ComfyUI-TLoRA-dev")
        for folder, files in self.models.items():
            d = self.base / "models" / folder
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                self._link(Path(f), d / Path(f).name)

    @staticmethod
    def _link(src: Path, dst: Path) -> None:
        src = Path(src).absolute()  # a relative target would dangle from inside the base directory
        if dst.is_symlink() or dst.exists():
            if dst.is_symlink() and os.readlink(dst) == str(src):
                return
            dst.unlink()
        dst.symlink_to(src)

    def start(self) -> ComfyServer:
        self._layout()
        comfy = comfy_path()
        cmd = [venv_python(), "main.py", *([] if self.gpu else ["--cpu"]), "--listen", "127.0.0.1", "--port",
               str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        web = frontend_root(comfy)
        if self.frontend is not None:
            web = frontend_static(self.frontend)
            if not web.is_dir():
                raise ServerError(f"frontend {self.frontend} is not installed at {web}: run "
                                  "`bash scripts/setup_host.sh` (it installs every frontend the browser tier tests)")
        if web is not None:
            cmd += ["--front-end-root", str(web)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in self.env.items()}}
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} during start-up\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {self.startup_timeout}s\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._logf.close()
        self.proc = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # --- HTTP --------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
            ctype = r.headers.get("Content-Type", "")
        return json.loads(body) if "json" in ctype else body

    def post(self, path: str, payload: object = None, timeout: float = 30):
        data = json.dumps({} if payload is None else payload).encode()  # False, 0 and "" are values too
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None
        return json.loads(body) if body else None

    def queue(self, prompt: dict) -> str:
        res = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running a prompt\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout}s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600, expect_error: bool = False) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        status = entry.get("status", {})
        failed = status.get("status_str") == "error"
        if failed and not expect_error:
            raise ServerError(f"prompt failed: {error_message(entry)}\n{self.log_tail()}")
        if expect_error and not failed:
            raise ServerError("prompt was expected to fail but succeeded")
        return entry

    def images(self, entry: dict) -> list[bytes]:
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                q = f"/view?filename={img['filename']}&subfolder={img.get('subfolder', '')}&type={img['type']}"
                out.append(self.get(q))
        return out


def error_message(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
    return "unknown error"
