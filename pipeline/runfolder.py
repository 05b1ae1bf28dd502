"""A run folder and its manifest.json: the contract every stage reads and extends.

    exports/<run>/
      manifest.json      schema, model + config, dataset, versions, artifacts, metrics, parity, selected
      model.pt           variant "torch" (state_dict + config; loads with torch.load(weights_only=True))
      model.onnx         variant "onnx"
      reference.npz      a few test inputs and the torch outputs for them (serving self-test)
      checkpoints/       training checkpoints (for --resume)

Every file is written atomically and its sha256 is checked whenever a stage loads it.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import sha256_file, write_json
from .errors import ArtifactError, RunFolderError

SCHEMA = 1
MANIFEST = "manifest.json"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


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

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "variant"}
        return d


class Run:
    """An open run folder. `manifest` is the parsed manifest.json; `save()` writes it atomically."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    # --- create / open ---------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, model: str, model_config: dict, dataset: dict, *, force: bool = False) -> "Run":
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
        }
        run = cls(root, manifest)
        run.save()
        return run

    @classmethod
    def open(cls, root: str | Path) -> "Run":
        root = Path(root)
        if not root.is_dir():
            raise RunFolderError(f"run folder {root} does not exist; create one with `onnxpipe train MODEL` or `onnxpipe run`")
        path = root / MANIFEST
        if not path.is_file():
            raise RunFolderError(f"{root} is not an onnxpipe run folder: it has no {MANIFEST}")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunFolderError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None
        if not isinstance(manifest, dict) or manifest.get("tool") != "onnxpipe" or "artifacts" not in manifest:
            raise RunFolderError(f"{path} is not an onnxpipe manifest")
        if manifest.get("schema") != SCHEMA:
            raise RunFolderError(f"{path} has schema {manifest.get('schema')}, this onnxpipe reads schema {SCHEMA}")
        return cls(root, manifest)

    def save(self) -> None:
        write_json(self.root / MANIFEST, self.manifest)

    # --- model -----------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def spec(self):
        """The run's ModelSpec: a registered model, a user factory, or an imported ONNX graph ("model_source")."""
        from .models import get_model

        source = self.manifest.get("model_source")
        if source is None:
            return get_model(self.model_name)
        if source.get("kind") == "factory":
            from .core.byo import spec_from_source

            return spec_from_source(source)
        if source.get("kind") == "onnx":
            from .stages.importer import imported_spec

            return imported_spec(self.model_name, source)
        raise RunFolderError(f"{self.root / MANIFEST}: unknown model_source kind {source.get('kind')!r}")

    def model_config(self):
        from .models import replace_config

        return replace_config(self.spec.config_cls(), self.manifest["model_config"])

    # --- artifacts -------------------------------------------------------------------------------
    def variants(self) -> list[str]:
        return list(self.manifest["artifacts"])

    def has(self, variant: str) -> bool:
        return variant in self.manifest["artifacts"]

    def artifact(self, variant: str) -> Artifact:
        try:
            rec = self.manifest["artifacts"][variant]
        except KeyError:
            have = ", ".join(self.variants()) or "none"
            raise ArtifactError(f"run {self.root} has no variant {variant!r} (it has: {have})") from None
        return Artifact(variant=variant, **rec)

    def add_artifact(self, variant: str, file: str | Path, *, stage: str, parent: str | None = None,
                     format: str = "onnx", lossy: bool = False, config: dict | None = None,
                     opset: int | None = None, extra: dict | None = None, save: bool = True) -> Artifact:
        """Record a file that a stage has already written (atomically) into the run folder."""
        file = Path(file)
        rel = file.relative_to(self.root) if file.is_absolute() else file
        existing = self.manifest["artifacts"].get(variant)
        if existing and existing["stage"] != stage:
            raise ArtifactError(f"variant {variant!r} belongs to stage {existing['stage']!r}; stage {stage!r} may not overwrite it")
        full = self.root / rel
        art = Artifact(variant=variant, path=str(rel), sha256=sha256_file(full), bytes=full.stat().st_size,
                       stage=stage, parent=parent, format=format, lossy=lossy, config=config or {},
                       opset=opset, extra=extra or {})
        self.manifest["artifacts"][variant] = art.to_json()
        if save:
            self.save()
        return art

    def path(self, variant: str, *, verify: bool = True) -> Path:
        """The artifact's file, after checking it exists and its sha256 matches the manifest."""
        art = self.artifact(variant)
        full = self.root / art.path
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
        """[variant, parent, grandparent, ...] up to the root."""
        chain = [variant]
        while (parent := self.artifact(chain[-1]).parent) and parent not in chain:
            chain.append(parent)
        return chain

    # --- metrics / parity ------------------------------------------------------------------------
    def set_metrics(self, variant: str, save: bool = True, **values: Any) -> None:
        self.manifest["metrics"].setdefault(variant, {}).update(values)
        if save:
            self.save()

    def metrics(self, variant: str) -> dict:
        return self.manifest["metrics"].get(variant, {})

    def record_parity(self, entry: dict, save: bool = True) -> None:
        """Add a parity result, replacing an older one for the same (reference, candidate) pair."""
        key = (entry["reference"], entry["candidate"])
        self.manifest["parity"] = [p for p in self.manifest["parity"] if (p["reference"], p["candidate"]) != key]
        self.manifest["parity"].append(entry)
        if save:
            self.save()
