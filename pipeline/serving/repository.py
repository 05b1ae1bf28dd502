"""The models a server serves: several models, each with versions, loaded, reloaded and unloaded without
dropping a request; and admission: a bounded queue per version and a bound on request bytes in flight.

Where models come from (the version policy, README "Several models and versions"):

- `onnxpipe serve RUN [RUN ...]`: each run folder serves its selected variant (or `--variant`) under
  its model's name (or `--name`); run folders with the same name are versions 1, 2, ... of one
  model, in the order given.
- `onnxpipe serve --repository DIR`: Triton's layout. Each DIR/NAME that is a run folder is model
  NAME, version 1; a DIR/NAME whose sub-folders are positive integers holds versions (DIR/NAME/3 is
  version 3). Anything else under DIR is ignored, with a log line.
- A request that names no version goes to the highest version number.

A version is a Deployment: its ServedModel (sha256 check, self-test), its DynamicBatcher, its shadow
and its count of admitted requests. A reload (POST /v2/repository/models/NAME/load, or `--poll-s`
seeing a run folder's selected artifact change) builds a new Deployment beside the old one; the old
one answers every request until the new one has passed its self-test, then new requests go to the new
one while the old one finishes what it admitted and is closed. A new one that fails keeps the old one
serving and records why. Unload removes a model: requests already admitted finish, new ones get 404.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DeviceError, OnnxpipeError
from ..runfolder import Run
from .batcher import DynamicBatcher
from .config import ServeConfig
from .model import ServedModel
from .protocol import RequestError

log = logging.getLogger("onnxpipe.serve")

MANIFEST = "manifest.json"
RETRY_AFTER_S = 1
JSON_COST = 4           # a JSON body is charged this many times its length: what decoding its numbers takes
OFFLOAD_BYTES = 1 << 20  # requests (and answers) larger than this are decoded (encoded) on a thread


class ClientGone(Exception):
    """The client disconnected (or cancelled) while its request was queued or running."""


def deadline(when: float | None):
    """An async scope that raises TimeoutError at event-loop time `when` (None: no deadline)."""
    if when is None:
        return contextlib.nullcontext()
    if hasattr(asyncio, "timeout_at"):  # Python 3.11+
        return asyncio.timeout_at(when)
    return _anyio_deadline(max(0.0, when - asyncio.get_running_loop().time()))


@contextlib.asynccontextmanager
async def _anyio_deadline(seconds: float):
    import anyio

    with anyio.fail_after(seconds):
        yield


class Overloaded(RequestError):
    """Refused at once, before the body is read: 503 with Retry-After (gRPC: UNAVAILABLE)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message, 503)
        self.reason = reason
        self.retry_after = RETRY_AFTER_S


# --- where models come from ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    name: str
    version: str
    root: Path
    variant: str | None = None      # None: the run's selected variant


class Sources:
    """Fixed run folders (`serve RUN ...`) or a repository folder scanned on every index, load and poll."""

    def __init__(self, fixed: list[Source] | None = None, repository: Path | None = None):
        self.fixed, self.repository = fixed or [], Path(repository).resolve() if repository else None

    @classmethod
    def from_runs(cls, runs: list[Path], names: list[str], variant: str | None = None) -> "Sources":
        """One Source per run folder: same-named runs become versions 1, 2, ... in the order given."""
        out, count = [], {}
        for root, name in zip(runs, names):
            count[name] = count.get(name, 0) + 1
            out.append(Source(name, str(count[name]), Path(root).resolve(), variant))
        return cls(out)

    def scan(self) -> tuple[dict[str, list[Source]], dict[str, str]]:
        """({name: its versions' sources, by version number}, {path: why it is not a model})."""
        if self.repository is None:
            found: dict[str, list[Source]] = {}
            for s in self.fixed:
                found.setdefault(s.name, []).append(s)
            return found, {}
        found, skipped = {}, {}
        if not self.repository.is_dir():
            return {}, {str(self.repository): "the repository folder does not exist"}
        for entry in sorted(self.repository.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if (entry / MANIFEST).is_file():
                found[entry.name] = [Source(entry.name, "1", entry)]
                continue
            versions = sorted((int(v.name), v) for v in entry.iterdir()
                              if v.is_dir() and v.name.isdigit() and int(v.name) > 0 and (v / MANIFEST).is_file())
            if versions:
                found[entry.name] = [Source(entry.name, str(n), v) for n, v in versions]
            else:
                skipped[str(entry)] = (f"neither a run folder ({MANIFEST}) nor a folder of numbered versions "
                                       f"(e.g. {entry.name}/1/{MANIFEST})")
        return found, skipped


def fingerprint(source: Source) -> str:
    """What decides whether a version must be reloaded: the variant served, its file's and the reference's sha256."""
    try:
        run = Run.open(source.root)
        variant = source.variant or run.selected
        art = run.artifact(variant) if variant else None
        ref = run.section("reference") or {}
        return f"{variant}:{art.sha256 if art else None}:{ref.get('sha256')}"
    except OnnxpipeError as e:
        return f"unreadable: {e}"


def _manifest_mtime(source: Source) -> float:
    try:
        return os.stat(source.root / MANIFEST).st_mtime_ns
    except OSError:
        return -1


# --- one version being served ----------------------------------------------------------------------------

class Deployment:
    """One version of one model: its ServedModel, batcher, shadow and count of admitted requests."""

    def __init__(self, model: ServedModel, source: Source, cfg: ServeConfig, metrics,
                 load: Callable[[], None] | None = None):
        self.model, self.source, self.cfg, self.metrics = model, source, cfg, metrics
        self.labels = (model.name, model.version)
        self.batcher = DynamicBatcher(model.run_batch, max_batch=cfg.max_batch, max_delay_s=cfg.max_delay_ms / 1000,
                                      metrics=metrics, labels=self.labels)
        self.pending = 0                # admitted, not answered
        self.shadow = None
        self.shadow_error: str | None = None
        self.fingerprint = fingerprint(source)
        self.mtime = _manifest_mtime(source)
        self._load = load or model.load
        self.loaded_at: float | None = None

    @property
    def ready(self) -> bool:
        return self.model.ready

    def load(self) -> None:
        """On a loader thread: sha256 check, session, self-test (model.load), then the shadow's parent session."""
        self._load()
        self.batcher.merge_callers = self.model.row_independent  # an answer depends only on its own request
        if self.model.ready and self.cfg.shadow_rate > 0:
            from .shadow import Shadow

            try:
                self.shadow = Shadow(self.model.run, self.model.variant, rate=self.cfg.shadow_rate,
                                     window=self.cfg.shadow_window, metrics=self.metrics, labels=self.labels)
            except OnnxpipeError as e:  # serving goes on; the metadata and the log say why there is no shadow
                self.shadow_error = str(e)
                log.warning("model %s version %s: no shadow: %s", *self.labels, e)
        self.loaded_at = time.time()

    def metadata(self) -> dict:
        meta = self.model.metadata()
        if self.shadow is not None:
            meta["parameters"]["shadow"] = self.shadow.status()
        elif self.shadow_error:
            meta["parameters"]["shadow"] = {"status": "off", "error": self.shadow_error}
        return meta

    async def retire(self, timeout: float) -> None:
        """Finish every admitted request, then stop the batcher and free the sessions."""
        deadline = time.monotonic() + timeout
        while self.pending > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.batcher.stop(max(0.0, deadline - time.monotonic()))
        if self.shadow is not None:
            self.shadow.close()
        self.model.session = None


# --- admission --------------------------------------------------------------------------------------------

class Ticket:
    """An admitted request: holds its place in its version's queue and its bytes until it is answered."""

    def __init__(self, repo: "Repository", dep: Deployment, cost: int):
        self.repo, self.dep, self.cost = repo, dep, cost

    def grow(self, more: int) -> None:
        """Bytes of a body without Content-Length, as they arrive: refused once over the bound."""
        repo = self.repo
        if repo.inflight_bytes + more > repo.cfg.max_inflight_bytes and repo.inflight_bytes > self.cost:
            repo.metrics.rejected.inc(self.dep.model.name, "inflight_bytes")
            raise Overloaded(repo.bytes_message(more), "inflight_bytes")
        repo.inflight_bytes += more
        self.cost += more

    def release(self) -> None:
        self.repo.inflight_bytes -= self.cost
        self.dep.pending -= 1
        self.repo.metrics.model_queue.set(self.dep.pending, *self.dep.labels)
        self.repo.metrics.inflight_bytes.set(self.repo.inflight_bytes)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


# --- the table of served models ----------------------------------------------------------------------------

class Repository:
    def __init__(self, sources: Sources, cfg: ServeConfig, metrics, initial: list[ServedModel] = (), *,
                 load: Callable[[], None] | None = None, on_fatal: Callable[[BaseException], None] | None = None,
                 device: str = "auto", threads: int | None = None):
        self.sources, self.cfg, self.metrics = sources, cfg, metrics
        self.device, self.threads = device, threads
        self.on_fatal = on_fatal
        self.table: dict[str, dict[str, Deployment]] = {}
        self.problems: dict[tuple[str, str], str] = {}     # (name, version) -> why its last load failed
        self.unloaded: set[str] = set()
        self.inflight_bytes = 0
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="onnxpipe-load")
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._retiring: set[asyncio.Task] = set()
        by_root = {(s.root, s.name): s for s in sources.fixed}
        for i, m in enumerate(initial):
            src = by_root.get((Path(m.run.root).resolve(), m.name)) or Source(m.name, m.version, Path(m.run.root).resolve(),
                                                                              m.variant)
            dep = Deployment(m, src, cfg, metrics, load=load if i == 0 else None)
            self.table.setdefault(m.name, {})[m.version] = dep
            metrics.model_ready.set(0, *dep.labels)
            metrics.model_queue.set(0, *dep.labels)

    # --- lifecycle (on the event loop) -------------------------------------------------------------------
    def start(self) -> None:
        deps = [d for versions in self.table.values() for d in versions.values()]
        for d in deps:
            d.batcher.start()
        self._spawn(self._load_initial(deps))
        if self.cfg.poll_s > 0:
            self._spawn(self._poll())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _load_initial(self, deps: list[Deployment]) -> None:
        for d in deps:
            try:
                await self._run_load(d)
            except DeviceError as e:  # a device that cannot run the model: serving is pointless
                log.error("%s", e)
                if self.on_fatal is not None:
                    self.on_fatal(e)
                return

    async def _run_load(self, dep: Deployment) -> bool:
        await asyncio.get_running_loop().run_in_executor(self._loader, dep.load)
        ok = dep.ready
        self.metrics.model_ready.set(1 if ok else 0, *dep.labels)
        self.metrics.loads.inc(*dep.labels, "ready" if ok else "failed")
        if ok:
            self.problems.pop(dep.labels, None)
        else:
            self.problems[dep.labels] = dep.model.error or "failed"
        return ok

    async def stop(self, timeout: float) -> None:
        for t in list(self._tasks):
            t.cancel()
        deps = [d for versions in self.table.values() for d in versions.values()]
        await asyncio.gather(*(d.retire(timeout) for d in deps), *self._retiring, return_exceptions=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # --- requests ----------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.table)

    def versions(self, name: str) -> list[str]:
        return sorted(self.table.get(name, {}), key=int)

    def resolve(self, name: str, version: str | None) -> Deployment:
        versions = self.table.get(name)
        if not versions:
            if name in self.unloaded:
                raise RequestError(f"model {name!r} is unloaded; POST /v2/repository/models/{name}/load to load it", 404)
            served = ", ".join(map(repr, self.names())) or "no model"
            raise RequestError(f"unknown model {name!r}; this server serves {served}", 404)
        if version is None:
            return versions[max(versions, key=int)]
        dep = versions.get(version)
        if dep is None:
            raise RequestError(f"model {name!r} has no version {version!r} (versions: {', '.join(self.versions(name))})",
                               404)
        return dep

    def not_ready_reason(self, dep: Deployment) -> str:
        m = dep.model
        if m.state == "loading":
            return f"model {m.name!r} is still loading (sha256 check and self-test)"
        return f"model {m.name!r} failed to load: {m.error}"

    def readiness(self) -> tuple[bool, str | None]:
        for name in self.names():
            for v in self.versions(name):
                dep = self.table[name][v]
                if not dep.ready:
                    return False, self.not_ready_reason(dep)
        return True, None

    def bytes_message(self, cost: int) -> str:
        return (f"server busy: {self.inflight_bytes / 2**20:.1f} MB of request bodies are in flight and this one needs "
                f"{cost / 2**20:.1f} MB more, over --max-inflight-mb {self.cfg.max_inflight_mb:g}; retry after "
                f"{RETRY_AFTER_S} s")

    def refusal(self, dep: Deployment, body_bytes: int, json_body: bool) -> Overloaded | None:
        """Why a request for `dep` with a body of `body_bytes` must be refused now (counted), or None."""
        if dep.pending >= self.cfg.max_queue:
            self.metrics.rejected.inc(dep.model.name, "queue_full")
            return Overloaded(f"server busy: model {dep.model.name!r} version {dep.model.version} has {dep.pending} "
                              f"requests waiting, the most --max-queue allows; retry after {RETRY_AFTER_S} s",
                              "queue_full")
        cost = body_bytes * (JSON_COST if json_body else 1)
        if self.inflight_bytes and self.inflight_bytes + cost > self.cfg.max_inflight_bytes:
            self.metrics.rejected.inc(dep.model.name, "inflight_bytes")
            return Overloaded(self.bytes_message(cost), "inflight_bytes")
        return None

    def admit(self, dep: Deployment, body_bytes: int, json_body: bool) -> Ticket:
        """A place in `dep`'s queue and `body_bytes` of the in-flight budget, or Overloaded at once."""
        refused = self.refusal(dep, body_bytes, json_body)
        if refused is not None:
            raise refused
        cost = body_bytes * (JSON_COST if json_body else 1)
        dep.pending += 1
        self.inflight_bytes += cost
        self.metrics.model_queue.set(dep.pending, *dep.labels)
        self.metrics.inflight_bytes.set(self.inflight_bytes)
        return Ticket(self, dep, cost)

    # --- the repository extension ------------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict]:
        """Every model the sources know and every version served: name, version, state, reason."""
        found, _ = self.sources.scan()
        out = []
        for name in sorted(set(found) | set(self.table) | self.unloaded):
            versions = self.table.get(name, {})
            if not versions:
                if not ready_only:
                    on_disk = [s.version for s in found.get(name, [])] or [""]
                    reason = "unloaded" if name in self.unloaded else "not loaded"
                    out += [{"name": name, "version": v, "state": "UNAVAILABLE", "reason": reason} for v in on_disk]
                continue
            for v in self.versions(name):
                dep = versions[v]
                state = {"ready": "READY", "loading": "LOADING"}.get(dep.model.state, "UNAVAILABLE")
                if ready_only and state != "READY":
                    continue
                entry = {"name": name, "version": v, "state": state, "reason": ""}
                if dep.model.state == "failed":
                    entry["reason"] = dep.model.error or "failed"
                elif dep.labels in self.problems:
                    entry["reason"] = f"serving the version loaded before; the last reload failed: {self.problems[dep.labels]}"
                out.append(entry)
        return out

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> dict:
        """Load model `name`, or reload it: versions whose run folder changed are rebuilt beside the old ones
        (which answer until the new ones pass their self-tests), new versions are added, gone ones removed."""
        async with self._lock(name):
            found, skipped = self.sources.scan()
            if name not in found:
                why = next((w for p, w in skipped.items() if Path(p).name == name), None)
                raise RequestError(f"no model {name!r} in the repository" + (f": {why}" if why else
                                   f" (it has {', '.join(map(repr, sorted(found))) or 'none'})"), 404)
            self.unloaded.discard(name)
            current = self.table.setdefault(name, {})
            wanted = {s.version: s for s in found[name]}
            results = {}
            for version, src in wanted.items():
                old = current.get(version)
                if old is not None and old.source.root == src.root and old.fingerprint == fingerprint(src) \
                        and old.model.state != "failed":
                    results[version] = "unchanged"
                    continue
                results[version] = await self._replace(name, version, src, old)
            for version in [v for v in current if v not in wanted]:
                self._retire(current.pop(version))
                results[version] = "removed"
            if not current:
                self.table.pop(name, None)
            return results

    async def _replace(self, name: str, version: str, src: Source, old: Deployment | None) -> str:
        try:
            model = ServedModel.prepare(Run.open(src.root), src.variant, device=self.device, threads=self.threads,
                                        name=name, version=version)
        except OnnxpipeError as e:
            self.problems[(name, version)] = str(e)
            self.metrics.loads.inc(name, version, "failed")
            log.error("model %s version %s cannot be loaded from %s: %s", name, version, src.root, e)
            if old is None:
                raise RequestError(f"model {name!r} version {version} cannot be loaded: {e}", 400) from None
            return f"failed (still serving the version loaded before): {e}"
        dep = Deployment(model, src, self.cfg, self.metrics)
        dep.batcher.start()
        if old is None:  # a new version is visible at once, as loading
            self.table[name][version] = dep
            self.metrics.model_queue.set(0, *dep.labels)
            self.metrics.model_ready.set(0, *dep.labels)
        log.info("%s model %s version %s from %s (variant %s)", "reloading" if old else "loading", name, version,
                 src.root, model.variant)
        try:
            ok = await self._run_load(dep)
        except DeviceError as e:
            ok = False
            self.problems[dep.labels] = str(e)
        if ok:
            self.table[name][version] = dep
            if old is not None:
                self._retire(old)
                log.info("model %s version %s reloaded: new requests go to the new session; the old one finishes "
                         "its %d admitted requests", name, version, old.pending)
            return "loaded"
        if old is not None:  # the old one keeps serving
            self.metrics.model_ready.set(1 if old.ready else 0, *old.labels)
            await dep.retire(0)
            log.error("reload of model %s version %s failed (%s); the version loaded before keeps serving", name,
                      version, dep.model.error)
            return f"failed (still serving the version loaded before): {dep.model.error}"
        return f"failed: {dep.model.error}"

    def _retire(self, dep: Deployment) -> None:
        task = asyncio.get_running_loop().create_task(dep.retire(self.cfg.graceful_timeout_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            versions = self.table.pop(name, None)
            if versions is None:
                if name in self.unloaded:
                    return
                raise RequestError(f"unknown model {name!r}; this server serves "
                                   f"{', '.join(map(repr, self.names())) or 'no model'}", 404)
            self.unloaded.add(name)
            for dep in versions.values():
                self.metrics.model_ready.remove(*dep.labels)
                self.metrics.model_queue.remove(*dep.labels)
                self._retire(dep)
            log.info("unloaded model %s (versions %s); requests already admitted finish", name,
                     ", ".join(sorted(versions, key=int)))

    async def _poll(self) -> None:
        """--poll-s: reload a version whose run folder's selected artifact changed."""
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            for name in list(self.table):
                deps = list(self.table.get(name, {}).values())
                changed = [d for d in deps if _manifest_mtime(d.source) != d.mtime]
                stale = [d for d in changed if fingerprint(d.source) != d.fingerprint]
                for d in changed:
                    d.mtime = _manifest_mtime(d.source)
                if stale or self.sources.repository is not None and self._versions_moved(name):
                    with contextlib.suppress(RequestError):
                        log.info("run folder of model %s changed: reloading", name)
                        await self.load(name)

    def _versions_moved(self, name: str) -> bool:
        found, _ = self.sources.scan()
        return sorted(s.version for s in found.get(name, [])) != self.versions(name)
