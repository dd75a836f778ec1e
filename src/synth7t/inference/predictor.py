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

from synth7t.dataset.views import (
    extent,
    from_view,
    pad_to,
    positions,
    round_up,
    slice_areas,
    to_view,
    view_code,
    view_shape,
)
from synth7t.errors import InputError
from synth7t.inference.fusion import load_fusion

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
    fusion: str | None = None  # how a multi-view model's views are fused: mean, median, learned; None: the model's


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
        from synth7t.model_folder import load_networks

        self.model_dir = Path(model_dir)
        self.device = torch.device(resolve_accelerator(device))
        if self.device.type == "cpu":
            keep_freed_memory()  # slice batches reuse freed buffers instead of page-faulting new ones
        self.nets, self.config, self.checksum = load_networks(model_dir, self.device)
        self.views = list(self.nets)  # the slice views this model runs (config.json "views"; axial by default)
        self.net = self.nets[self.views[0]]
        self.kind = self.config["model"].get("kind", "unet")
        self.view_coded = len(self.views) > 1 and not self.config.get("networks")  # one network, told the view
        self.patch3d = int(self.config.get("patch3d") or 64) if self.kind == "unet3d" else None
        self.template = None
        if self.kind == "thesis_published":
            self.template = template_paths(self.model_dir, self.config)
        if self.device.type == "cpu" and self.patch3d is None:
            self._convert(lambda net: net.to(memory_format=torch.channels_last))
        self.dtype = self._dtype(precision)
        # bf16 asked for on a CPU: the weights themselves in bf16 (half the memory), no autocast
        self.bf16_weights = self.dtype == torch.bfloat16 and self.device.type == "cpu" and precision == "bf16"
        if self.bf16_weights:
            self._convert(lambda net: net.to(torch.bfloat16))
        self.fusion = self.config.get("fusion", "mean")  # the default fusion of several views
        self.fusion_net = load_fusion(self.model_dir, self.config, self.device)
        self.show_progress = False  # a progress bar over each scan's slice batches (set for a single long scan)
        self.n_slices = int(self.config["n_slices"])
        self.multiple = int(self.config.get("multiple") or self.net.cfg.downsample_factor)
        norm = self.config.get("normalization", {})
        self.lower_pct = float(norm.get("lower_pct", 1.0))
        self.upper_pct = float(norm.get("upper_pct", 99.0))
        self.voxel_mm = tuple(float(v) for v in np.broadcast_to(self.config.get("voxel_size_mm", 0.65), (3,)))
        self.standardization = _standardization_record(model_dir, self.config)

    def _convert(self, fn) -> None:
        """Apply ``fn`` to each network once (a shared multi-view network is one object under several views)."""
        done: dict[int, torch.nn.Module] = {}
        for view, net in self.nets.items():
            done.setdefault(id(net), fn(net))
            self.nets[view] = done[id(net)]
        self.net = self.nets[self.views[0]]

    @property
    def prep_spec(self) -> PrepSpec:
        return PrepSpec(self.multiple, self.lower_pct, self.upper_pct, self.voxel_mm, self.template)

    def _dtype(self, precision: str) -> torch.dtype | None:
        """bf16 (autocast) or None (fp32). ``auto``: bf16 on a GPU that supports it; on a CPU only for the
        published thesis models (about a PFLOP a brain), where the CPU multiplies bf16 in hardware and a matmul
        probe finds it faster than fp32 (:func:`synth7t.devices.cpu_bf16_is_faster`)."""
        from synth7t.devices import cpu_bf16_is_faster

        if precision not in ("auto", "32", "bf16"):
            raise InputError(f"precision {precision!r}: expected auto, 32 or bf16")
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        if precision == "auto" and self.device.type == "cpu" and self.kind == "thesis_published" \
                and cpu_bf16_is_faster():
            return torch.bfloat16
        return None

    def forward(self, x: torch.Tensor, context: torch.Tensor, net: torch.nn.Module | None = None) -> torch.Tensor:
        """A network (the first view's by default) on one batch at the predictor's precision (channels-last on a
        CPU)."""
        net = self.net if net is None else net
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16_weights:
            return net(x.to(torch.bfloat16), context.to(torch.bfloat16))
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return net(x, context)

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
                      tta: bool = False, fusion: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(Z, H, W) normalized 3T stack -> (prediction (Z, H, W), uncertainty or None), float32 [0, 1].

        With the model's input standardization (``histmatch``: onto the training 7T distribution; ``nyul``: the
        stack's landmarks onto the training standard landmarks), the stack's brain intensities are first mapped by
        :func:`synth7t.intensity.standardize_input`, the function training uses.

        A multi-view model predicts the stack along each of its views and fuses the volumes (``fusion``: mean,
        median or learned; default the model folder's ``fusion``, :func:`synth7t.inference.fusion.fuse`); with
        ``tta`` each flip is fused, then the flips averaged. The uncertainty is the per-voxel standard deviation
        over every prediction made (views x flips): None for a single-view model without ``tta``.
        """
        from synth7t.inference.fusion import fuse

        fusion = fusion or self.fusion
        preds = self.predict_views(stack, age=age, sex=sex, group=group, batch_size=batch_size, tta=tta)
        # preds: (F, V, Z, H, W), F flips, V views
        outs = [fuse(p, fusion, self.fusion_net, self.device) for p in preds]
        pred = outs[0] if len(outs) == 1 else np.mean(outs, 0, dtype=np.float32)
        if preds.shape[0] * preds.shape[1] == 1:
            return pred, None
        return pred, preds.reshape(-1, *preds.shape[2:]).std(0)

    @torch.inference_mode()
    def predict_views(self, stack: np.ndarray, *, age=None, sex=None, group=None, batch_size: int | None = None,
                      tta: bool = False) -> np.ndarray:
        """Every view's prediction of a normalized (Z, H, W) stack, unfused: float32 (F, V, Z, H, W), F = 2 flips
        with ``tta`` (the second mirrored back), V = the model's views in :attr:`views` order."""
        from synth7t.intensity import standardize_input

        stack = standardize_input(stack, self.standardization)
        hw = max((view_shape(stack.shape, v)[1:] for v in self.views), key=lambda s: s[0] * s[1])
        bs = self.batch_size(hw, batch_size)
        while True:
            try:
                flips = [False, True] if tta else [False]
                def run(src: np.ndarray, bs: int = bs) -> np.ndarray:
                    if self.patch3d:
                        return self._run3d(src, bs)[None]
                    return np.stack([self._run_view(src, v, bs, age, sex, group) for v in self.views])

                return np.stack([self._flipped(stack, flip, run) for flip in flips])
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                log.warning("out of memory: retrying with %d slices per batch", bs)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    @staticmethod
    def _flipped(stack: np.ndarray, flip: bool, run) -> np.ndarray:
        """``run`` on the stack, or on it flipped along H (the R-L axis of the canonical grid, whatever the view the
        network then slices it along) and its output (..., Z, H, W) flipped back."""
        if not flip:
            return run(np.ascontiguousarray(stack))
        return run(np.ascontiguousarray(stack[:, ::-1, :]))[..., ::-1, :].copy()

    def _run_view(self, src: np.ndarray, view: str, bs: int, age, sex, group) -> np.ndarray:
        """One view's network over the stack's slices of that view -> (Z, H, W). The view's slices are padded
        (centred) to the model's multiple and given the view's slice position (and its one-hot for a shared
        multi-view network), as in training (:mod:`synth7t.dataset.views`)."""
        from synth7t.dataset.slices import VolumeSlices

        net = self.nets[view]
        if view == "axial" and not self.view_coded:
            return self._run(src, VolumeSlices, bs, age, sex, group, net=net)
        vs = to_view(src, view)  # (N, rows, cols), no copy
        n, r, c = vs.shape
        rows, cols = round_up(r, self.multiple), round_up(c, self.multiple)
        padded = np.ascontiguousarray(pad_to(vs, rows, cols), dtype=np.float32)
        brain = extent(slice_areas(src, view)) if view != "axial" else None
        extra = view_code(view) if self.view_coded else None
        out = self._run(padded, VolumeSlices, bs, age, sex, group, net=net, positions=positions(view, n, brain),
                        extra=extra)
        r0, c0 = (rows - r) // 2, (cols - c) // 2
        return np.ascontiguousarray(from_view(out[:, r0:r0 + r, c0:c0 + c], view))

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

    def _run(self, src, volume_slices, bs, age, sex, group, *, net=None, positions=None, extra=None) -> np.ndarray:
        out = np.zeros(src.shape, np.float32)
        batches = volume_slices(src, self.n_slices, batch_size=bs, age=age, sex=sex, group=group,
                                positions=positions, extra=extra)
        for batch in batches:
            x = torch.from_numpy(batch["input"]).to(self.device)
            c = torch.from_numpy(batch["context"]).to(self.device)
            y = self.forward(x, c, net)
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
