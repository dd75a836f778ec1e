"""The model side of prediction: options, results, and :class:`Predictor` (a loaded model on a device that turns
a normalized slice stack into a synthetic 7T stack, with optional flip test-time augmentation).

A 2.5D model runs over the stack's slices in batches; a 3-D patch model (``config.json["model"]["kind"]``
``unet3d``) over the whole stack by MONAI's ``sliding_window_inference`` (overlap 0.5, Gaussian weights)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from synth7t.errors import InputError

log = logging.getLogger(__name__)
OUTPUT_NAME = "syn7t.nii.gz"


@dataclass
class PredictOptions:
    preprocessed: bool = False
    age: float | None = None
    sex: str | None = None
    diagnosis: str | None = None
    tta: bool = False
    rescale: bool = False
    resample_to_input: bool = False
    overwrite: bool = False
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"  # auto (bf16 on a GPU that supports it, fp32 on CPU), 32 or bf16
    skullstrip: str | None = None  # None: what the model's training used
    n4: str | None = None  # 3T N4 preset (3t, 7t, demo) or "none"; None: what the model's training used
    voxel_size_mm: float | None = None  # None: the model's training grid
    shard: tuple[int, int] | None = None  # (k, n), 0 <= k < n: every n-th of the jobs sorted by name, from k
    workers: int | None = None  # preprocessing processes ahead of the network; 0: inline; None: automatic
    threads: int | None = None  # the run's cores (None: SLURM_CPUS_PER_TASK, else the CPU affinity)
    deterministic: bool = False  # preprocessing at one thread (N4, skull strip, registration repeat bit for bit)


RUN_TIME_OPTIONS = ("shard", "workers", "threads")  # how a cohort runs, never what an output holds: not in provenance


@dataclass
class PredictResult:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cores: str | None = None  # the run's cores and how they were shared out
    record: Path | None = None  # the machine-readable run record (OUT/logs/predict*.json)
    threads_seen: set = field(default_factory=set)  # thread counts the scans' preprocessing ran with (JSON)

    def summary(self) -> str:
        lines = [f"predicted {len(self.done)}, skipped {len(self.skipped)} (outputs exist), failed {len(self.failed)}"]
        lines += [self.cores] if self.cores else []
        lines += [f"  failed: {v}" if v.startswith(f"{k}: ") else f"  failed: {k}: {v}" for k, v in self.failed.items()]
        lines += [f"failures listed in {self.record}"] if self.failed and self.record else []
        return "\n".join(lines)



@dataclass(frozen=True)
class PrepSpec:
    """What preprocessing needs to know of a model (small and picklable: sent to preprocessing workers).

    ``template``: for a model that works on a template grid (``thesis_published``), its template record with the
    files as paths (:func:`synth7t.inference.template.template_paths`); None for synth7t's own models."""

    multiple: int
    lower_pct: float
    upper_pct: float
    voxel_mm: tuple[float, float, float]
    template: dict | None = None


class Predictor:
    """A loaded model on a device, with its configuration; turns a normalized stack into a prediction."""

    def __init__(self, model_dir: str | Path, device: str = "auto", precision: str = "auto"):
        from synth7t.devices import keep_freed_memory, resolve_accelerator
        from synth7t.model_folder import load_generator_with_digest

        self.model_dir = Path(model_dir)
        self.device = torch.device(resolve_accelerator(device))
        if self.device.type == "cpu":
            keep_freed_memory()  # slice batches reuse freed buffers instead of page-faulting new ones
        self.net, self.config, self.checksum = load_generator_with_digest(model_dir, self.device)
        self.kind = self.config["model"].get("kind", "unet")
        self.patch3d = int(self.config.get("patch3d") or 64) if self.kind == "unet3d" else None
        self.template = None
        if self.kind == "thesis_published":
            self.template = template_paths(self.model_dir, self.config)
        if self.device.type == "cpu" and self.patch3d is None:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.dtype = self._dtype(precision)
        # bf16 asked for on a CPU: the weights themselves in bf16 (half the memory), no autocast
        self.bf16_weights = self.dtype == torch.bfloat16 and self.device.type == "cpu" and precision == "bf16"
        if self.bf16_weights:
            self.net = self.net.to(torch.bfloat16)
        self.show_progress = False  # a progress bar over each scan's slice batches (set for a single long scan)
        self.n_slices = int(self.config["n_slices"])
        self.multiple = int(self.config.get("multiple") or self.net.cfg.downsample_factor)
        norm = self.config.get("normalization", {})
        self.lower_pct = float(norm.get("lower_pct", 1.0))
        self.upper_pct = float(norm.get("upper_pct", 99.0))
        self.voxel_mm = tuple(float(v) for v in np.broadcast_to(self.config.get("voxel_size_mm", 0.65), (3,)))
        self.standardization = _standardization_record(model_dir, self.config)

    @property
    def prep_spec(self) -> PrepSpec:
        return PrepSpec(self.multiple, self.lower_pct, self.upper_pct, self.voxel_mm, self.template)

    def _dtype(self, precision: str) -> torch.dtype | None:
        """bf16 (autocast) or None (fp32). ``auto``: bf16 on a GPU that supports it; on a CPU only for the
        published thesis models (about a PFLOP a brain), where the CPU multiplies bf16 in hardware and a matmul
        probe finds it faster than fp32."""
        from synth7t.devices import cpu_has_native_bf16

        if precision not in ("auto", "32", "bf16"):
            raise InputError(f"precision {precision!r}: expected auto, 32 or bf16")
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        if precision == "auto" and self.device.type == "cpu" and self.kind == "thesis_published" \
                and cpu_has_native_bf16():
            from synth7t.nn.flops import matmul_rate

            # bf16 in hardware is not always faster (measured on this project's machines: 0.5x to 3x fp32)
            bf16, fp32 = matmul_rate(torch.bfloat16, seconds=0.3), matmul_rate(torch.float32, seconds=0.3)
            log.info("CPU matmul: bf16 %.0f, fp32 %.0f GFLOP/s; predicting in %s", bf16 / 1e9, fp32 / 1e9,
                     "bf16" if bf16 > 1.1 * fp32 else "fp32")
            return torch.bfloat16 if bf16 > 1.1 * fp32 else None
        return None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The network on one batch at the predictor's precision (channels-last on a CPU)."""
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16_weights:
            return self.net(x.to(torch.bfloat16), context.to(torch.bfloat16))
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.net(x, context)

    def batch_size(self, hw: tuple[int, int], requested: int | None) -> int:
        """Slices per forward pass: ``requested``, or what fits in a quarter of the free memory.

        Activation memory per slice is estimated as 4 bytes x H x W x (sum over stages of channels / 4^stage)
        x 12 (tensors kept per residual block in eval mode, measured order of magnitude).
        """
        if requested:
            return int(requested)
        if self.patch3d is not None:  # cubes per forward pass of the sliding window
            return 4 if self.device.type == "cuda" else 1
        ch = self.config["model"]["channels"]
        mult = self.config["model"]["channel_mult"]
        per_slice = 4 * hw[0] * hw[1] * sum(ch * m / 4**i for i, m in enumerate(mult)) * 12
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = _available_ram()
        return int(np.clip(free * 0.25 // max(per_slice, 1), 1, 32))

    @torch.inference_mode()
    def predict_stack(self, stack: np.ndarray, *, age=None, sex=None, group=None, batch_size: int | None = None,
                      tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(Z, H, W) normalized 3T stack -> (prediction (Z, H, W), uncertainty or None), float32 [0, 1].

        With the model's input standardization (``histmatch``: onto the training 7T distribution; ``nyul``: the
        stack's landmarks onto the training standard landmarks), the stack's brain intensities are first mapped by
        :func:`synth7t.intensity.standardize_input`, the function training uses.
        """
        from synth7t.dataset.slices import VolumeSlices
        from synth7t.intensity import standardize_input

        stack = standardize_input(stack, self.standardization)
        bs = self.batch_size(stack.shape[1:], batch_size)
        while True:
            try:
                flips = [False, True] if tta else [False]
                def run(src: np.ndarray, bs: int = bs) -> np.ndarray:
                    if self.patch3d:
                        return self._run3d(src, bs)
                    return self._run(src, VolumeSlices, bs, age, sex, group)

                outs = [self._flipped(stack, flip, run) for flip in flips]
                break
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                log.warning("out of memory: retrying with %d slices per batch", bs)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if len(outs) == 1:
            return outs[0], None
        arr = np.stack(outs)
        return arr.mean(0), arr.std(0)

    @staticmethod
    def _flipped(stack: np.ndarray, flip: bool, run) -> np.ndarray:
        """``run`` on the stack, or on it flipped along H (the R-L axis of the canonical grid) and flipped back."""
        if not flip:
            return run(np.ascontiguousarray(stack))
        return run(np.ascontiguousarray(stack[:, ::-1, :]))[:, ::-1, :].copy()

    def _run3d(self, src: np.ndarray, bs: int) -> np.ndarray:
        """The 3-D model over the whole (Z, H, W) stack: MONAI's sliding window of ``patch3d`` cubes (each side
        cut to the stack's, rounded up to the model's multiple), overlap 0.5, Gaussian blending."""
        from monai.inferers import sliding_window_inference

        f = self.multiple
        roi = tuple(min(self.patch3d, -(-s // f) * f) for s in src.shape)
        x = torch.from_numpy(np.asarray(src, np.float32)).to(self.device)[None, None]
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            y = sliding_window_inference(x, roi, bs, self.net, overlap=0.5, mode="gaussian")
        return y[0, 0].float().clamp(0, 1).cpu().numpy()

    def _run(self, src, volume_slices, bs, age, sex, group) -> np.ndarray:
        out = np.zeros(src.shape, np.float32)
        for batch in volume_slices(src, self.n_slices, batch_size=bs, age=age, sex=sex,
                                   group=group):
            x = torch.from_numpy(batch["input"]).to(self.device)
            c = torch.from_numpy(batch["context"]).to(self.device)
            y = self.forward(x, c)
            out[batch["slice"]] = y[:, 0].float().clamp(0, 1).cpu().numpy()
        return out


def template_paths(model_dir: Path, config: dict) -> dict:
    """The template record of a model's ``config.json`` with its files as paths in the model folder."""
    t = dict(config["template"])
    for key in ("file", "template_3t", "affine_file"):
        if t.get(key):
            t[key] = str(Path(model_dir) / t[key])
    return t


def _standardization_record(model_dir, config: dict) -> dict | None:
    """config.json's ``input_standardization``, checked; None when the model has none."""
    from synth7t.intensity import STANDARDIZATIONS

    std = config.get("input_standardization") or {"method": "none"}
    method = std.get("method", "none")
    if method not in STANDARDIZATIONS:
        raise InputError(f"{model_dir}: unknown input_standardization {method!r} in config.json")
    need = {"none": (), "histmatch": ("reference_quantiles",), "nyul": ("percentiles", "standard_landmarks")}[method]
    if missing := [k for k in need if k not in std]:
        raise InputError(f"{model_dir}: input_standardization {method} lacks {', '.join(missing)} in config.json")
    return None if method == "none" else std


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
