"""What the web package needs outside Python: npm packages, a loopback server and headless Chromium.

- `npm_modules(cache, {name: version})`: the exact versions installed from the npm registry with npm itself
  into a cache folder (once; later packages reuse it), install scripts off. onnxruntime-web is vendored from
  there into each package, playwright-core drives the browser for `--check`.
- `serve(folder)`: the folder over HTTP on 127.0.0.1 (a free port), with the module and wasm MIME types the
  page needs and cross-origin isolation headers, plus a private path for the check's own files (never
  written into the package).
- `drive_page(...)`: pipeline/package/driver/check_page.cjs under node, against the system's Chromium
  (Debian's `chromium`: Playwright downloads no browser here), headless, sandbox and GPU off, no background
  networking.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

from ..errors import ArtifactError, ConfigError, DeviceError

ASSETS = Path(__file__).resolve().parent.parent / "package"
WEB_ASSETS = ASSETS / "web"
DRIVER = ASSETS / "driver" / "check_page.cjs"
CHECK_PREFIX = "/__onnxpipe_check__/"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")
# The files of onnxruntime-web's WASM-only build that the page loads: its ES module, the Emscripten glue and
# the SIMD wasm binary (the npm package ships no separate licence file; its package.json says MIT, and the
# bundles carry Microsoft's notice).
ORT_WEB_FILES = ("dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm")


def npm_cache(configured: str | None) -> Path:
    """Where npm installs onnxpipe's JavaScript dependencies."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("ONNXPIPE_NPM_CACHE"):
        return Path(os.environ["ONNXPIPE_NPM_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "onnxpipe" / "npm"


def _installed_version(modules: Path, name: str) -> str | None:
    try:
        return json.loads((modules / name / "package.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def npm_modules(cache: Path, packages: dict[str, str], *, timeout: float = 600.0) -> Path:
    """node_modules holding exactly `packages` ({name: version}), installed by npm into `cache` if missing."""
    modules = cache / "node_modules"
    with _locked(cache):
        missing = {n: v for n, v in packages.items() if _installed_version(modules, n) != v}
        if not missing:
            return modules
        npm = shutil.which("npm")
        if npm is None:
            raise ConfigError("npm is not installed, and the web package vendors onnxruntime-web from the npm registry "
                              "with it: install Node.js and npm (Debian: apt-get install -y nodejs npm)")
        if not (cache / "package.json").is_file():
            (cache / "package.json").write_text(json.dumps({"name": "onnxpipe-npm-cache", "private": True}) + "\n")
        cmd = [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--ignore-scripts", "--save-exact",
               *(f"{n}@{v}" for n, v in missing.items())]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ArtifactError(f"npm install of {', '.join(missing)} did not finish in {timeout:.0f} s") from None
        wrong = {n: _installed_version(modules, n) for n, v in missing.items() if _installed_version(modules, n) != v}
        if done.returncode != 0 or wrong:
            tail = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
            raise ArtifactError(f"npm could not install {', '.join(f'{n}@{v}' for n, v in missing.items())} into {cache} "
                                f"(exit {done.returncode}: {tail[:300]}); check that the npm registry is reachable, or "
                                "point --npm-cache at a folder where they are installed")
    return modules


def vendor_ort_web(modules: Path, dest: Path) -> dict:
    """Copy onnxruntime-web's WASM build into `dest` (the package's ort/ folder); {files, version, license}."""
    root = modules / "onnxruntime-web"
    meta = json.loads((root / "package.json").read_text())
    copied = {}
    for rel in ORT_WEB_FILES:
        src = root / rel
        if not src.is_file():
            raise ArtifactError(f"{src} is missing from the installed onnxruntime-web; delete {modules.parent} and "
                                "package again to reinstall it")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / Path(rel).name)
        copied[Path(rel).name] = str(rel)
    return {"files": copied, "version": meta.get("version"), "license": meta.get("license")}


# --- a loopback server ---------------------------------------------------------------------------------

def _handler(folder: Path, private: Path | None):
    from http.server import SimpleHTTPRequestHandler

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                          ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
                          ".onnx": "application/octet-stream", ".ort": "application/octet-stream"}

        def translate_path(self, path):
            if private is not None and path.startswith(CHECK_PREFIX):
                name = Path(path[len(CHECK_PREFIX):].split("?", 1)[0]).name
                return str(private / name)
            return super().translate_path(path)

        def end_headers(self):
            # Cross-origin isolation: the page's clock then ticks in microseconds instead of Chromium's coarse
            # 100 us (the in-page latency), and nothing from another origin could load anyway.
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

        def log_message(self, format, *args):  # noqa: A002  (the base class's name)
            pass

    return functools.partial(Handler, directory=str(folder))


@contextlib.contextmanager
def serve(folder: Path, private: Path | None = None) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (a free port) for the block; yields the base URL."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(folder, private))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- headless Chromium -------------------------------------------------------------------------------

def chromium_version(executable: str) -> str:
    try:
        done = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def require_chromium(executable: str) -> None:
    path = Path(executable)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise DeviceError(f"--check runs the page in headless Chromium, and there is none at {executable}: install "
                          "Debian's (apt-get update && apt-get install -y chromium) or pass --chromium PATH")
    if shutil.which("node") is None:
        raise ConfigError("--check drives Chromium with playwright-core under Node.js, and node is not installed "
                          "(Debian: apt-get install -y nodejs npm)")


def drive_page(modules: Path, job: dict, workdir: Path, *, timeout: float) -> dict:
    """Run the check driver on `job` (see check_page.cjs) and return its result."""
    job_file, result_file = workdir / "job.json", workdir / "result.json"
    job_file.write_text(json.dumps({**job, "args": list(CHROMIUM_FLAGS), "timeout_ms": int(timeout * 1000)}))
    env = {**os.environ, "NODE_PATH": str(modules)}
    try:
        done = subprocess.run(["node", str(DRIVER), str(job_file), str(result_file)], capture_output=True, text=True,
                              timeout=timeout + 30, env=env)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"the browser check did not finish in {timeout:.0f} s (raise --timeout)") from None
    if done.returncode != 0 or not result_file.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ArtifactError(f"the page could not be run in headless Chromium ({job['executable']}): {tail[:400]}")
    return json.loads(result_file.read_text())
