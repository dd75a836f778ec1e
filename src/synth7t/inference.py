"""Prediction: a raw 3T T1w scan in, a synthetic 7T brain out, in the scan's own world space.

For each input (:func:`predict_volume`):

1. load and validate, reorient to canonical RAS+ (an axis permutation: no resampling);
2. unless ``preprocessed``: N4, then skull stripping, both as the model's training data were prepared (the
   model folder's ``config.json`` ``preprocessing``: the 3T N4 preset, ``none`` when its 3T scans came
   bias-corrected, and the skull-strip method; ``3t`` and deepbet for a model folder that does not say);
   a preprocessed input's brain mask is its non-zero voxels;
3. resample the brain to the model's voxel size (that of its training grid, 0.65 mm by default) *in the scan's
   own canonical frame* (linear for the image, nearest neighbour for the mask): no template, no 7T needed;
4. crop to the brain box, pad in-plane to a multiple of the model's down-sampling factor, clipped min-max
   normalization with the model's percentiles, and the model's input standardization if it was trained with
   one (brain intensities mapped onto the training split's 7T histogram, :mod:`synth7t.intensity`);
5. slice-wise 2.5D inference in batches (axial slices, covariates in the context vector), optionally with
   left-right flip test-time augmentation (mean; the per-voxel standard deviation across the flips is written
   as an uncertainty map);
6. reassembly, inverse crop/pad, masking to the brain.

Outputs (per input, in ``OUT/<name>/``): ``syn7t.nii.gz`` (float32, model units [0, 1] = the input brain's
clipped 1st-99th percentile range, or the input's intensity units with ``rescale``), ``mask.nii.gz``,
``uncertainty.nii.gz`` (with ``tta``), ``syn7t_on_input_grid.nii.gz`` (with ``resample_to_input``) and
``provenance.json`` (which records each preprocessing step, its value and where the value came from: the
training recipe, an option, or the default). Options (``skullstrip``, ``n4``, ``voxel_size_mm``) override the
training recipe, with a logged warning when they differ from it. Every output volume's affine is that of the
resampled canonical grid, which covers the same world space as the input: the output overlays the input in any
viewer.

Cohorts (:func:`predict`): the jobs can be a shard of the list (``shard``); steps 1-4 of the next scans run in
worker processes while the network predicts the current one (:mod:`synth7t.prefetch`); with ``bids``, inputs and
outputs follow BIDS and BIDS derivatives (:mod:`synth7t.bids`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from synth7t import __version__
from synth7t.errors import InputError, Synth7tError
from synth7t.io import Volume, is_nifti_path, load_volume, save_volume, to_canonical, write_json
from synth7t.manifest import Subject

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


RUN_TIME_OPTIONS = ("shard", "workers")  # how a cohort runs, never what an output holds: not in provenance


@dataclass
class PredictResult:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"predicted {len(self.done)}, skipped {len(self.skipped)} (outputs exist), failed {len(self.failed)}"]
        lines += [f"  failed: {v}" if v.startswith(f"{k}: ") else f"  failed: {k}: {v}" for k, v in self.failed.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class PrepSpec:
    """What preprocessing needs to know of a model (small and picklable: sent to preprocessing workers)."""

    multiple: int
    lower_pct: float
    upper_pct: float
    voxel_mm: tuple[float, float, float]


class Predictor:
    """A loaded model on a device, with its configuration; turns a normalized stack into a prediction."""

    def __init__(self, model_dir: str | Path, device: str = "auto", precision: str = "auto"):
        from synth7t.devices import resolve_accelerator
        from synth7t.model_folder import load_generator_with_digest

        self.model_dir = Path(model_dir)
        self.device = torch.device(resolve_accelerator(device))
        self.net, self.config, self.checksum = load_generator_with_digest(model_dir, self.device)
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.dtype = self._dtype(precision)
        self.n_slices = int(self.config["n_slices"])
        self.multiple = int(self.config.get("multiple", 2 ** (len(self.config["model"]["channel_mult"]) - 1)))
        norm = self.config.get("normalization", {})
        self.lower_pct = float(norm.get("lower_pct", 1.0))
        self.upper_pct = float(norm.get("upper_pct", 99.0))
        self.voxel_mm = tuple(float(v) for v in np.broadcast_to(self.config.get("voxel_size_mm", 0.65), (3,)))
        std = self.config.get("input_standardization") or {"method": "none"}
        if std.get("method", "none") not in ("none", "histmatch"):
            raise InputError(f"{model_dir}: unknown input_standardization {std.get('method')!r} in config.json")
        self.reference_quantiles = (np.asarray(std["reference_quantiles"], np.float64)
                                    if std.get("method") == "histmatch" else None)

    @property
    def prep_spec(self) -> PrepSpec:
        return PrepSpec(self.multiple, self.lower_pct, self.upper_pct, self.voxel_mm)

    def _dtype(self, precision: str) -> torch.dtype | None:
        if precision not in ("auto", "32", "bf16"):
            raise InputError(f"precision {precision!r}: expected auto, 32 or bf16")
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return None

    def batch_size(self, hw: tuple[int, int], requested: int | None) -> int:
        """Slices per forward pass: ``requested``, or what fits in a quarter of the free memory.

        Activation memory per slice is estimated as 4 bytes x H x W x (sum over stages of channels / 4^stage)
        x 12 (tensors kept per residual block in eval mode, measured order of magnitude).
        """
        if requested:
            return int(requested)
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

        With the model's input standardization, the stack's brain intensities are first mapped onto the training
        7T distribution (:func:`synth7t.intensity.standardize`), as in training.
        """
        from synth7t.dataset.slices import VolumeSlices
        from synth7t.intensity import standardize

        if self.reference_quantiles is not None:
            stack = standardize(stack, self.reference_quantiles)
        bs = self.batch_size(stack.shape[1:], batch_size)
        while True:
            try:
                flips = [False, True] if tta else [False]
                outs = [self._run(stack, VolumeSlices, bs, age, sex, group, flip) for flip in flips]
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

    def _run(self, stack, volume_slices, bs, age, sex, group, flip: bool) -> np.ndarray:
        src = stack[:, ::-1, :] if flip else stack  # flip along H = the R-L axis of the canonical grid
        out = np.zeros(stack.shape, np.float32)
        for batch in volume_slices(np.ascontiguousarray(src), self.n_slices, batch_size=bs, age=age, sex=sex,
                                   group=group):
            x = torch.from_numpy(batch["input"]).to(self.device)
            c = torch.from_numpy(batch["context"]).to(self.device)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                y = self.net(x, c)
            out[batch["slice"]] = y[:, 0].float().clamp(0, 1).cpu().numpy()
        return out[:, ::-1, :].copy() if flip else out


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


# ---------------------------------------------------------------------------------------------------------
# one volume


DEFAULT_STEPS = {"skullstrip": "deepbet", "n4": "3t"}


def _recipe_value(recipe: dict, key: str):
    """A step's value in the training recipe (``config.json`` ``preprocessing``), or None when unknown/mixed."""
    v = recipe.get(key)
    if key == "n4":
        v = recipe.get("n4_3t")
        if isinstance(v, str) and v.startswith("none"):
            return "none"
    if isinstance(v, dict) and "mixed" in v:
        return None
    return v


def resolve_steps(predictor: Predictor, opts: PredictOptions) -> tuple[dict, list[str]]:
    """The preprocessing steps of a prediction: ``{step: {"value", "source"}}`` with source ``option``,
    ``training`` or ``default``; and a warning per option that differs from the training recipe."""
    recipe = predictor.config.get("preprocessing") or {}
    steps, warnings = {}, []
    for key, option in (("skullstrip", opts.skullstrip), ("n4", opts.n4)):
        trained = _recipe_value(recipe, key)
        if option is not None:
            steps[key] = {"value": option, "source": "option"}
            if trained is not None and option != trained:
                warnings.append(f"{key} {option!r} differs from the model's training data ({trained!r}); "
                                "its predictions may suffer")
        elif trained is not None:
            steps[key] = {"value": trained, "source": "training"}
        else:
            steps[key] = {"value": DEFAULT_STEPS[key], "source": "default"}
    trained_vox = list(predictor.voxel_mm)
    if opts.voxel_size_mm is not None:
        vox = [float(opts.voxel_size_mm)] * 3
        steps["voxel_size_mm"] = {"value": vox, "source": "option"}
        if not np.allclose(vox, trained_vox, atol=1e-3):
            warnings.append(f"voxel size {opts.voxel_size_mm:g} mm differs from the model's training grid "
                            f"({', '.join(f'{v:g}' for v in trained_vox)} mm); its predictions may suffer")
    else:
        steps["voxel_size_mm"] = {"value": trained_vox,
                                  "source": "training" if "voxel_size_mm" in predictor.config else "default"}
    if opts.preprocessed:
        for key in ("skullstrip", "n4"):
            steps[key] = {"value": None, "source": "skipped: input is preprocessed"}
    return steps, warnings


def prepare_input(vol: Volume, predictor: Predictor | PrepSpec, *, preprocessed: bool, skullstrip: str,
                  n4_preset: str | dict = "3t", voxel_mm: tuple[float, float, float] | None = None) -> dict:
    """Canonical 3T volume -> brain on the model's grid (``voxel_mm``, default the model's), its mask, the crop
    geometry and the normalized stack. ``n4_preset``: a preset name, N4 parameters, or ``"none"``.
    ``predictor``: the model, or its :class:`PrepSpec` (in a preprocessing worker)."""
    from synth7t.dataset.cropnorm import clipped_minmax, crop_box, crop_pad
    from synth7t.preprocess.register import resample_to

    timings = {}
    t0 = time.perf_counter()
    if preprocessed:
        from synth7t.preprocess.skullstrip import clean_mask

        brain = vol
        mask = vol.with_data(clean_mask(vol.data > 0).astype(np.float32))
    else:
        from synth7t.preprocess.bias import N4Params, n4
        from synth7t.preprocess.skullstrip import strip

        params = N4Params(**n4_preset) if isinstance(n4_preset, dict) else n4_preset
        corrected = vol if params == "none" else n4(vol, params)
        timings["n4"] = time.perf_counter() - t0
        mask, _ = strip(corrected, skullstrip)
        brain = corrected.with_data(corrected.data * (mask.data > 0))
        timings["skullstrip"] = time.perf_counter() - t0 - timings["n4"]
    t1 = time.perf_counter()
    voxel_mm = voxel_mm or predictor.voxel_mm
    brain_r = resample_to(brain, voxel_mm, order=1)
    mask_r = resample_to(mask, (brain_r.shape, brain_r.affine), order=0)
    m = mask_r.data > 0
    if not m.any():
        raise InputError(f"{vol.source}: no brain left after resampling to {voxel_mm} mm")
    box = crop_box(m)
    stack, geom = crop_pad(brain_r.data, box, None, predictor.multiple)  # (Z, H, W)
    mstack, _ = crop_pad(m.astype(np.uint8), box, None, predictor.multiple)
    normed, limits = clipped_minmax(stack, mstack, predictor.lower_pct, predictor.upper_pct)
    timings["resample_crop_normalize"] = time.perf_counter() - t1
    return {"brain": brain_r, "mask": mask_r.with_data(m.astype(np.float32)), "geometry": geom, "stack": normed,
            "mask_stack": mstack, "limits": limits, "timings": timings}


def prepare_scan(scan: Volume | str | Path, spec: PrepSpec, steps: dict, *, preprocessed: bool,
                 keep_input: bool = True) -> dict:
    """The CPU half of a prediction, the same inline or in a preprocessing worker (:mod:`synth7t.prefetch`):
    load ``scan`` (a path) or take it loaded, reorient it to canonical and :func:`prepare_input` it with the
    resolved ``steps``. ``keep_input``: keep the canonical input (for ``resample_to_input``)."""
    t0 = time.perf_counter()
    vol = scan if isinstance(scan, Volume) else load_volume(scan)
    canonical, info = to_canonical(vol)
    load_s = time.perf_counter() - t0
    prep = prepare_input(canonical, spec, preprocessed=preprocessed, skullstrip=steps["skullstrip"]["value"],
                         n4_preset=steps["n4"]["value"], voxel_mm=tuple(steps["voxel_size_mm"]["value"]))
    prep["timings"] = {"load": load_s, **prep["timings"]}
    prep["reorientation"], prep["canonical"], prep["steps"] = info, canonical if keep_input else None, steps
    return prep


def predict_volume(predictor: Predictor, vol: Volume, opts: PredictOptions, *, covariates: dict | None = None) -> dict:
    """Predict one loaded scan; returns Volumes ``syn7t``, ``mask`` (and ``uncertainty``) plus bookkeeping."""
    steps, _ = resolve_steps(predictor, opts)
    prep = prepare_scan(vol, predictor.prep_spec, steps, preprocessed=opts.preprocessed)
    return finish_prediction(predictor, prep, opts, covariates=covariates)


def finish_prediction(predictor: Predictor, prep: dict, opts: PredictOptions, *,
                      covariates: dict | None = None) -> dict:
    """The network half of a prediction: a :func:`prepare_scan` result -> the outputs of :func:`predict_volume`."""
    from synth7t.dataset.cropnorm import denormalize, uncrop
    from synth7t.manifest import diagnosis_group

    cov = covariates or {}
    t0 = time.perf_counter()
    pred, unc = predictor.predict_stack(prep["stack"], age=cov.get("age"), sex=cov.get("sex"),
                                        group=diagnosis_group(cov.get("diagnosis")), batch_size=opts.batch_size,
                                        tta=opts.tta)
    prep["timings"]["network"] = time.perf_counter() - t0
    pred = pred * (prep["mask_stack"] > 0)
    if opts.rescale:
        pred = np.where(prep["mask_stack"] > 0, denormalize(pred, prep["limits"]), 0.0)
    grid = prep["brain"]
    out = {"syn7t": grid.with_data(uncrop(pred.astype(np.float32), prep["geometry"])), "mask": prep["mask"],
           "limits": prep["limits"], "timings": prep["timings"], "reorientation": prep["reorientation"],
           "canonical": prep["canonical"], "steps": prep["steps"],
           "input": prep["brain"]}  # input: the preprocessed input on the output grid (QC thumbnails)
    if unc is not None:
        out["uncertainty"] = grid.with_data(uncrop((unc * (prep["mask_stack"] > 0)).astype(np.float32),
                                                   prep["geometry"]))
    return out


def on_input_grid(pred: Volume, canonical: Volume, info) -> Volume:
    """The prediction resampled (linear) onto the input's own voxel grid and orientation."""
    from synth7t.io import from_canonical
    from synth7t.preprocess.register import resample_to

    return from_canonical(resample_to(pred, canonical, order=1), info)


# ---------------------------------------------------------------------------------------------------------
# many inputs


def collect_inputs(inputs: list[str | Path], opts: PredictOptions) -> list[Subject]:
    """Files, folders of NIfTI files, or manifests (CSV/TSV with per-scan covariates) -> jobs."""
    from synth7t.manifest import read_manifest

    age, sex, diagnosis = option_covariates(opts).values()
    jobs: list[Subject] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if is_nifti_path(f))
            if not files:
                raise InputError(f"{p}: folder holds no .nii/.nii.gz/.mgz file")
            jobs += [Subject(_stem(f), f, age=age, sex=sex, diagnosis=diagnosis) for f in files]
        elif p.suffix.lower() in (".csv", ".tsv"):
            for s in read_manifest(p):
                jobs.append(Subject(s.subject, s.t3, age=s.age if s.age is not None else age, sex=s.sex or sex,
                                    diagnosis=s.diagnosis or diagnosis))
        else:
            jobs.append(Subject(_stem(p), p, age=age, sex=sex, diagnosis=diagnosis))
    names = [j.subject for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"several inputs share the output name(s) {', '.join(dupes)}; predict them separately")
    return jobs


def option_covariates(opts: PredictOptions) -> dict:
    """``{"age", "sex", "diagnosis"}`` given as options (for every input that does not give its own), parsed."""
    from synth7t.manifest import parse_age, parse_diagnosis, parse_sex

    try:
        return {"age": parse_age(None if opts.age is None else str(opts.age)), "sex": parse_sex(opts.sex),
                "diagnosis": parse_diagnosis(opts.diagnosis)}
    except ValueError as exc:
        raise InputError(f"covariates: {exc}") from None


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii", ".mgz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


class PlainLayout:
    """Outputs of plain inputs: ``OUT/<name>/syn7t.nii.gz``, ``mask.nii.gz``, ...; ``provenance.json`` last."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def begin(self, predictor: Predictor, opts: PredictOptions) -> None:
        """Nothing to write before the first scan."""

    def paths(self, job: Subject) -> dict[str, Path]:
        dest = self.out / job.subject
        return {"folder": dest, "syn7t": dest / OUTPUT_NAME, "mask": dest / "mask.nii.gz",
                "uncertainty": dest / "uncertainty.nii.gz", "on_input_grid": dest / "syn7t_on_input_grid.nii.gz",
                "record": dest / "provenance.json"}

    def complete(self, job: Subject) -> bool:
        paths = self.paths(job)
        return paths["syn7t"].exists() and paths["record"].exists()

    def record(self, job: Subject, prov: dict, written: dict[str, Path]) -> None:
        write_json(self.paths(job)["record"], prov)


def predict(model_dir: str | Path, inputs: list[str | Path] | str | Path | None, out: str | Path,
            opts: PredictOptions | None = None, *, progress: bool = True, bids=None) -> PredictResult:
    """Predict every input into ``out/<name>/`` (or, with ``bids``, a :class:`synth7t.bids.BidsQuery`, every T1w
    of a BIDS dataset into the BIDS derivatives dataset ``out``); one failing input does not stop the others.

    With ``opts.shard = (k, n)`` only every n-th job (sorted by name) from the k-th is predicted. Scans are
    preprocessed ahead of the network in ``opts.workers`` processes (:mod:`synth7t.prefetch`).
    """
    from synth7t.prefetch import default_workers, prefetched
    from synth7t.preprocess.pipeline import select_shard
    from synth7t.progress import progress_bar

    opts = opts or PredictOptions()
    if bids is not None:
        from synth7t.bids import BidsLayout, collect_bids

        jobs, layout = collect_bids(bids, opts), BidsLayout(bids.root, out)
    else:
        inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs or [])
        jobs, layout = collect_inputs(inputs, opts), PlainLayout(out)
    if opts.shard is not None:
        jobs = select_shard(jobs, opts.shard)
        log.info("shard %d/%d: %d scan(s)", opts.shard[0] + 1, opts.shard[1], len(jobs))
    predictor = Predictor(model_dir, opts.device, opts.precision)
    steps, warnings = resolve_steps(predictor, opts)
    if opts.n4 is not None and opts.n4 != "none":
        from synth7t.preprocess.bias import n4_preset

        n4_preset(opts.n4)  # an unknown preset fails here, once, not once per input
    for w in warnings:
        log.warning("%s", w)
    log.info("preprocessing: %s", ", ".join(f"{k} {v['value']} ({v['source']})" for k, v in steps.items()))
    layout.begin(predictor, opts)
    result, todo = PredictResult(), []
    for job in jobs:
        if layout.complete(job) and not opts.overwrite:
            paths = layout.paths(job)
            result.skipped.append(paths.get("folder", paths["syn7t"]))
            log.info("%s: output exists, skipped (use --overwrite to redo)", job.subject)
        else:
            todo.append(job)
    workers = default_workers(len(todo), predictor.device.type) if opts.workers is None else opts.workers
    ahead = prefetched(todo, predictor.prep_spec, steps, preprocessed=opts.preprocessed,
                       keep_input=opts.resample_to_input, workers=workers, device_type=predictor.device.type)
    for job, prep, error in progress_bar(ahead, "predict", enabled=progress and len(todo) > 1, total=len(todo)):
        t0 = time.perf_counter()
        try:
            if error is not None:
                raise _PreparationFailed(error)
            main = _predict_job(predictor, job, layout, opts, prep)
        except Exception as exc:  # one bad scan must not stop a cohort; the reason is kept
            result.failed[str(job.t3)] = failure_message(exc)
            if isinstance(exc, Synth7tError):
                log.error("%s", exc)
            else:
                log.exception("%s: failed", job.t3)
            continue
        result.done.append(main)
        result.seconds[job.subject] = sum(prep["timings"].values()) - prep["timings"]["network"] \
            + time.perf_counter() - t0
        log.info("%s: done in %.1f s -> %s", job.subject, result.seconds[job.subject], main)
    return result


class _PreparationFailed(Synth7tError):
    """Loading or preprocessing a scan failed (inline or in a worker); the message is already formatted."""


def failure_message(exc: BaseException) -> str:
    """One line for a failed scan: a user error's message, else the exception's type and first line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, Synth7tError) else f"{type(exc).__name__}: {text}"


def _predict_job(predictor: Predictor, job: Subject, layout, opts: PredictOptions, prep: dict) -> Path:
    paths = layout.paths(job)
    if paths["syn7t"].resolve() == job.t3.resolve():
        raise InputError(f"{job.t3}: output would overwrite the input")
    res = finish_prediction(predictor, prep, opts, covariates={"age": job.age, "sex": job.sex,
                                                               "diagnosis": job.diagnosis})
    written = {}
    inputs = (job.t3,)
    written["syn7t"] = save_volume(paths["syn7t"], res["syn7t"], inputs=inputs)
    written["mask"] = save_volume(paths["mask"], res["mask"], dtype=np.uint8, inputs=inputs)
    if "uncertainty" in res:
        written["uncertainty"] = save_volume(paths["uncertainty"], res["uncertainty"], inputs=inputs)
    if opts.resample_to_input:
        written["on_input_grid"] = save_volume(paths["on_input_grid"],
                                               on_input_grid(res["syn7t"], res["canonical"], res["reorientation"]),
                                               inputs=inputs)
    from synth7t.cohortqc.thumbs import save_prediction_thumbnails  # for `synth7t qc`: input vs output

    save_prediction_thumbnails(written["syn7t"], res)
    layout.record(job, provenance(predictor, job, opts, res, written), written)  # last: marks the scan done
    return written["syn7t"]


def provenance(predictor: Predictor, job: Subject, opts: PredictOptions, res: dict, written: dict) -> dict:
    import nibabel
    import numpy

    return {
        "synth7t_version": __version__,
        "input": job.t3.name,  # the file name only: no folder paths (they often hold IDs)
        "model": {"folder": predictor.model_dir.name, "sha256": predictor.checksum,
                  "preset": predictor.config.get("preset")},
        "outputs": {k: Path(v).name for k, v in written.items()},
        "intensity_units": ("input intensity units (clipped range of the input brain)" if opts.rescale
                            else "model units: 0 and 1 = the input brain's 1st and 99th percentiles"),
        "normalization_limits": list(res["limits"]),
        "voxel_size_mm": list(res["steps"]["voxel_size_mm"]["value"]),
        "preprocessing": res["steps"],
        "training_preprocessing": predictor.config.get("preprocessing") or {},
        "parameters": {k: v for k, v in vars(opts).items()
                       if k not in ("age", "sex", "diagnosis", *RUN_TIME_OPTIONS)},
        "covariates_given": {k: getattr(job, k) is not None for k in ("age", "sex", "diagnosis")},
        "device": str(predictor.device),
        "timings_s": {k: round(v, 2) for k, v in res["timings"].items()},
        "versions": {"torch": torch.__version__, "numpy": numpy.__version__, "nibabel": nibabel.__version__},
    }
