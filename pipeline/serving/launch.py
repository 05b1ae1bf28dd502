"""`onnxpipe serve`: from the command line's run folders (or repository) and flags to running servers.

Everything that can be refused is refused here, before a port opens (one `error:` line, exit 1): a
run folder without a selected ONNX variant, a --device cuda without CUDA, a bad setting. The
settings flow one way: ServeConfig's defaults, then what `onnxpipe tune` wrote into the run (one run
served), then the flags given."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..runfolder import Run
from ..stages.configs import build_config
from .config import TUNED, ServeConfig
from .model import ServedModel
from .repository import Sources


def tuned_settings(run: Run) -> dict | None:
    """{"settings": {...}, "when": ...} that `onnxpipe tune` recorded in the run, or None."""
    rec = run.section("serving") or {}
    settings = {k: v for k, v in (rec.get("settings") or {}).items() if k in TUNED}
    return {"settings": settings, "when": rec.get("when", "?")} if settings else None


def plan(run_dirs: list[Path], repository: Path | None, *, variant: str | None, name: str | None, device: str,
         flags: dict) -> tuple[list[ServedModel], Sources, ServeConfig, dict | None]:
    """(the models to serve, where reloads find them, the settings, the tuned settings applied)."""
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
        listed = [s for name_ in sorted(found) for s in found[name_]]
    else:
        runs = [Run.open(r) for r in run_dirs]
        names = [name or r.model_name for r in runs]
        sources = Sources.from_runs(run_dirs, names, variant)
        listed = sources.fixed
    tuned = None
    if len(listed) == 1:
        rec = tuned_settings(Run.open(listed[0].root))
        if rec:
            given = {k for k, v in flags.items() if v is not None}
            applied = {k: v for k, v in rec["settings"].items() if k not in given}
            tuned = {"when": rec["when"], "applied": applied} if applied else None
            cfg = build_config(ServeConfig, applied, flags, stage="serve")
        else:
            cfg = build_config(ServeConfig, None, flags, stage="serve")
    else:
        cfg = build_config(ServeConfig, None, flags, stage="serve")
    threads = cfg.threads
    models = [ServedModel.prepare(Run.open(s.root), s.variant, device=device, threads=threads, name=s.name,
                                  version=s.version) for s in listed]
    return models, sources, cfg, tuned


def main(run_dirs: list[Path], repository: Path | None, *, variant: str | None, name: str | None, device: str,
         flags: dict) -> int:
    models, sources, cfg, tuned = plan(run_dirs, repository, variant=variant, name=name, device=device, flags=flags)
    if cfg.workers > 1:
        from .workers import supervise

        return supervise(run_dirs, repository, variant=variant, name=name, device=device, cfg=cfg, tuned=tuned)
    from .app import serve

    return serve(models, cfg, sources=sources, tuned=tuned)
