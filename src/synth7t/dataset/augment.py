"""Reproducible augmentations of 2.5D samples (thesis 1.3.1-1.3.2).

Following TorchIO's split (``RandomBiasField`` draws, ``BiasField`` applies), every augmentation has two
halves:

* a ``Random*`` object that only **draws** parameters from a :class:`numpy.random.Generator`, and
* a deterministic transform (frozen dataclass with explicit parameters) that only **applies** them.

:class:`Augmenter` draws the enabled transforms, applies them in a fixed order (left-right flip, GMM
intensity, elastic, blur, bias field, scaling, noise, covariate drop-out) and records them in ``sample["augment"]``
as a JSON string (a list of ``{"name": ..., **params}`` dicts; a string so that torch's default collate keeps it
as a list of strings).
:func:`replay` applies recorded parameters again and gives bit-identical output.

Intensity transforms change only the 3T ``input`` and keep the background (exact 0) at 0; the elastic
deformation moves ``input``, ``target`` (linear interpolation) and ``mask`` (nearest neighbour) together.
Values may leave [0, 1] slightly; nothing is re-clipped (except GMM-mapped values at 0).

GMM intensity augmentation (Meyer et al. 2021, thesis 1.3.1) maps intensities with the monotone mixture map of
:mod:`synth7t.dataset.gmm` (fitted at pack time).

Why one module of ~490 lines: each augmentation is three small pieces that must agree -- its config section
(``*Augment``), its drawer (``Random*``) and its transform -- and a reader checking one augmentation reads all
three here. The mixture model they use lives in :mod:`synth7t.dataset.gmm`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synth7t.dataset.gmm import GMMFit, gmm_map_table

# ---------------------------------------------------------------------------------------------------------
# deterministic transforms (explicit parameters)


class Transform:
    """A deterministic transform of a sample dict; ``name`` identifies it in the records."""

    name: ClassVar[str] = ""

    def __call__(self, sample: dict) -> dict:
        raise NotImplementedError

    def record(self) -> dict:
        """JSON-able ``{"name": ..., **params}``."""
        return {"name": self.name, **_jsonable(asdict(self))}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _tuples(obj: Any) -> Any:
    """Nested lists -> nested tuples (hashable, frozen dataclass fields)."""
    if isinstance(obj, (list, tuple)):
        return tuple(_tuples(v) for v in obj)
    return obj


def _with_input(sample: dict, new_input: np.ndarray) -> dict:
    out = dict(sample)
    out["input"] = new_input.astype(np.float32, copy=False)
    return out


@dataclass(frozen=True)
class GMMIntensity(Transform):
    """Monotone GMM intensity mapping of the brain voxels (input > 0) of the 3T input; negatives set to 0.

    Uses :func:`gmm_map_table` (the exact monotone map on a 4097-point grid, interpolated).
    """

    name: ClassVar[str] = "gmm"
    means: tuple[float, ...]
    stds: tuple[float, ...]
    weights: tuple[float, ...]
    new_means: tuple[float, ...]
    new_stds: tuple[float, ...]

    def __call__(self, sample: dict) -> dict:
        x = sample["input"]  # (S, H, W)
        brain = x > 0
        out = x.copy()
        fit = GMMFit(self.means, self.stds, self.weights)
        out[brain] = np.maximum(gmm_map_table(x[brain], fit, self.new_means, self.new_stds), 0.0)
        return _with_input(sample, out)


@lru_cache(maxsize=32)
def _spline_matrix(n: int, size: int) -> np.ndarray:
    """(size, n) matrix of natural cubic-spline interpolation from n control points to ``size`` samples."""
    from scipy.interpolate import CubicSpline

    return CubicSpline(np.arange(n), np.eye(n), bc_type="natural")(np.linspace(0, n - 1, size))


def dense_displacement(coarse: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Upsample a (2, n, m) control-point displacement grid to (2, H, W) by separable natural cubic splines.

    ``d_c = A_H @ coarse_c @ A_W.T`` with ``A`` the spline interpolation matrices (:func:`_spline_matrix`).
    """
    coarse = np.asarray(coarse, dtype=np.float64)
    a_h, a_w = _spline_matrix(coarse.shape[1], hw[0]), _spline_matrix(coarse.shape[2], hw[1])
    return a_h @ coarse @ a_w.T  # (H, n) @ (2, n, m) @ (m, W) -> (2, H, W)


def _warp(stack: np.ndarray, ci: np.ndarray, cj: np.ndarray, nearest: bool) -> np.ndarray:
    """Sample every channel of a (C, H, W) stack at (ci, cj) (H, W): bilinear or nearest, 0 outside."""
    C, H, W = stack.shape
    padded = np.zeros((C, H + 2, W + 2), np.float32)  # zero border: outside the slice reads 0
    padded[:, 1:-1, 1:-1] = stack
    flat = padded.reshape(C, -1)  # (C, (H + 2) * (W + 2)): gathers with flat indices are fastest
    pi = np.clip(ci + 1.0, 0.0, H + 1.0)
    pj = np.clip(cj + 1.0, 0.0, W + 1.0)
    if nearest:
        return flat[:, np.rint(pi).astype(np.intp) * (W + 2) + np.rint(pj).astype(np.intp)]
    i0 = np.minimum(pi.astype(np.intp), H)  # floor (pi >= 0)
    j0 = np.minimum(pj.astype(np.intp), W)
    fi, fj = (pi - i0).astype(np.float32), (pj - j0).astype(np.float32)
    k = i0 * (W + 2) + j0  # (H, W) flat index of the top-left neighbour
    top = flat[:, k] * (1 - fj) + flat[:, k + 1] * fj
    bottom = flat[:, k + W + 2] * (1 - fj) + flat[:, k + W + 3] * fj
    return top * (1 - fi) + bottom * fi


@dataclass(frozen=True)
class ElasticDeformation(Transform):
    """Smooth in-plane deformation: ``out(i, j) = in(i + d0(i, j), j + d1(i, j))``, d from control points.

    ``displacement`` is a (2, n, m) grid in pixels, upsampled by cubic splines (:func:`dense_displacement`).
    Images use bilinear interpolation, the mask nearest neighbour; outside the slice reads 0.
    """

    name: ClassVar[str] = "elastic"
    displacement: tuple

    def __call__(self, sample: dict) -> dict:
        H, W = sample["input"].shape[-2:]
        d = dense_displacement(np.asarray(self.displacement), (H, W))  # (2, H, W)
        ci = np.arange(H, dtype=np.float64)[:, None] + d[0]  # (H, W)
        cj = np.arange(W, dtype=np.float64)[None, :] + d[1]
        out = dict(sample)
        out["input"] = _warp(sample["input"], ci, cj, nearest=False)
        if "target" in sample:
            out["target"] = _warp(sample["target"], ci, cj, nearest=False)
        if "mask" in sample:
            out["mask"] = _warp(sample["mask"], ci, cj, nearest=True)
        return out


def bias_polynomial(coefficients: tuple[float, ...], order: int, hw: tuple[int, int]) -> np.ndarray:
    """``log b(u, v) = sum_{i+j<=order} c_ij u^i v^j`` on u, v in [-1, 1]; returns ``b`` of shape (H, W)."""
    u = np.linspace(-1.0, 1.0, hw[0])[:, None]
    v = np.linspace(-1.0, 1.0, hw[1])[None, :]
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    if len(coefficients) != len(terms):
        raise ValueError(f"order {order} needs {len(terms)} coefficients, got {len(coefficients)}")
    log_b = sum(c * u**i * v**j for c, (i, j) in zip(coefficients, terms, strict=True))
    return np.exp(log_b)


@dataclass(frozen=True)
class BiasField(Transform):
    """Multiply the input by a smooth polynomial bias field (:func:`bias_polynomial`), same for all slices."""

    name: ClassVar[str] = "bias"
    order: int
    coefficients: tuple[float, ...]

    def __call__(self, sample: dict) -> dict:
        x = sample["input"]
        return _with_input(sample, x * bias_polynomial(self.coefficients, self.order, x.shape[-2:]))


@dataclass(frozen=True)
class IntensityScale(Transform):
    """Global intensity scaling ``v' = factor * v`` of the input."""

    name: ClassVar[str] = "scale"
    factor: float

    def __call__(self, sample: dict) -> dict:
        return _with_input(sample, sample["input"] * np.float32(self.factor))


@dataclass(frozen=True)
class Noise(Transform):
    """Noise on the brain voxels (input > 0) of the input, from a recorded seed.

    Gaussian: ``v + std n1``; Rician: ``sqrt((v + std n1)^2 + (std n2)^2)``, n1, n2 ~ N(0, 1).
    """

    name: ClassVar[str] = "noise"
    kind: str
    std: float
    seed: int

    def __call__(self, sample: dict) -> dict:
        x = sample["input"]
        brain = x > 0
        v = x[brain]  # (N,) brain voxels in C order; the noise is drawn for these only
        g = np.random.default_rng(self.seed)
        n1 = g.standard_normal(v.size, dtype=np.float32) * np.float32(self.std)
        if self.kind == "gaussian":
            noisy = v + n1
        elif self.kind == "rician":
            n2 = g.standard_normal(v.size, dtype=np.float32) * np.float32(self.std)
            noisy = np.sqrt((v + n1) ** 2 + n2**2)
        else:
            raise ValueError(f"noise kind must be 'gaussian' or 'rician', got {self.kind!r}")
        out = x.copy()
        out[brain] = noisy
        return _with_input(sample, out)


@dataclass(frozen=True)
class Blur(Transform):
    """Gaussian blur of the input, ``sigma`` = (across slices, H, W) in voxels: a wider or anisotropic 3T PSF.

    Blurring happens inside the brain's support: voxels that were 0 (outside the skull-stripped brain) stay 0,
    as when a scan is blurred by its acquisition and stripped afterwards. Edges of the slice stack are extended.
    """

    name: ClassVar[str] = "blur"
    sigma: tuple[float, float, float]

    def __call__(self, sample: dict) -> dict:
        from scipy.ndimage import gaussian_filter

        x = sample["input"]
        out = gaussian_filter(x, self.sigma, mode="nearest", truncate=3.0)
        out[x == 0] = 0
        return _with_input(sample, out)


@dataclass(frozen=True)
class DropCovariates(Transform):
    """Mark covariates unknown in the context vector (``age``, ``sex``, diagnosis ``group``), as for a user who
    lacks them: the model learns to predict without them instead of meeting "unknown" first at prediction time.
    Uses the layout of :mod:`synth7t.dataset.context` (age: value and known flag; sex and group: one-hots)."""

    name: ClassVar[str] = "covariates"
    age: bool
    sex: bool
    group: bool

    def __call__(self, sample: dict) -> dict:
        from synth7t.dataset.context import CONTEXT_ORDER

        ctx = np.array(sample["context"], dtype=np.float32)
        names = {"age": ("age_scaled", "age_known"), "sex": ("sex_F", "sex_M"), "group": ("healthy", "ill")}
        for what, keys in names.items():
            if getattr(self, what):
                ctx[[CONTEXT_ORDER.index(k) for k in keys]] = 0.0
        out = dict(sample)
        out["context"] = ctx
        return out


@dataclass(frozen=True)
class FlipLR(Transform):
    """Mirror the sample left-right: the anatomical R axis, whatever the sample's view
    (:mod:`synth7t.dataset.views`; ``sample["view"]``, axial when absent). Axial and coronal slices have R as their
    rows: input, target and mask are flipped along the rows. Sagittal slices are cut along R: the mirrored brain's
    sample at the mirrored position is the same slice with its neighbours in reverse order, so the input's slices
    are reversed and the slice-position covariate (the R position of a sagittal slice) changes sign; target and
    mask are unchanged. (Position of axial and coronal slices is along S or A: unchanged.)"""

    name: ClassVar[str] = "flip_lr"

    def __call__(self, sample: dict) -> dict:
        from synth7t.dataset.context import CONTEXT_ORDER

        out = dict(sample)
        if sample.get("view", "axial") == "sagittal":
            out["input"] = np.ascontiguousarray(sample["input"][::-1])
            ctx = np.array(sample["context"], dtype=np.float32)
            ctx[CONTEXT_ORDER.index("slice_position")] *= -1.0
            out["context"] = ctx
            return out
        for key in ("input", "target", "mask"):
            if key in sample:
                out[key] = np.ascontiguousarray(sample[key][..., ::-1, :])
        return out


TRANSFORMS: dict[str, type[Transform]] = {
    t.name: t for t in (FlipLR, GMMIntensity, ElasticDeformation, Blur, BiasField, IntensityScale, Noise,
                         DropCovariates)
}


def from_records(records: str | list[dict]) -> list[Transform]:
    """Rebuild transforms from ``sample["augment"]`` (JSON string or list of dicts)."""
    if isinstance(records, str):
        records = json.loads(records) if records else []
    out = []
    for rec in records:
        rec = dict(rec)
        name = rec.pop("name", None)
        if name not in TRANSFORMS:
            raise ValueError(f"unknown augmentation {name!r}; known: {sorted(TRANSFORMS)}")
        out.append(TRANSFORMS[name](**{k: _tuples(v) for k, v in rec.items()}))
    return out


def apply_transforms(sample: dict, transforms: list[Transform]) -> dict:
    for t in transforms:
        sample = t(sample)
    return sample


def replay(sample: dict, records: str | list[dict]) -> dict:
    """Apply recorded augmentations to an un-augmented sample (bit-identical to the original run)."""
    out = apply_transforms(dict(sample), from_records(records))
    out["augment"] = records if isinstance(records, str) else json.dumps(records)
    return out


# ---------------------------------------------------------------------------------------------------------
# configuration and parameter drawing


class _Aug(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability of applying it to a sample")


class FlipAugment(_Aug):
    """Left-right mirror (:class:`FlipLR`), applied with probability ``p``."""

    p: float = Field(0.5, ge=0.0, le=1.0, description="probability of applying it to a sample")


class GMMAugment(_Aug):
    mean_shift: float = Field(0.05, ge=0.0, le=0.5, description="mu'_k = mu_k + U(-a, a) (normalized units)")
    std_scale: float = Field(0.2, ge=0.0, lt=1.0, description="sigma'_k = sigma_k * U(1 - a, 1 + a)")


class ElasticAugment(_Aug):
    control_points: int = Field(7, ge=4, le=64, description="control points per in-plane axis")
    max_displacement: float = Field(4.0, ge=0.0, le=50.0, description="pixels, U(-a, a), borders fixed")


class BlurAugment(_Aug):
    max_sigma: float = Field(1.0, ge=0.0, le=5.0, description="in-plane sigma per axis ~ U(0, a) pixels")
    max_sigma_slices: float = Field(0.5, ge=0.0, le=5.0, description="sigma across the input slices ~ U(0, a)")


class BiasAugment(_Aug):
    order: int = Field(3, ge=0, le=6)
    max_coefficient: float = Field(0.3, ge=0.0, le=2.0, description="c_ij ~ U(-a, a)")


class ScaleAugment(_Aug):
    max_change: float = Field(0.1, ge=0.0, lt=1.0, description="factor ~ U(1 - a, 1 + a)")


class NoiseAugment(_Aug):
    kind: Literal["rician", "gaussian"] = "rician"
    max_std: float = Field(0.03, ge=0.0, le=1.0, description="std ~ U(0, a) (normalized units)")


class CovariateAugment(_Aug):
    p_drop: float = Field(0.3, ge=0.0, le=1.0, description="each covariate is marked unknown with this probability")


class AugmentConfig(BaseModel):
    """Augmentations, each off by default; strengths in normalized [0, 1] intensity units or pixels."""

    model_config = ConfigDict(extra="forbid")
    flip_lr: FlipAugment = FlipAugment()
    gmm: GMMAugment = GMMAugment()
    elastic: ElasticAugment = ElasticAugment()
    blur: BlurAugment = BlurAugment()
    bias: BiasAugment = BiasAugment()
    scale: ScaleAugment = ScaleAugment()
    noise: NoiseAugment = NoiseAugment()
    covariates: CovariateAugment = CovariateAugment()

    @property
    def any_enabled(self) -> bool:
        return any(getattr(self, k).enabled for k in _RANDOM)


class RandomFlipLR:
    def __init__(self, cfg: FlipAugment):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator, hw: tuple[int, int], gmm: GMMFit | None) -> Transform:
        return FlipLR()


class RandomGMMIntensity:
    def __init__(self, cfg: GMMAugment):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator, hw: tuple[int, int], gmm: GMMFit | None) -> Transform | None:
        if gmm is None:
            return None
        k = len(gmm.means)
        a, s = self.cfg.mean_shift, self.cfg.std_scale
        new_means = np.asarray(gmm.means) + rng.uniform(-a, a, k)
        new_stds = np.asarray(gmm.stds) * rng.uniform(1 - s, 1 + s, k)
        return GMMIntensity(
            gmm.means, gmm.stds, gmm.weights, tuple(new_means.tolist()), tuple(new_stds.tolist())
        )


class RandomElastic:
    def __init__(self, cfg: ElasticAugment):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator, hw: tuple[int, int], gmm: GMMFit | None) -> Transform:
        n, a = self.cfg.control_points, self.cfg.max_displacement
        d = np.zeros((2, n, n))
        d[:, 1:-1, 1:-1] = rng.uniform(-a, a, (2, n - 2, n - 2))  # border control points stay fixed
        return ElasticDeformation(_tuples(d.tolist()))


class RandomBlur:
    def __init__(self, cfg: BlurAugment):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator, hw: tuple[int, int], gmm: GMMFit | None) -> Transform:
        c = self.cfg
        s = rng.uniform(0, [c.max_sigma_slices, c.max_sigma, c.max_sigma])
        return Blur(tuple(float(v) for v in s))


class RandomBiasField:
    def __init__(self, cfg: BiasAugment):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator, hw: tuple[int, int], gmm: GMMFit | None) -> Transform:
        order = self.cfg.order
        n = (order + 1) * (order + 2) // 2
        a = self.cfg.max_coefficient
        return BiasField(order, tuple(rng.uniform(-a, a, n).tolist()))


class RandomScale:
    def __init__(self, cfg: ScaleAugment):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator, hw: tuple[int, int], gmm: GMMFit | None) -> Transform:
        a = self.cfg.max_change
        return IntensityScale(float(rng.uniform(1 - a, 1 + a)))


class RandomNoise:
    def __init__(self, cfg: NoiseAugment):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator, hw: tuple[int, int], gmm: GMMFit | None) -> Transform:
        return Noise(self.cfg.kind, float(rng.uniform(0, self.cfg.max_std)), int(rng.integers(0, 2**31 - 1)))


class RandomDropCovariates:
    def __init__(self, cfg: CovariateAugment):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator, hw: tuple[int, int], gmm: GMMFit | None) -> Transform | None:
        age, sex, group = (bool(v) for v in rng.random(3) < self.cfg.p_drop)
        return DropCovariates(age, sex, group) if (age or sex or group) else None


_RANDOM = {
    "flip_lr": RandomFlipLR,
    "gmm": RandomGMMIntensity,
    "elastic": RandomElastic,
    "blur": RandomBlur,
    "bias": RandomBiasField,
    "scale": RandomScale,
    "noise": RandomNoise,
    "covariates": RandomDropCovariates,
}


class Augmenter:
    """Draws, applies and records the augmentations enabled in ``cfg``.

    Order: left-right flip, GMM, elastic, blur, bias, scale, noise, covariates.

    ``seed`` seeds the generator used when a call passes no ``rng``; :class:`SliceDataset` passes a
    per-sample generator so that results do not depend on the number of DataLoader workers.
    """

    def __init__(self, cfg: AugmentConfig | dict | None = None, seed: int = 0):
        if cfg is None:
            cfg = AugmentConfig()
        elif isinstance(cfg, dict):
            cfg = AugmentConfig.model_validate(cfg)
        elif not isinstance(cfg, AugmentConfig):
            raise ValueError(f"cfg must be an AugmentConfig or a dict, got {type(cfg).__name__}")
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.randoms = [(name, cls(getattr(cfg, name))) for name, cls in _RANDOM.items()]

    def draw(
        self, rng: np.random.Generator | None = None, *, hw: tuple[int, int], gmm: GMMFit | None = None
    ) -> list[Transform]:
        """Draw the transforms for one sample of in-plane size ``hw`` (GMM needs the subject's ``gmm``)."""
        rng = self.rng if rng is None else rng
        out = []
        for name, random in self.randoms:
            sub = getattr(self.cfg, name)
            if not sub.enabled or rng.random() >= sub.p:
                continue
            t = random.draw(rng, hw, gmm)
            if t is not None:
                out.append(t)
        return out

    def __call__(
        self, sample: dict, rng: np.random.Generator | None = None, gmm: GMMFit | None = None
    ) -> dict:
        """Augment a sample; the parameters go to ``sample["augment"]`` (JSON list of records)."""
        transforms = self.draw(rng, hw=tuple(sample["input"].shape[-2:]), gmm=gmm)
        out = apply_transforms(dict(sample), transforms)
        out["augment"] = json.dumps([t.record() for t in transforms])
        return out
