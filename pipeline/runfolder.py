"""A run folder and its manifest.json: the contract every stage reads and extends (layer 1).

    exports/<run>/
      manifest.json      schema, model + config, dataset, versions, artifacts, metrics, parity, selected
      model.pt           variant "torch" (state_dict + config; loads with torch.load(weights_only=True))
      model.onnx         variant "onnx"
      reference.npz      test inputs, their labels and the root variant's outputs (serving self-test)
      checkpoints/       training checkpoints (for --resume)

This module knows no stage and no model library. What it guarantees:

- **Typed access.** Stages read and change the manifest through `Run`'s methods (`artifact`, `add_artifact`,
  `remove_variant`, `set_metrics`, `record_parity`, `set_selected`, `section` / `set_section`, `spec_of`,
  `lineage`, `budget_for`); raw dict edits stay in this file.
- **Concurrent stages lose nothing.** Every change is a read-modify-write of the manifest *as it is on disk*,
  under an advisory lock on the run folder; `with run.batch():` groups several changes into one write.
- **The run folder is a trust boundary.** Every path read from a manifest goes through `Run.file`, which
  refuses absolute paths, `..` and links that leave the folder, before anything is opened, copied,
  embedded or deleted.
- **Every load is checked.** A manifest is validated on open (a malformed record is one error naming the
  field; unknown keys from a newer onnxpipe are kept and ignored), and an artifact's sha256 is checked
  whenever it is loaded.
- **Model sources register, the run folder does not import them.** A run's model comes from the registry,
  a user's factory or an imported graph; each kind registers a resolver with `register_model_source`
  (pipeline/core/sources.py does this for the three kinds).

Schema 1 is kept (old run folders load unchanged). New optional fields (an artifact's `model` record,
`reference.labels`) are additions a schema-1 reader ignores.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterator

from .atomic import sha256_file, write_json
from .errors import ArtifactError, RunFolderError

SCHEMA = 1
MANIFEST = "manifest.json"

# Top-level manifest keys and the JSON type each must have (None: any). Others are kept and ignored.
KNOWN_KEYS: dict[str, type | tuple | None] = {
    "schema": int, "tool": str, "model": str, "model_config": dict, "dataset": (dict, type(None)),
    "created": str, "versions": dict, "artifacts": dict, "metrics": dict, "parity": list,
    "selected": (str, type(None)), "size": str, "model_source": (dict, type(None)), "reference": dict,
}


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# --- model sources ---------------------------------------------------------------------------------------

ModelResolver = Callable[[str, "dict | None"], Any]
_MODEL_SOURCES: dict[str, ModelResolver] = {}


def register_model_source(kind: str, resolver: ModelResolver) -> None:
    """`resolver(model_name, source_record) -> ModelSpec` for runs whose model_source has this kind
    ("registry" for built-in names, whose record is None)."""
    _MODEL_SOURCES[kind] = resolver


# --- artifacts -------------------------------------------------------------------------------------------

@dataclass
class Artifact:
    variant: str
    path: str                 # relative to the run folder
    sha256: str
    bytes: int
    stage: str
    parent: str | None = None
    format: str = "onnx"      # "onnx" or "torch"
    lossy: bool = False       # lossy steps are judged by task budgets, lossless ones by tensor tolerances
    config: dict = field(default_factory=dict)
    opset: int | None = None
    extra: dict = field(default_factory=dict)
    # The network a torch variant holds: {"name": model name, "config": {...}} (a student or a pruned model
    # differs from the run's model). None: the same network as its parent (ONNX variants) or the run's model.
    model: dict | None = None

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "variant"}
        if d["model"] is None:
            del d["model"]
        return d

    @classmethod
    def from_json(cls, variant: str, rec: dict) -> "Artifact":
        known = {f.name for f in fields(cls)} - {"variant"}
        return cls(variant=variant, **{k: v for k, v in rec.items() if k in known})

    def model_record(self) -> dict | None:
        if self.model:
            return self.model
        if "model" in self.extra and "model_config" in self.extra:  # distill's record before the `model` field
            return {"name": self.extra["model"], "config": self.extra["model_config"]}
        return None


_ARTIFACT_FIELDS = {"path": str, "sha256": str, "bytes": int, "stage": str, "parent": (str, type(None)),
                    "format": str, "lossy": bool, "config": dict, "opset": (int, type(None)), "extra": dict,
                    "model": (dict, type(None))}
_REQUIRED = ("path", "sha256", "bytes", "stage")


def validate_manifest(m: Any, where: Path) -> dict:
    """The manifest if it has the shape this onnxpipe reads; one RunFolderError naming the field otherwise."""
    def bad(what: str) -> RunFolderError:
        return RunFolderError(f"{where} is malformed: {what}; the run folder is damaged (re-run the stage "
                              "that wrote it, or make the run again)")

    if not isinstance(m, dict) or m.get("tool") != "onnxpipe" or "artifacts" not in m:
        raise RunFolderError(f"{where} is not an onnxpipe manifest")
    if m.get("schema") != SCHEMA:
        raise RunFolderError(f"{where} has schema {m.get('schema')!r}, this onnxpipe reads schema {SCHEMA}")
    for key, kind in KNOWN_KEYS.items():
        if key in m and kind is not None and not isinstance(m[key], kind):
            raise bad(f"{key!r} is a {type(m[key]).__name__}")
    for key in ("model", "artifacts"):
        if key not in m:
            raise bad(f"it has no {key!r}")
    for v, rec in m["artifacts"].items():
        if not isinstance(rec, dict):
            raise bad(f"artifacts[{v!r}] is a {type(rec).__name__}, not an object")
        for k in _REQUIRED:
            if k not in rec:
                raise bad(f"artifacts[{v!r}] has no {k!r}")
        for k, kind in _ARTIFACT_FIELDS.items():
            if k in rec and not isinstance(rec[k], kind) or (k == "bytes" and isinstance(rec.get(k), bool)):
                raise bad(f"artifacts[{v!r}].{k} is a {type(rec[k]).__name__}")
    for v, rec in m.get("metrics", {}).items():
        if not isinstance(rec, dict):
            raise bad(f"metrics[{v!r}] is a {type(rec).__name__}, not an object")
    for i, p in enumerate(m.get("parity", [])):
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("reference", "candidate", "rule")) \
                or not isinstance(p.get("passed"), bool):
            raise bad(f"parity[{i}] needs string reference, candidate and rule and a boolean passed")
    ref = m.get("reference")
    if ref is not None and not (isinstance(ref.get("path"), str) and isinstance(ref.get("sha256"), str)):
        raise bad("reference needs a string path and sha256")
    m.setdefault("metrics", {})
    m.setdefault("parity", [])
    m.setdefault("selected", None)
    return m


# --- the run folder --------------------------------------------------------------------------------------

class Run:
    """An open run folder. Read with the accessors; every change goes through a locked read-modify-write."""

    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root)
        self._m = manifest
        self._batch: dict | None = None

    # --- create / open ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, model: str, model_config: dict, dataset: dict | None, *,
               force: bool = False, extra: dict | None = None) -> "Run":
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            if not force:
                raise RunFolderError(
                    f"{root} already holds a run; pass --resume to continue it, --force to replace it, "
                    "or choose another folder with --run"
                )
            if not (root / MANIFEST).exists():
                raise RunFolderError(f"refusing to replace {root}: it is not an onnxpipe run folder (no {MANIFEST})")
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema": SCHEMA,
            "tool": "onnxpipe",
            "model": model,
            "model_config": model_config,
            "dataset": dataset,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
            "artifacts": {},
            "metrics": {},
            "parity": [],
            "selected": None,
            **(extra or {}),
        }
        write_json(root / MANIFEST, manifest)
        return cls(root, manifest)

    @classmethod
    def open(cls, root: str | Path) -> "Run":
        root = Path(root)
        if not root.is_dir():
            raise RunFolderError(f"run folder {root} does not exist; create one with `onnxpipe train MODEL` or `onnxpipe run`")
        return cls(root, cls._read_from(root))

    @staticmethod
    def _read_from(root: Path) -> dict:
        path = root / MANIFEST
        if not path.is_file():
            raise RunFolderError(f"{root} is not an onnxpipe run folder: it has no {MANIFEST}")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None
        return validate_manifest(manifest, path)

    @property
    def manifest(self) -> dict:
        """A snapshot (deep copy) of the manifest, for tools and tests; changes to it are not saved."""
        return copy.deepcopy(self._cur)

    @property
    def _cur(self) -> dict:
        return self._batch if self._batch is not None else self._m

    # --- changing it: locked read-modify-write ----------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive advisory lock on the run folder itself (flock on the directory: no extra file, and
        the manifest can still be replaced by rename)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks
            yield
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def batch(self) -> Iterator["Run"]:
        """Group changes: the lock is held and the manifest written once, when the block ends without error."""
        if self._batch is not None:
            yield self
            return
        with self._locked():
            self._batch = self._read_from(self.root)
            try:
                yield self
                # Under the lock, a half-written manifest can only be a writer's that was killed: clear it.
                for stale in self.root.glob(f".{MANIFEST}.*.tmp"):
                    stale.unlink(missing_ok=True)
                write_json(self.root / MANIFEST, self._batch)
                self._m = self._batch
            finally:
                self._batch = None

    def _mutate(self, fn: Callable[[dict], Any]) -> Any:
        if self._batch is not None:
            return fn(self._batch)
        with self.batch():
            return fn(self._batch)

    def reload(self) -> "Run":
        """Re-read the manifest from disk (another process may have changed it)."""
        self._m = self._read_from(self.root)
        return self

    # --- paths inside the run folder (the trust boundary) --------------------------------------------------
    def file(self, rel: str, *, what: str = "file") -> Path:
        """`rel` (a path recorded in the manifest) inside the run folder, or a RunFolderError.

        Refused: absolute paths, drive letters, `..` components and links that resolve outside the folder."""
        if not isinstance(rel, str) or not rel.strip():
            raise RunFolderError(f"{self.root / MANIFEST}: the {what} path {rel!r} is empty or not a string")
        posix, win = PurePosixPath(rel), PureWindowsPath(rel)
        if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
            raise RunFolderError(f"{self.root / MANIFEST}: the {what} path {rel!r} leaves the run folder; "
                                 "manifest paths must be relative paths inside it (the manifest was edited or "
                                 "is not trustworthy)")
        full = self.root / rel
        base = self.root.resolve()
        if not full.resolve().is_relative_to(base):
            raise RunFolderError(f"{self.root / MANIFEST}: the {what} path {rel!r} is a link that resolves outside "
                                 f"the run folder ({full.resolve()}); refusing to use it")
        return full

    def checked_file(self, rel: str, sha256: str, *, what: str, remake: str) -> Path:
        """A recorded non-artifact file (reference.npz, ...) inside the folder, with its sha256 checked."""
        full = self.file(rel, what=what)
        if not full.is_file():
            raise ArtifactError(f"{what} {full} is missing; {remake}")
        if sha256_file(full) != sha256:
            raise ArtifactError(f"{what} {full} changed since it was recorded (sha256 mismatch); {remake}")
        return full

    # --- the model ---------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._cur["model"]

    def _model_record(self, variant: str | None) -> tuple[str, dict]:
        if variant is not None:
            for v in self.lineage(variant):
                rec = self.artifact(v).model_record()
                if rec:
                    return rec["name"], rec["config"]
        return self._cur["model"], self._cur.get("model_config", {})

    def spec_of(self, variant: str | None = None):
        """The ModelSpec that built `variant` (its own for a student of another model, the imported graph's
        for an import); the run's model when `variant` is None."""
        name, _ = self._model_record(variant)
        source = self._cur.get("model_source") if name == self._cur["model"] else None
        kind = source.get("kind") if isinstance(source, dict) else "registry"
        resolver = _MODEL_SOURCES.get(kind)
        if resolver is None:
            known = ", ".join(sorted(_MODEL_SOURCES)) or "none (import onnxpipe.core.sources)"
            raise RunFolderError(f"{self.root / MANIFEST}: no resolver for model source kind {kind!r} (known: {known})")
        return resolver(name, source)

    def recorded_model_config(self, variant: str | None = None) -> dict:
        """The settings of the network behind `variant` as recorded (plain data: its config's fields). Unlike
        model_config_of this imports no model library (the server reads it without importing torch)."""
        return dict(self._model_record(variant)[1])

    def model_config_of(self, variant: str | None = None):
        """The config dataclass of the network behind `variant` (see spec_of)."""
        _, values = self._model_record(variant)
        return self.spec_of(variant).config_from(values)

    @property
    def spec(self):
        return self.spec_of(None)

    def model_config(self):
        return self.model_config_of(None)

    # --- artifacts -------------------------------------------------------------------------------------
    def variants(self) -> list[str]:
        return list(self._cur["artifacts"])

    def has(self, variant: str) -> bool:
        return variant in self._cur["artifacts"]

    def artifact(self, variant: str) -> Artifact:
        rec = self._cur["artifacts"].get(variant)
        if rec is None:
            have = ", ".join(self.variants()) or "none"
            raise ArtifactError(f"run {self.root} has no variant {variant!r} (it has: {have})")
        return Artifact.from_json(variant, rec)

    def add_artifact(self, variant: str, file: str | Path, *, stage: str, parent: str | None = None,
                     format: str = "onnx", lossy: bool = False, config: dict | None = None,
                     opset: int | None = None, extra: dict | None = None, model: dict | None = None) -> Artifact:
        """Record a file that a stage has already written (atomically) into the run folder."""
        file = Path(file)
        rel = str(file.relative_to(self.root) if file.is_absolute() else file)
        full = self.file(rel, what=f"artifact {variant!r}")
        art = Artifact(variant=variant, path=rel, sha256=sha256_file(full), bytes=full.stat().st_size,
                       stage=stage, parent=parent, format=format, lossy=lossy, config=config or {},
                       opset=opset, extra=extra or {}, model=model)

        def apply(m: dict) -> None:
            existing = m["artifacts"].get(variant)
            if existing and existing.get("stage") != stage:
                raise ArtifactError(f"variant {variant!r} belongs to stage {existing.get('stage')!r}; "
                                    f"stage {stage!r} may not overwrite it")
            m["artifacts"][variant] = art.to_json()

        self._mutate(apply)
        return art

    def remove_variant(self, variant: str, *, stage: str) -> None:
        """Drop a variant that `stage` made (its file, record, metrics and parity entries).

        The file is deleted only through `file()`: a record pointing outside the run folder is an error and
        nothing is deleted."""
        if not self.has(variant):
            return
        art = self.artifact(variant)
        if art.stage != stage:
            raise ArtifactError(f"variant {variant!r} belongs to stage {art.stage!r}; {stage} may not remove it")
        target = self.file(art.path, what=f"artifact {variant!r}")

        def apply(m: dict) -> None:
            m["artifacts"].pop(variant, None)
            m["metrics"].pop(variant, None)
            m["parity"] = [p for p in m["parity"] if variant not in (p["reference"], p["candidate"])]
            if m.get("selected") == variant:
                m["selected"] = "onnx" if "onnx" in m["artifacts"] else None

        self._mutate(apply)
        target.unlink(missing_ok=True)

    def path(self, variant: str, *, verify: bool = True) -> Path:
        """The artifact's file inside the run folder, after checking it exists and its sha256 matches."""
        art = self.artifact(variant)
        full = self.file(art.path, what=f"artifact {variant!r}")
        if not full.is_file():
            raise ArtifactError(f"artifact {variant!r} is missing: {full} does not exist")
        if verify:
            digest = sha256_file(full)
            if digest != art.sha256:
                raise ArtifactError(
                    f"artifact {variant!r} ({full}) changed since it was recorded: sha256 {digest[:12]}... "
                    f"!= {art.sha256[:12]}...; re-run the stage that made it ({art.stage})"
                )
        return full

    def lineage(self, variant: str) -> list[str]:
        """[variant, parent, grandparent, ...] up to the root (or the first ancestor no longer recorded)."""
        chain = [variant]
        while (parent := self.artifact(chain[-1]).parent) and parent not in chain and self.has(parent):
            chain.append(parent)
        return chain

    def root_variant(self, variant: str) -> str:
        return self.lineage(variant)[-1]

    def steps(self, reference: str, candidate: str) -> list[str]:
        """The variants made on the way from `reference` to `candidate` (candidate first)."""
        chain = self.lineage(candidate)
        return chain[: chain.index(reference)] if reference in chain else chain

    def is_lossy(self, reference: str, candidate: str) -> bool:
        return any(self.artifact(v).lossy for v in self.steps(reference, candidate))

    def budget_for(self, candidate: str, reference: str | None = None) -> dict | None:
        """The budget recorded on the way from `reference` (default: the root) to `candidate`, by the step
        nearest the reference: a student's budget against its teacher also covers the student's INT8 child
        when compared with the teacher. None when no step recorded one (the parity policy's default applies)."""
        for v in reversed(self.steps(reference or self.root_variant(candidate), candidate)):
            budget = self.artifact(v).extra.get("budget")
            if budget:
                return dict(budget)
        return None

    # --- metrics, parity, selection ---------------------------------------------------------------------
    def metrics(self, variant: str) -> dict:
        return self._cur["metrics"].get(variant, {})

    def set_metrics(self, variant: str, **values: Any) -> None:
        self._mutate(lambda m: m["metrics"].setdefault(variant, {}).update(values))

    def parity(self, *, candidate: str | None = None, reference: str | None = None) -> list[dict]:
        return [p for p in self._cur["parity"]
                if (candidate is None or p["candidate"] == candidate) and (reference is None or p["reference"] == reference)]

    def record_parity(self, *entries: dict) -> None:
        """Add parity results, each replacing an older one for the same (reference, candidate) pair."""
        def apply(m: dict) -> None:
            for entry in entries:
                key = (entry["reference"], entry["candidate"])
                m["parity"] = [p for p in m["parity"] if (p["reference"], p["candidate"]) != key]
                m["parity"].append(entry)

        self._mutate(apply)

    @property
    def selected(self) -> str | None:
        return self._cur.get("selected")

    def set_selected(self, variant: str | None, *, selection: dict | None = None, only_if_unset: bool = False) -> None:
        """The one place `selected` is written (with the selection record that explains it)."""
        if variant is not None and not self.has(variant):
            raise ArtifactError(f"cannot select {variant!r}: run {self.root} has no such variant")

        def apply(m: dict) -> None:
            if only_if_unset and m.get("selected"):
                return
            m["selected"] = variant
            if selection is not None:
                m["selection"] = selection

        self._mutate(apply)

    # --- other sections (dataset, training, distillation, quantize, bench, explain, ...) ------------------
    def section(self, name: str, default: Any = None) -> Any:
        """A top-level manifest section as recorded (do not modify it: use set_section / update_section)."""
        return self._cur.get(name, default)

    def set_section(self, name: str, value: Any) -> None:
        if name in ("artifacts", "metrics", "parity", "selected", "schema", "tool"):
            raise ValueError(f"{name!r} has its own methods on Run")
        self._mutate(lambda m: m.__setitem__(name, value))

    def update_section(self, name: str, **values: Any) -> None:
        """Merge `values` into the dict section `name` (created if absent)."""
        def apply(m: dict) -> None:
            current = m.get(name)
            m[name] = {**(current if isinstance(current, dict) else {}), **values}

        self._mutate(apply)

    @property
    def dataset_info(self) -> dict | None:
        return self._cur.get("dataset")
