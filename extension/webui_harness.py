"""Run a real WebUI (AUTOMATIC1111 1.10, Forge or Forge Neo) headless with this extension: for the integration tests
and the benchmark. Framework-free (standard library only).

Nothing is fetched or installed. The WebUI is one the user already has, named by environment variables:

``HGDPO_WEBUI_DIR``
    its source tree (the folder with ``launch.py``); a Forge or Forge Neo tree is recognised by
    ``modules_forge/``, and the launch flags each takes are read from its argument parsers
    (:func:`host_flags`).
``HGDPO_WEBUI_PYTHON``
    its Python (default: ``$HGDPO_WEBUI_DIR/venv/bin/python``, where ``webui.sh`` puts it).
``HGDPO_WEBUI_CKPT``
    an SD1.5-architecture checkpoint (``.safetensors``; random weights are fine for the tests).
``HGDPO_WEBUI_SDXL_CKPT``
    an SDXL-base-architecture checkpoint (optional; the SDXL host tests are skipped without it). The WebUIs
    build SDXL from their fixed configs, so it must be full size (random weights are fine).
``HGDPO_WEBUI_ARGS``
    extra launch arguments (optional).

The WebUI runs with ``--skip-prepare-environment`` (no installs, no git), the CPU flags it has unless
``HGDPO_WEBUI_DEVICE=gpu``, the API on, bound to 127.0.0.1 on a free port, and a private ``--data-dir``
holding ``extensions/hgdpo`` (a link to this repository), the checkpoint (a link) and the ``Lora`` and
``pickscore`` model folders the caller fills. The user's WebUI folders are not touched.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTED_LINE = "Startup time:"
"""What AUTOMATIC1111 and Forge print once their start-up, ``app_started`` callbacks included, is over."""
ENV_DIR, ENV_PYTHON, ENV_CKPT, ENV_ARGS, ENV_DEVICE, ENV_SDXL_CKPT = (
    "HGDPO_WEBUI_DIR", "HGDPO_WEBUI_PYTHON", "HGDPO_WEBUI_CKPT", "HGDPO_WEBUI_ARGS", "HGDPO_WEBUI_DEVICE",
    "HGDPO_WEBUI_SDXL_CKPT")


@dataclass
class WebUIConfig:
    webui_dir: Path
    python: Path
    checkpoint: Path
    extra_args: list[str] = field(default_factory=list)
    gpu: bool = False
    sdxl_checkpoint: Path | None = None

    @property
    def is_forge(self) -> bool:
        return (self.webui_dir / "modules_forge").is_dir()


def config_from_environment() -> tuple[WebUIConfig | None, str]:
    """The configured WebUI, or (None, why the integration tests are skipped)."""
    directory = os.environ.get(ENV_DIR)
    if not directory:
        return None, (f"no WebUI to test against: set {ENV_DIR} to an AUTOMATIC1111 1.10, Forge or Forge Neo "
                      f"source tree, {ENV_PYTHON} to its Python and {ENV_CKPT} to an SD1.5 checkpoint")
    webui_dir = Path(directory).expanduser()
    python = Path(os.environ.get(ENV_PYTHON) or webui_dir / "venv" / "bin" / "python").expanduser()
    checkpoint = Path(os.environ.get(ENV_CKPT, "")).expanduser()
    problems = []
    if not (webui_dir / "launch.py").is_file():
        problems.append(f"{ENV_DIR}={webui_dir} has no launch.py")
    if not python.is_file():
        problems.append(f"WebUI Python {python} not found (set {ENV_PYTHON})")
    if not checkpoint.is_file():
        problems.append(f"{ENV_CKPT} must name an SD1.5 .safetensors checkpoint (got {str(checkpoint)!r})")
    if problems:
        return None, "; ".join(problems)
    gpu = os.environ.get(ENV_DEVICE, "cpu").lower() in ("gpu", "cuda")
    sdxl = Path(os.environ[ENV_SDXL_CKPT]).expanduser() if os.environ.get(ENV_SDXL_CKPT) else None
    return WebUIConfig(webui_dir, python, checkpoint, shlex.split(os.environ.get(ENV_ARGS, "")), gpu,
                       sdxl if sdxl is not None and sdxl.is_file() else None), ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_data_dir(root: Path, checkpoint: Path) -> Path:
    """A WebUI ``--data-dir`` with this extension, the checkpoint and empty Lora/pickscore folders."""
    root = Path(root)
    for folder in ("extensions", "models/Stable-diffusion", "models/Lora", "models/pickscore"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for link, target in ((root / "extensions" / "hgdpo", REPO_ROOT),
                         (root / "models" / "Stable-diffusion" / checkpoint.name, checkpoint.resolve())):
        if not link.exists():
            link.symlink_to(target)
    return root


_FLAG = re.compile(r"""add_argument\(\s*["'](--[A-Za-z0-9_-]+)["']""")
_ARGUMENT_FILES = ("modules/cmd_args.py", "modules/paths_internal.py", "backend/args.py")
"""Where AUTOMATIC1111 (``modules/``), Forge and Forge Neo (also ``backend/``) define their launch flags."""


def host_flags(webui_dir: Path) -> set[str]:
    """The launch flags a WebUI tree defines (read from its argument parsers' source, nothing is run)."""
    flags: set[str] = set()
    for name in _ARGUMENT_FILES:
        path = Path(webui_dir) / name
        if path.is_file():
            flags.update(_FLAG.findall(path.read_text(errors="replace")))
    return flags


def cpu_flags(flags: set[str]) -> list[str]:
    """Flags that run everything on the CPU in full precision, by what the WebUI offers."""
    if "--always-cpu" in flags:  # Forge
        return ["--always-cpu"]
    if "--cpu" in flags:  # Forge Neo
        return ["--cpu"]
    return ["--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision", "full"]  # AUTOMATIC1111


class WebUIClient:
    """HTTP calls to a WebUI's API (``WebUIClient("http://127.0.0.1:7860")`` for one that is already running).

    ``auth`` is the ``(user, password)`` of the WebUI's ``--api-auth``, sent as HTTP basic auth.
    """

    def __init__(self, url: str, auth: tuple[str, str] | None = None):
        self.url = url.rstrip("/")
        self.auth = auth

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 1800.0,
                auth: bool = True) -> tuple[int, dict]:
        """``(HTTP status, JSON body)``; ``auth=False`` sends no credentials even when the client has some."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if auth and self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return error.code, json.loads(payload)
            except ValueError:
                return error.code, {"raw": payload.decode(errors="replace")}

    def get(self, path: str, timeout: float = 60.0) -> dict:
        status, payload = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {payload}")
        return payload

    def post(self, path: str, body: dict, timeout: float = 1800.0) -> tuple[int, dict]:
        return self.request("POST", path, body, timeout)


class WebUI(WebUIClient):
    """A WebUI process: ``with WebUI(config, data_dir) as webui: webui.post("/sdapi/v1/txt2img", {...})``."""

    def __init__(self, config: WebUIConfig, data_dir: Path, *, ui: bool = False, startup_timeout: float = 600.0,
                 api_auth: tuple[str, str] | None = None):
        self.config = config
        self.data_dir = Path(data_dir)
        self.ui = ui
        self.startup_timeout = startup_timeout
        self.port = _free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", api_auth)
        self.log_path = self.data_dir / ("webui-ui.log" if ui else "webui.log")
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        checkpoint = self.data_dir / "models" / "Stable-diffusion" / self.config.checkpoint.name
        flags = host_flags(self.config.webui_dir)
        args = [str(self.config.python), "launch.py", "--skip-prepare-environment", "--skip-version-check", "--api",
                "--server-name", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        if "--ckpt" in flags:  # Forge Neo has no --ckpt: it loads the data dir's only checkpoint
            args += ["--ckpt", str(checkpoint)]
        if "--no-download-sd-model" in flags:
            args.append("--no-download-sd-model")
        if not self.ui:
            args.append("--nowebui")
        if not self.config.gpu:
            args += cpu_flags(flags)
        if self.auth is not None:
            args += ["--api-auth", ":".join(self.auth)]
        return args + self.config.extra_args

    def __enter__(self) -> WebUI:  # noqa: PYI034 (a subclass would still get a WebUI)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("MALLOC_ARENA_MAX", "2")
        # large tensors in mmap: freed memory goes back to the system (RSS 5 GB, not 9)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        env.pop("PYTHONPATH", None)
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command(), cwd=self.config.webui_dir, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()  # never leave a WebUI behind (it holds gigabytes)
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The WebUI exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                status, _ = self.request("GET", "/sdapi/v1/samplers", timeout=5)
                # the UI answers before the API routes are mounted (404 until then), and the API before the
                # app_started callbacks have run: a request in between can fail (seen in Forge)
                if status == 200 and STARTED_LINE in self.log_tail(lines=400):
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        raise RuntimeError(f"The WebUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
