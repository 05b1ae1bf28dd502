"""`onnxpipe serve`: from the command line's run folders (or repository) and flags to running servers.

Everything that can be refused is refused here, before a port opens (one `error:` line, exit 1): a
run folder without a selected ONNX variant, a --device cuda without CUDA, a bad setting. The
settings flow one way: ServeConfig's defaults, then what `onnxpipe tune` wrote into the run (when
one run is served), then the flags given."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError
from ..runfolder import Run
from ..stages.configs import build_config
from .config import TUNED, ServeConfig
from .model import ServedModel
from .repository import Source, Sources


def tuned_settings(run: Run) -> dict | None:
    """{"settings": {...}, "when": ...} that `onnxpipe tune` recorded in the run, or None."""
    rec = run.section("serving") or {}
    settings = {k: v for k, v in (rec.get("settings") or {}).items() if k in TUNED}
    return {"settings": settings, "when": rec.get("when", "?")} if settings else None


@dataclass
class Plan:
    """What to serve and how: picklable, so that --workers processes can each build their own models."""

    sources: Sources
    listed: list[Source]
    cfg: ServeConfig
    device: str
    tuned: dict | None = None

    def models(self) -> list[ServedModel]:
        return [ServedModel.prepare(Run.open(s.root), s.variant, device=self.device, threads=self.cfg.threads,
                                    name=s.name, version=s.version) for s in self.listed]


def plan(run_dirs: list[Path], repository: Path | None, *, variant: str | None, name: str | None, device: str,
         flags: dict) -> Plan:
    from ..core import sources as _model_sources  # noqa: F401  (model-source resolvers)

    if bool(run_dirs) == (repository is not None):
        raise ConfigError("give run folders (onnxpipe serve exports/cnn [exports/lstm ...]) or --repository DIR, "
                          "not both and not neither")
    if repository is not None:
        if variant or name:
            raise ConfigError("--variant and --name apply to run folders given one by one, not to --repository "
                              "(there each model's folder name is its name and it serves its selected variant)")
        sources = Sources(repository=Path(repository))
        found, skipped = sources.scan()
        if not found:
            why = "; ".join(f"{p}: {w}" for p, w in skipped.items()) or "it is empty"
            raise ConfigError(f"no run folders in repository {repository}: {why}")
        listed = [s for model in sorted(found) for s in found[model]]
    else:
        runs = [Run.open(r) for r in run_dirs]
        sources = Sources.from_runs(run_dirs, [name or r.model_name for r in runs], variant)
        listed = sources.fixed
    tuned, section = None, None
    if len(listed) == 1 and (rec := tuned_settings(Run.open(listed[0].root))):
        given = {k for k, v in flags.items() if v is not None}
        section = {k: v for k, v in rec["settings"].items() if k not in given}
        tuned = {"when": rec["when"], "applied": section} if section else None
    cfg = build_config(ServeConfig, section, flags, stage="serve")
    if cfg.workers > 1 and cfg.threads is None:  # the cores are shared out among the workers
        from ..core.timing import usable_cores

        cfg = replace(cfg, threads=max(1, usable_cores() // cfg.workers))
    return Plan(sources, listed, cfg, device, tuned)


def main(run_dirs: list[Path], repository: Path | None, *, variant: str | None, name: str | None, device: str,
         flags: dict) -> int:
    p = plan(run_dirs, repository, variant=variant, name=name, device=device, flags=flags)
    models = p.models()   # every refusal (no variant, no CUDA, ...) happens here, before a port opens
    if p.cfg.workers > 1:
        from .workers import supervise

        return supervise(p, models)
    from .app import serve

    return serve(models, p.cfg, sources=p.sources, tuned=p.tuned)
