"""Every stage's settings: one frozen dataclass per stage, with its defaults, help text and checks.

Config flows one way: these defaults (the numbers of the parity policy come from POLICY), then the
stage's section of a `--config` file, then command-line flags; `build_config` (pipeline/core/config.py)
applies them in that order for `onnxpipe run` and for each `onnxpipe STAGE` command alike, and the
CLI's `--help` text is the `help` of these fields. `asdict(cfg)` goes into the manifest with every
artifact, so each one carries the exact settings that made it.

This module imports nothing heavy, so `onnxpipe --help` stays instant."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..core.policy import POLICY, Budget
from ..errors import ConfigError


def setting(default, help: str, **kw):
    """A config field with its help text (shown by the CLI and in README tables)."""
    return field(default=default, metadata={"help": help}, **kw)


def help_of(cls, name: str) -> str:
    """The field's help text plus its default, for a CLI option."""
    f = next(f for f in fields(cls) if f.name == name)
    default = f.default
    shown = "" if default is None else f" [default: {','.join(map(str, default)) if isinstance(default, tuple) else default}]"
    return f.metadata.get("help", "") + shown


def _finite(cls_name: str, **values) -> None:
    for name, v in values.items():
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ConfigError(f"{name} must be a finite number, got {v!r}")


def _tuple(obj, *names: str) -> None:
    """Lists from a config file become the tuples the frozen dataclass promises."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, list):
            object.__setattr__(obj, name, tuple(value))


def _positive(values, what: str) -> None:
    if values is not None and (not values or min(values) < 1):
        raise ConfigError(f"{what} must be >= 1, got {list(values)}")


# --- train ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(20, "Maximum epochs (early stop on validation plateau).")
    lr: float = setting(3e-3, "Peak learning rate of the one-cycle schedule.")
    batch_size: int = setting(32, "Global batch size (with --nproc, split over the processes).")
    weight_decay: float = setting(1e-4, "AdamW weight decay.")
    label_smoothing: float = setting(0.0, "Label smoothing of the cross-entropy.")
    patience: int = setting(8, "Epochs without a better validation accuracy before stopping.")
    augment_shift: int = setting(0, "Random +/- pixel shifts for image models (0 = off).")
    mixup: float = setting(0.0, "Beta(a, a) mixup of input pairs (0 = off); labels mix with the same weight.")
    seed: int = setting(0, "Seed for initialization, batch order and augmentation.")
    threads: int | None = setting(None, "torch intra-op threads (default: torch's own).")

    def __post_init__(self):
        _finite("train", lr=self.lr, weight_decay=self.weight_decay, label_smoothing=self.label_smoothing,
                mixup=self.mixup)
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")


# --- export / optimize ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportConfig:
    opset: int | None = setting(None, "ONNX opset (default: the model's, 18; 23 for transformer).")
    atol: float = setting(POLICY.tensor.atol, "Max abs error allowed vs PyTorch on the shape grid.")
    rtol: float = setting(POLICY.tensor.rtol, "Relative error allowed vs PyTorch.")
    batches: tuple[int, ...] = setting(POLICY.batches, "Batch sizes of the parity grid.")
    seq_lens: tuple[int, ...] | None = setting(None, "Sequence lengths of the grid (default: 1, T, 2T).")

    def __post_init__(self):
        _tuple(self, "batches", "seq_lens")
        _finite("export", atol=self.atol, rtol=self.rtol)
        if self.opset is not None and not 13 <= self.opset <= 23:
            raise ConfigError(f"opset must be between 13 and 23, got {self.opset}")
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError("atol and rtol must be >= 0")
        _positive(self.batches, "batches")
        _positive(self.seq_lens, "seq_lens")


SAVE_LEVELS = ("basic", "extended")          # portable: no hardware-specific layouts in the file
HARDWARE_LEVELS = ("layout", "all")
LOAD_LEVELS = ("disable", "basic", "extended", "layout", "all")


@dataclass(frozen=True)
class OptimizeConfig:
    level: str = setting("extended", "Level the saved file is optimized at: basic or extended "
                                     "(layout/all would save layouts for this CPU only).")
    load_level: str = setting("all", "Level sessions apply when they load the file.")
    fold_attention: bool = setting(True, "Fold head split/merge layout ops into the Attention op.")
    atol: float = setting(POLICY.tensor.atol, "Max abs error allowed vs the unoptimized graph on the shape grid.")
    rtol: float = setting(POLICY.tensor.rtol, "Relative error allowed vs the unoptimized graph.")
    batches: tuple[int, ...] = setting(POLICY.batches, "Batch sizes of the parity grid.")
    seq_lens: tuple[int, ...] | None = setting(None, "Sequence lengths of the grid (default: 1, T, 2T).")

    def __post_init__(self):
        _tuple(self, "batches", "seq_lens")
        _finite("optimize", atol=self.atol, rtol=self.rtol)
        if self.level in HARDWARE_LEVELS:
            raise ConfigError(
                f"--level {self.level} would save layouts chosen for this CPU only (NCHWc blocking), "
                "so the file would not be portable; save at 'extended' (sessions still apply 'all' at load)"
            )
        if self.level not in SAVE_LEVELS:
            raise ConfigError(f"unknown optimization level {self.level!r}; save at one of: {', '.join(SAVE_LEVELS)}")
        if self.load_level not in LOAD_LEVELS:
            raise ConfigError(f"unknown load level {self.load_level!r}; use one of: {', '.join(LOAD_LEVELS)}")
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError("atol and rtol must be >= 0")
        _positive(self.batches, "batches")


# --- quantize ------------------------------------------------------------------------------------------

MODES = ("dynamic", "static", "fp16")
CALIBRATIONS = ("minmax", "entropy", "percentile")
INT8_TYPES = ("uint8", "int8")


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = setting("auto", "dynamic, static (QDQ, calibrated), fp16, a list such as dynamic,static, "
                                "or auto (the modes in `modes`).")
    modes: tuple[str, ...] = setting(MODES, "The modes `auto` builds (e.g. [quantize] modes = [\"dynamic\", \"static\"]).")
    calibration: str = setting("minmax", "Static: minmax, entropy or percentile.")
    calib_samples: int = setting(256, "Static: training samples used for calibration.")
    per_channel: bool = setting(False, "One weight scale per output channel.")
    activation_type: str = setting("uint8", "Static activations: uint8 (U8S8, fast on x86) or int8.")
    weight_type: str = setting("int8", "Weights: int8 or uint8.")
    reduce_range: bool = setting(False, "7-bit weights (avoids U8S8 saturation on AVX2 without VNNI).")
    max_accuracy_drop: float = setting(POLICY.lossy.max_accuracy_drop,
                                       "Budget: accuracy points a variant may lose vs its parent.")
    min_agreement: float = setting(POLICY.lossy.min_agreement, "Budget: top-1 agreement with the parent.")
    exclusion_rounds: int = setting(6, "Retries keeping the most sensitive nodes in FP32 (0: none).")
    isolate: bool = setting(True, "Open each build in a child process first, so a native crash of ONNX Runtime "
                                  "refuses that variant instead of ending the run.")
    seed: int = setting(0, "Seed of the calibration subset.")
    layout_search: bool = setting(True, "Static, image models: also build the graph's input conv block in float, "
                                        "time both builds on this machine and keep the faster one.")

    def __post_init__(self):
        _tuple(self, "modes")
        self.modes_to_build()  # validates mode and modes
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"unknown calibration {self.calibration!r}; use {', '.join(CALIBRATIONS)}")
        if self.calib_samples < 1:
            raise ConfigError(f"static quantization needs calibration data: --calib-samples must be >= 1, "
                              f"got {self.calib_samples}")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in INT8_TYPES:
                raise ConfigError(f"{name} must be uint8 or int8, got {getattr(self, name)!r}")
        if self.exclusion_rounds < 0:
            raise ConfigError(f"exclusion_rounds must be >= 0, got {self.exclusion_rounds}")
        self.budget  # validates the budget  # noqa: B018

    @property
    def budget(self) -> Budget:
        return Budget(self.max_accuracy_drop, self.min_agreement)

    def modes_to_build(self) -> list[str]:
        wanted = list(self.modes) if self.mode == "auto" else [m.strip() for m in self.mode.split(",") if m.strip()]
        bad = [m for m in wanted if m not in MODES]
        if bad or not wanted:
            raise ConfigError(f"unknown quantization mode {', '.join(map(repr, bad)) or repr(self.mode)}; use dynamic, "
                              "static, fp16, a comma-separated list of them (dynamic,static), or auto")
        return list(dict.fromkeys(wanted))

    def for_mode(self, mode: str) -> dict:
        """The settings that shaped one mode's variant (recorded in its artifact)."""
        d = asdict(self)
        d["mode"] = mode
        d.pop("modes")
        d.pop("isolate")
        if mode != "static":
            for k in ("calibration", "calib_samples", "activation_type", "layout_search"):
                d.pop(k)
        if mode == "fp16":
            for k in ("per_channel", "weight_type", "reduce_range"):
                d.pop(k)
            d["keep_io_types"] = True
        return d


# --- distill -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillConfig:
    student_model: str | None = setting(None, "Another registered model of the same input family as the student, "
                                              "e.g. gru for a transformer teacher.")
    student_scale: float | None = setting(None, "Scale the teacher's width fields (0-1); default: the model's "
                                                "declared student (a user's factory without one: 0.5).")
    student_set: tuple[tuple[str, str], ...] | None = setting(None, "KEY=VALUE settings of the student's config "
                                                                    "(a factory's keyword arguments), after scaling.")
    # None: the student model's distill_defaults (tuned on digits over 3 seeds, benchmarks/distill.py).
    temperature: float | None = setting(None, "Softmax temperature T of the soft targets (loss scaled by T^2). "
                                              "Default: the student model's tuned value (4 for cnn, else 2).")
    alpha: float | None = setting(None, "Weight of the soft-target loss; 1 - alpha weighs the hard labels. "
                                        "Default: tuned per model (0.7 cnn, else 0.5).")
    epochs: int | None = setting(None, "Student epochs (default: the student model's tuned setting).")
    lr: float | None = setting(None, "Student learning rate (default: the student model's tuned setting).")
    mixup: float | None = setting(None, "Beta(a, a) mixup for the student and its scratch twin (0 = off); the teacher "
                                        "labels the mixed inputs. Default: tuned per model (0 cnn, else 0.4).")
    seed: int = setting(0, "Seed of the student's initialization and batch order.")
    max_accuracy_drop: float = setting(POLICY.student.max_accuracy_drop,
                                       "Accuracy drop (points) against the teacher allowed for student variants "
                                       "to be selected.")
    scratch_baseline: bool = setting(True, "Also train the same student from scratch (same epochs and seed) to "
                                           "measure the distillation gain.")
    resume: bool = setting(False, "Continue the student's (and scratch twin's) training from their checkpoints.")

    def __post_init__(self):
        if isinstance(self.student_set, dict):
            object.__setattr__(self, "student_set", tuple(self.student_set.items()))
        elif isinstance(self.student_set, list):
            object.__setattr__(self, "student_set", tuple(tuple(x) for x in self.student_set))
        _finite("distill", temperature=self.temperature, alpha=self.alpha, lr=self.lr, mixup=self.mixup,
                max_accuracy_drop=self.max_accuracy_drop, student_scale=self.student_scale)
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.student_scale is not None and not 0.0 < self.student_scale < 1.0:
            raise ConfigError(f"student_scale must be in (0, 1), got {self.student_scale}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_accuracy_drop < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0, got {self.max_accuracy_drop}")

    @property
    def budget(self) -> Budget:
        """The student's selection gate against its teacher."""
        return Budget(self.max_accuracy_drop, POLICY.student.min_agreement, gate=True)


# --- prune / transfer -----------------------------------------------------------------------------------

PRUNE_SCOPES = ("layer", "global")
IMPORTANCES = ("l1", "taylor")


@dataclass(frozen=True)
class PruneConfig:
    ratio: float | None = setting(None, "Fraction of every prunable width to remove (0-1): conv channels, RNN hidden "
                                        "units, attention heads, FFN units, dense units. Default 0.5 unless a target "
                                        "is given.")
    target_params: float | None = setting(None, "Prune until the parameters are at most this: a fraction of the "
                                                "unpruned model's (< 1) or a count (>= 1).")
    target_flops: float | None = setting(None, "Prune until the FLOPs per row are at most this: a fraction of the "
                                               "unpruned model's (< 1) or a count (>= 1).")
    scope: str = setting("layer", "layer: every layer loses the same fraction; global: units of one kind compete "
                                  "across layers (importance normalized per layer), so weaker layers lose more.")
    importance: str = setting("l1", "l1 (weight magnitude of each unit) or taylor (|weight x gradient| on "
                                    "training rows).")
    taylor_samples: int = setting(256, "Taylor: training rows whose loss gradient scores the units.")
    epochs: int | None = setting(None, "Fine-tuning epochs after pruning (default: the model's tuned training "
                                       "epochs, as a distilled student gets; 0: no fine-tuning).")
    lr: float | None = setting(None, "Fine-tuning learning rate (default: the model's tuned setting).")
    soft_targets: bool = setting(True, "Fine-tune on the unpruned teacher's soft targets (prune + distill); "
                                       "off: hard labels only.")
    temperature: float | None = setting(None, "Soft targets: softmax temperature (default: the model's "
                                              "distill_defaults, as for distill).")
    alpha: float | None = setting(None, "Soft targets: weight of the soft-target loss (default: the model's "
                                        "distill_defaults).")
    seed: int = setting(0, "Seed of the fine-tuning batch order and of the Taylor rows.")
    max_accuracy_drop: float = setting(POLICY.student.max_accuracy_drop,
                                       "Accuracy drop (points) against the unpruned model allowed for pruned "
                                       "variants to be selected.")
    resume: bool = setting(False, "Continue the fine-tuning from its checkpoint.")

    def __post_init__(self):
        _finite("prune", ratio=self.ratio, target_params=self.target_params, target_flops=self.target_flops,
                lr=self.lr, temperature=self.temperature, alpha=self.alpha, max_accuracy_drop=self.max_accuracy_drop)
        given = [n for n in ("ratio", "target_params", "target_flops") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give one of --ratio, --target-params and --target-flops, not {' and '.join(given)}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio must be in [0, 1) (the fraction of each width removed), got {self.ratio}")
        for name in ("target_params", "target_flops"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 (a fraction < 1 or a count >= 1), got {getattr(self, name)}")
        if self.scope not in PRUNE_SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(PRUNE_SCOPES)}, got {self.scope!r}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.taylor_samples < 1:
            raise ConfigError(f"taylor_samples must be >= 1, got {self.taylor_samples}")
        if self.epochs is not None and self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0 (0: no fine-tuning), got {self.epochs}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.max_accuracy_drop < 0:
            raise ConfigError(f"max_accuracy_drop must be >= 0, got {self.max_accuracy_drop}")

    def goal(self) -> tuple[str, float]:
        """("ratio", r), ("params", target) or ("flops", target)."""
        if self.target_params is not None:
            return "params", self.target_params
        if self.target_flops is not None:
            return "flops", self.target_flops
        return "ratio", 0.5 if self.ratio is None else self.ratio

    @property
    def budget(self) -> Budget:
        """The pruned model's selection gate against the unpruned one (as a student's against its teacher)."""
        return Budget(self.max_accuracy_drop, POLICY.student.min_agreement, gate=True)


FREEZE_CHOICES = ("backbone", "none")
HEAD_CHOICES = ("new", "keep")


@dataclass(frozen=True)
class TransferConfig:
    freeze: str = setting("backbone", "backbone (train only the head), none (fine-tune every layer), or N: freeze "
                                      "the first N layers with weights (in the order the model defines them).")
    head: str = setting("new", "new: a freshly initialized classifier for the new data's classes; keep: the source's "
                               "classifier (the new data must have as many classes).")
    epochs: int | None = setting(None, "Epochs (default: the model's tuned training epochs); the scratch twin gets "
                                       "the same.")
    lr: float | None = setting(None, "Learning rate (default: the model's tuned setting).")
    patience: int | None = setting(None, "Epochs without a better validation accuracy before stopping (default: the "
                                         "model's; a few-shot validation split is small and noisy).")
    seed: int = setting(0, "Seed of the new head, the batch order and the scratch twin's initialization.")
    scratch_baseline: bool = setting(True, "Also train the same architecture from scratch on the same data and "
                                           "epochs, to measure what the transfer bought.")

    def __post_init__(self):
        _finite("transfer", lr=self.lr)
        self.frozen_layers()  # validates freeze
        if self.head not in HEAD_CHOICES:
            raise ConfigError(f"head must be new or keep, got {self.head!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")

    def frozen_layers(self) -> str | int:
        """"backbone", "none" or the number of leading layers to freeze."""
        value = str(self.freeze).strip()
        if value in FREEZE_CHOICES:
            return value
        if value.isdigit():
            return int(value)
        raise ConfigError(f"freeze must be backbone, none or a number of layers N >= 0, got {self.freeze!r}")


# --- verify / select / bench / explain -------------------------------------------------------------------

@dataclass(frozen=True)
class VerifyConfig:
    atol: float = setting(POLICY.tensor.atol, "Tensor tolerance (abs) for lossless steps.")
    rtol: float = setting(POLICY.tensor.rtol, "Tensor tolerance (relative) for lossless steps.")
    max_accuracy_drop: float = setting(POLICY.lossy.max_accuracy_drop,
                                       "Accuracy-drop budget (points) for lossy variants that recorded none.")
    min_agreement: float = setting(POLICY.lossy.min_agreement,
                                   "Top-1 agreement budget for lossy variants that recorded none.")
    batches: tuple[int, ...] = setting(POLICY.batches, "Batch sizes of the parity grid.")
    seq_lens: tuple[int, ...] | None = setting(None, "Sequence lengths of the grid (default: 1, T, 2T).")
    device: str = setting("cpu", "cpu, or cuda to also check every ONNX variant CPU EP -> CUDA EP.")

    def __post_init__(self):
        _tuple(self, "batches", "seq_lens")
        _finite("verify", atol=self.atol, rtol=self.rtol)
        Budget(self.max_accuracy_drop, self.min_agreement)  # validates both
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"verify device must be cpu or cuda, got {self.device!r}")
        _positive(self.batches, "batches")

    @property
    def budget(self) -> Budget:
        return Budget(self.max_accuracy_drop, self.min_agreement)


@dataclass(frozen=True)
class SelectConfig:
    batches: tuple[int, ...] = setting((1, 64), "Batch sizes to time.")
    warmup: int = setting(5, "Untimed warm-up rounds.")
    runs: int = setting(20, "Timed rounds per batch size.")
    min_seconds: float = setting(0.3, "Per batch size: very fast models get more rounds than `runs`.")
    threads: int | None = setting(None, "ONNX Runtime intra-op threads (default: sweep 1, 2, 4, ... up to the usable "
                                        "cores and keep each variant's fastest; serve and export-triton use it).")
    objective: str = setting("geomean", "geomean (over batch sizes) or one batch size, e.g. 64.")
    max_bytes: int | None = setting(None, "Edge limit: the variant's model file may have at most this many bytes.")
    max_rss_mb: float | None = setting(None, "Edge limit: peak resident memory (MB) of a fresh process that loads the "
                                             "variant and runs one row on one thread (measured where not recorded).")

    def __post_init__(self):
        _tuple(self, "batches")
        _finite("select", max_rss_mb=self.max_rss_mb)
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int)
                                           or self.max_bytes < 1):
            raise ConfigError(f"max_bytes must be a whole number of bytes >= 1, got {self.max_bytes!r}")
        if self.max_rss_mb is not None and self.max_rss_mb <= 0:
            raise ConfigError(f"max_rss_mb must be > 0 MB, got {self.max_rss_mb!r}")
        _positive(self.batches, "batch sizes")
        if self.warmup < 0 or self.runs < 1:
            raise ConfigError(f"need warmup >= 0 and runs >= 1, got warmup={self.warmup} runs={self.runs}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.objective != "geomean" and self.objective not in {str(b) for b in self.batches}:
            raise ConfigError(f"objective must be 'geomean' or one of the timed batch sizes "
                              f"({', '.join(str(b) for b in self.batches)}), got {self.objective!r}")


PROFILE_CHOICES = ("none", "selected", "all")


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = setting((1, 64), "Batch sizes.")
    threads: tuple[int, ...] | None = setting(None, "Intra-op thread counts (default: 1 and all usable cores).")
    device: str = setting("cpu", "cpu or cuda (ONNX variants and torch eager on that device).")
    warmup: int = setting(5, "Untimed rounds before timing.")
    runs: int = setting(30, "Timed rounds per cell (every variant once per round).")
    min_seconds: float = setting(0.0, "Keep adding rounds until this long (for very fast cells).")
    block: int = setting(3, "Calls per variant per round; the first re-warms caches and is not timed.")
    memory: bool = setting(True, "Measure the peak RSS of a fresh process per variant.")
    variants: tuple[str, ...] | None = setting(None, "Subset of variants (torch is always included).")
    profile: str = setting("selected", "Where the time goes (ONNX Runtime's profiler; torch.profiler for eager), per "
                                       "thread count and batch size: none, selected (the selected variant and torch "
                                       "eager) or all.")
    profile_runs: int = setting(20, "Profiled calls per cell (after 3 untimed ones).")

    def __post_init__(self):
        _tuple(self, "batches", "threads", "variants")
        if self.profile not in PROFILE_CHOICES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILE_CHOICES)}, got {self.profile!r}")
        if self.profile_runs < 1:
            raise ConfigError(f"profile_runs must be >= 1, got {self.profile_runs}")
        _positive(self.batches, "batch sizes")
        _positive(self.threads, "thread counts")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"bench device must be cpu or cuda, got {self.device!r}")
        if self.warmup < 0 or self.runs < 1 or self.block < 1:
            raise ConfigError(f"need warmup >= 0, runs >= 1 and block >= 1, got warmup={self.warmup}, "
                              f"runs={self.runs}, block={self.block}")

    def thread_counts(self) -> tuple[int, ...]:
        """The thread counts asked for, else the same sweep as select's (1, 2, 4, ... up to the usable cores)."""
        from ..core.timing import thread_candidates

        return self.threads or thread_candidates()


@dataclass(frozen=True)
class ExplainConfig:
    samples: int = setting(8, "Test samples per grid (misclassified ones first).")
    steps: int = setting(32, "Integrated-gradients steps.")
    seed: int = setting(0, "Seed of the sample choice.")

    def __post_init__(self):
        if not 1 <= self.samples <= 64:
            raise ConfigError(f"samples must be between 1 and 64, got {self.samples}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


# --- package ---------------------------------------------------------------------------------------------

TARGETS = ("ort", "web")
# Pinned: the package records the version it vendored, and the check runs what the package ships.
ORT_WEB_VERSION = "1.30.0"
PLAYWRIGHT_VERSION = "1.65.1"
CHROMIUM = "/usr/bin/chromium"


@dataclass(frozen=True)
class PackageConfig:
    target: str = setting("ort", "ort (ORT format + required_operators.config for a reduced build) or web (a static "
                                 "folder running the model with onnxruntime-web's WASM execution provider).")
    variant: str | None = setting(None, "Variant to package (default: the run's selected one).")
    check: bool = setting(False, "web: serve the folder on loopback, run every reference input in headless Chromium and "
                                 "compare with the CPU execution provider (recorded in both manifests).")
    force: bool = setting(False, "Replace OUT if it holds an earlier onnxpipe package.")
    ort_level: str = setting("extended", "Optimization level baked into the .ort file: basic or extended (layout/all "
                                         "would bake in layouts chosen for this CPU).")
    type_reduction: bool = setting(True, "Write each operator's types into required_operators.config (for "
                                         "--enable_reduced_operator_type_support).")
    atol: float = setting(POLICY.tensor.atol, "Max abs error allowed for the lossless steps (.ort vs .onnx, WASM vs CPU).")
    rtol: float = setting(POLICY.tensor.rtol, "Relative error allowed for the lossless steps.")
    batches: tuple[int, ...] = setting(POLICY.batches, "Batch sizes of the .ort parity grid.")
    seq_lens: tuple[int, ...] | None = setting(None, "Sequence lengths of the grid (default: 1, T, 2T).")
    threads: int = setting(1, "Threads of the native CPU reference and of the WASM session (latency at batch 1).")
    examples: int = setting(16, "web: reference inputs the page offers to pick.")
    bench_calls: int = setting(50, "web --check: calls timed in the page (median reported).")
    ort_web_version: str = setting(ORT_WEB_VERSION, "web: onnxruntime-web version vendored from the npm registry.")
    playwright_version: str = setting(PLAYWRIGHT_VERSION, "web --check: playwright-core version (npm) that drives Chromium.")
    chromium: str = setting(CHROMIUM, "web --check: the Chromium executable (Debian's `chromium`).")
    npm_cache: str | None = setting(None, "Folder npm installs into (default: $ONNXPIPE_NPM_CACHE or "
                                          "~/.cache/onnxpipe/npm).")
    timeout_s: float = setting(180.0, "web --check: time allowed for the browser run.")

    def __post_init__(self):
        _tuple(self, "batches", "seq_lens")
        _finite("package", atol=self.atol, rtol=self.rtol, timeout_s=self.timeout_s)
        if self.target not in TARGETS:
            raise ConfigError(f"unknown package target {self.target!r}; use ort or web")
        if self.check and self.target != "web":
            raise ConfigError("--check runs the page in a browser: it applies to --target web (the ort target is always "
                              "checked against the .onnx)")
        if self.ort_level in HARDWARE_LEVELS:
            raise ConfigError(f"--ort-level {self.ort_level} would bake layouts chosen for this CPU (NCHWc blocking) into "
                              "the .ort file, which a phone or another CPU could not use; use extended (or basic)")
        if self.ort_level not in SAVE_LEVELS:
            raise ConfigError(f"unknown ORT format level {self.ort_level!r}; use one of: {', '.join(SAVE_LEVELS)}")
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError("atol and rtol must be >= 0")
        _positive(self.batches, "batches")
        _positive(self.seq_lens, "seq_lens")
        for name in ("threads", "bench_calls"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.examples < 0:
            raise ConfigError(f"examples must be >= 0, got {self.examples}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")


# The sections a --config file may hold, and the config class of each stage section.
STAGE_CONFIGS = {"train": TrainConfig, "export": ExportConfig, "optimize": OptimizeConfig,
                 "quantize": QuantizeConfig, "distill": DistillConfig, "prune": PruneConfig,
                 "transfer": TransferConfig, "verify": VerifyConfig,
                 "select": SelectConfig, "bench": BenchConfig, "explain": ExplainConfig, "package": PackageConfig}
CONFIG_SECTIONS = ("model", *STAGE_CONFIGS)


# --- building a config: defaults, then the config file's section, then flags ------------------------------

def build_config(cls, section: dict | None = None, flags: dict | None = None, *, stage: str, **defaults):
    """cls(**defaults, **[stage] section, **flags that were given). A flag left at None keeps what the file or
    the dataclass says, so `onnxpipe STAGE` and `onnxpipe run` cannot drift apart."""
    values = {**defaults, **(section or {}), **{k: v for k, v in (flags or {}).items() if v is not None}}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"bad [{stage}] setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"bad [{stage}] setting: {e}") from None


def read_config_file(path, sections: tuple[str, ...] = CONFIG_SECTIONS) -> dict:
    """{"model": {...}, "train": {...}, "export": {...}, ...} from a JSON or TOML file."""
    import json
    from pathlib import Path

    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except Exception as e:  # json / toml decode errors of several types
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(data, dict) or set(data) - set(sections) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"config file {path}: top-level keys must be sections (tables) among {', '.join(sections)}")
    return data


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """--set KEY=VALUE (repeatable) -> {KEY: VALUE}."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"bad --set {item!r}: expected KEY=VALUE, e.g. --set d_model=256")
        out[key.strip()] = value.strip()
    return out


def parse_int_list(text: str | None, option: str, example: str = "1,64") -> tuple[int, ...] | None:
    """'1,64' -> (1, 64); None -> None; a ConfigError naming the option for anything else."""
    if text is None:
        return None
    hint = f"expected comma-separated positive integers, e.g. {option} {example}"
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"bad {option} {text!r}: {hint}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"bad {option} {text!r}: {hint}")
    return values


def parse_float_list(text: str | None, option: str, example: str = "0,2") -> tuple[float, ...] | None:
    """'0,2.5' -> (0.0, 2.5); None -> None; a ConfigError naming the option for anything else."""
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"bad {option} {text!r}: expected comma-separated numbers >= 0, e.g. {option} {example}")
    return values


def parse_name_list(text: str | None) -> tuple[str, ...] | None:
    """'a,b' -> ('a', 'b'); None -> None."""
    if text is None:
        return None
    return tuple(v.strip() for v in text.split(",") if v.strip())
