"""Typed training configuration and its presets (thesis appendix tables 2 and 3).

One :class:`TrainConfig` object describes a run; it is built from a preset YAML (``unc``, ``biofinder``,
``gan``, ``tiny``, and the 3-D ``patch3d`` and ``tiny3d`` in ``synth7t/presets/`` or a user's file), overridden
field by field from the command line (``--set model.n_res=2``), validated, and saved in the run folder as
``config.json``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synth7t.dataset.augment import AugmentConfig
from synth7t.dataset.context import CONTEXT_DIM
from synth7t.dataset.views import VIEWS, check_views
from synth7t.errors import ConfigError
from synth7t.intensity import NYUL_PERCENTILES
from synth7t.nn.config import CriticConfig, GeneratorConfig, UNet3DConfig, UNetConfig

PRESETS = ("unc", "biofinder", "gan", "tiny", "patch3d", "tiny3d")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """``patch``: train on random square in-plane crops of this size centred near brain pixels (a multiple of
    the model's down-sampling factor; ``null`` = whole slices as in the thesis). Validation uses whole slices.
    ``patch_offsets``: give the model each patch's position in its slice, so that the positional encodings of
    self-attention are those of the whole slice that prediction sees (the patch's corner is snapped to a
    multiple of the down-sampling factor, so its pooled grids are crops of the slice's). ``false`` (the default,
    kept for presets trained before this option) encodes positions from the patch's own corner: a model that
    self-attends then meets at prediction positions it never saw in training.
    ``standardize``: ``histmatch`` maps each 3T input's brain intensities onto the training split's mean 7T
    histogram before the network (:func:`synth7t.intensity.standardize`; the reference is stored in the model
    folder and applied by ``predict``), so that the network learns detail rather than one scanner's contrast;
    ``nyul``: Nyúl-Udupa histogram standardization learned on the training split's 3T inputs: each input's brain
    landmarks (the percentiles ``nyul_percentiles``) are mapped piecewise linearly onto the mean standard
    landmarks of the training subjects (:func:`synth7t.intensity.nyul_standard`; stored in the model folder and
    applied by ``predict`` and ``evaluate`` as in training). Unlike ``histmatch`` it keeps each input's 3T
    contrast between landmarks and uses no 7T. ``none`` feeds the clipped min-max 3T as the thesis did.
    ``match_target_to_input`` (the thesis' "7T histogram matched to its 3T"): in training each subject's 7T
    target brain is histogram-matched (quantile map, :func:`synth7t.intensity.quantile_map`) to its own 3T input
    brain as the network sees it (after ``standardize``), so the network learns detail, not contrast. The model
    folder records it (``config.json`` ``target_matched_to_input``, and the model card): such a model's output
    is in the contrast of its (standardized) input, not 7T contrast; ``predict`` needs nothing else. ``evaluate``
    keeps the real 7T as the reference, so such a model is expected to lose on intensity-sensitive metrics
    (PSNR) against the histogram-matching baselines: compare it by its gain over its own input's contrast.
    ``patch3d`` (3-D models, ``model.kind: unet3d``, required there): train on cubes of this side cut from the
    store's (Z, H, W) volumes, centred on a random brain voxel and zero-padded where a volume is smaller (a
    multiple of the model's down-sampling factor); an epoch draws ``patches_per_subject`` cubes per training
    subject, validation ``val_patches`` fixed cubes per validation subject. The 3-D model ignores the covariates
    and takes no augmentation (``data.augment`` must be all off).
    ``views`` (multi-view synthesis, 2.5D U-net only): the slice axes samples are cut along, from the one axial-first
    store (:mod:`synth7t.dataset.views`): ``[axial]`` (the thesis), or e.g. ``[axial, coronal, sagittal]``;
    ``predict`` then runs every view and fuses the volumes (``fusion`` in the model folder: mean by default,
    ``synth7t train-fusion`` for a learned one). ``view_design``: ``shared`` (one network for every view, told
    which view it sees by a one-hot ``[axial, coronal, sagittal]`` appended to its context vector, so
    ``model.context_dim`` is 10) or ``per_view`` (one network per view, each trained in turn on its view for an
    equal share of ``trainer.max_minutes`` and ``trainer.max_steps``; ``trainer.max_epochs`` applies to each).
    """

    batch_size: int = Field(16, ge=1)
    patch: int | None = Field(None, ge=8)
    patch_offsets: bool = False
    num_workers: int = Field(2, ge=0)
    standardize: Literal["none", "histmatch", "nyul"] = "none"
    nyul_percentiles: tuple[float, ...] = NYUL_PERCENTILES
    match_target_to_input: bool = False
    augment: AugmentConfig = AugmentConfig()
    patch3d: int | None = Field(None, ge=8)
    patches_per_subject: int = Field(16, ge=1)
    val_patches: int = Field(4, ge=1)
    views: tuple[Literal["axial", "coronal", "sagittal"], ...] = ("axial",)
    view_design: Literal["shared", "per_view"] = "shared"

    @field_validator("views")
    @classmethod
    def _views(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_views(v)

    @model_validator(mode="after")
    def _percentiles_increase(self) -> DataConfig:
        p = self.nyul_percentiles
        if len(p) < 2 or any(b <= a for a, b in zip(p, p[1:], strict=False)) or p[0] < 0 or p[-1] > 100:
            raise ValueError(f"data.nyul_percentiles {list(p)}: need >= 2 strictly increasing values in [0, 100]")
        return self


class OptimConfig(_Strict):
    """Adam and the thesis' learning-rate schedules (3.4.1).

    ``schedule``: ``plateau`` (ReduceLROnPlateau stepped once per epoch on the epoch's mean training loss, as the
    thesis did: multiply by ``factor`` after ``patience`` epochs without improvement), ``step`` (multiply by
    ``factor`` every ``every_steps`` optimizer steps), ``epoch`` (multiply by ``factor`` each epoch), ``budget``
    (anneal continuously from ``lr`` to ``lr * factor`` over the run's budget: the rate is ``lr * factor ** p``
    after every optimizer step, ``p`` the fraction of the budget spent, the largest of elapsed / ``max_minutes``,
    steps / ``max_steps`` and epochs / ``max_epochs`` of those set; so a slower machine, which takes fewer steps in
    the same minutes, still ends its run at the same low rate) or ``none``.

    ``ema_decay``: keep an exponential moving average of the generator's weights, updated after every generator
    step (``ema = decay * ema + (1 - decay) * weights``; the first step copies the weights); validation, the best
    checkpoint and the model folder then use the averaged weights. None (the thesis): no average.
    """

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["plateau", "step", "epoch", "budget", "none"] = "plateau"
    factor: float = Field(0.1, gt=0, le=1)
    every_steps: int = Field(200, ge=1)
    patience: int = Field(5, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)


class LossConfig(_Strict):
    """L1 + perceptual_weight * perceptual (+ gan_weight * adversarial for the GAN preset; thesis 2.1.6, 2.2).

    The perceptual networks are 2-D: a 3-D model's loss applies them to every axial slice of its patches."""

    perceptual: Literal["deepbet", "radimagenet", "none"] = "deepbet"
    perceptual_weight: float = Field(1e-3, ge=0)
    gan_weight: float = Field(0.2, ge=0)
    gp_weight: float = Field(10.0, ge=0)
    n_critic: int = Field(5, ge=1)
    critic_lr: float = Field(2e-5, gt=0)
    critic_betas: tuple[float, float] = (0.0, 0.9)


class TrainerConfig(_Strict):
    max_epochs: int = Field(10, ge=1)
    max_steps: int = Field(-1, ge=-1)
    max_minutes: float | None = Field(None, gt=0)
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "auto"
    seed: int = 0
    limit_train_batches: float | int = 1.0
    limit_val_batches: float | int = 1.0
    log_every_n_steps: int = Field(10, ge=1)
    val_every_n_epochs: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)  # torch CPU threads (None: torch's default)
    checkpoint_every_steps: int = Field(200, ge=1)
    # memory layout of the 2.5D U-net in training: "auto" = channels-last on CPU in one process for networks of
    # >= 64 channels (the layout `predict` runs and the fused C kernels need; measured faster there, slower for
    # `tiny`), PyTorch's default elsewhere; true/false force it
    channels_last: bool | Literal["auto"] = "auto"


class TrainConfig(_Strict):
    preset: str = "custom"
    model: GeneratorConfig = UNetConfig()
    critic: CriticConfig | None = None
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    trainer: TrainerConfig = TrainerConfig()

    @property
    def is_gan(self) -> bool:
        return self.critic is not None

    @property
    def view_coded(self) -> bool:
        """One network for several views, told which by a one-hot appended to its context (``data.views``)."""
        return len(self.data.views) > 1 and self.data.view_design == "shared"

    @model_validator(mode="before")
    @classmethod
    def _view_context(cls, data: Any) -> Any:
        """A shared multi-view U-net reads ``CONTEXT_DIM + 3`` context values: set ``model.context_dim`` unless
        given (a value given that differs is refused by :meth:`_fits_views`)."""
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            return data
        d = data["data"]
        views, design = d.get("views") or ["axial"], d.get("view_design", "shared")
        model = data.get("model")
        model = {} if model is None else model
        if isinstance(views, (list, tuple)) and len(views) > 1 and design == "shared" and isinstance(model, dict) \
                and model.get("kind", "unet") == "unet" and "context_dim" not in model:
            data = {**data, "model": {**model, "context_dim": CONTEXT_DIM + len(VIEWS)}}
        return data

    @model_validator(mode="after")
    def _fits_views(self) -> TrainConfig:
        kind = getattr(self.model, "kind", "unet")
        if kind != "unet":
            if self.data.views != ("axial",):
                raise ValueError(f"data.views {list(self.data.views)}: multi-view synthesis is for synth7t's 2.5D "
                                 f"U-net (model.kind unet), not model.kind {kind}")
            return self
        want = CONTEXT_DIM + len(VIEWS) if self.view_coded else CONTEXT_DIM
        if self.model.context_dim != want:
            how = "a shared multi-view network" if self.view_coded else "a network of one view or one per view"
            raise ValueError(f"model.context_dim {self.model.context_dim}: {how} reads {want} context values")
        if self.view_coded and (not self.model.covariates or not self.model.cross_attention_stages):
            raise ValueError("data.view_design shared: the view reaches the network through its context "
                             "(cross-attention); it needs model.covariates true and model.cross_attention_stages")
        return self

    @property
    def is_3d(self) -> bool:
        return isinstance(self.model, UNet3DConfig)

    @model_validator(mode="after")
    def _fits_3d(self) -> TrainConfig:
        p3 = self.data.patch3d
        if not self.is_3d:
            if p3 is not None:
                raise ValueError("data.patch3d is for 3-D models (model.kind: unet3d)")
            return self
        f = self.model.downsample_factor
        if p3 is None:
            raise ValueError("a 3-D model (model.kind: unet3d) trains on cubes: set data.patch3d (e.g. 64)")
        if p3 % f:
            raise ValueError(f"data.patch3d {p3} is not a multiple of the model's down-sampling factor {f}")
        if self.data.patch is not None:
            raise ValueError("data.patch (2-D crops) does not apply to a 3-D model; use data.patch3d")
        if self.critic is not None:
            raise ValueError("the WGAN-GP critic is 2-D: a 3-D model (model.kind: unet3d) trains without one")
        if self.data.augment.any_enabled:
            raise ValueError("data.augment: the augmentations are 2-D; switch them off for a 3-D model")
        if self.data.match_target_to_input:
            raise ValueError("data.match_target_to_input is for the 2.5D model; a 3-D model trains on the real 7T")
        return self

    @model_validator(mode="after")
    def _patch_fits(self) -> TrainConfig:
        if self.is_3d:
            return self
        p, f = self.data.patch, self.model.downsample_factor
        if p is not None and p % f:
            raise ValueError(f"data.patch {p} is not a multiple of the model's down-sampling factor {f}")
        if p is not None and self.critic is not None and p % self.critic.downsample_factor:
            raise ValueError(f"data.patch {p} is not a multiple of the critic's {self.critic.downsample_factor}")
        return self

    @model_validator(mode="after")
    def _gan_needs_weight(self) -> TrainConfig:
        if self.critic is not None and self.loss.gan_weight == 0:
            raise ValueError("a critic is configured but loss.gan_weight is 0")
        return self


def preset_dict(name_or_path: str | Path) -> dict[str, Any]:
    """The raw dict of a packaged preset (by name) or of a YAML file."""
    name = str(name_or_path)
    if name in PRESETS:
        text = resources.files("synth7t.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        source = f"preset {name}"
    else:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{name}: unknown preset (known: {', '.join(PRESETS)}) and no such YAML file")
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: malformed YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    data.setdefault("preset", Path(name).stem)
    return data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``model.n_res``) to values; strings are parsed as YAML (``2``, ``[1,2]``, ``null``)."""
    out = _deepcopy(data)
    for key, value in overrides.items():
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"--set {key}={value}: cannot parse the value") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
            node = node[part]
        node[parts[-1]] = _deepcopy(value)  # a later dotted key must not write into the caller's dict
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(preset: str | Path = "tiny", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset + overrides -> validated :class:`TrainConfig`; a bad value is one :class:`ConfigError` line."""
    data = apply_overrides(preset_dict(preset), overrides or {})
    return validate_config(data, source=f"preset {preset}")


def validate_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            parts = [str(p) for p in err["loc"]]
            if parts[:1] == ["model"] and parts[1:2] in (["unet"], ["unet3d"]):
                del parts[1]  # the model kind's tag that pydantic puts in the location
            loc = ".".join(parts) or "(top level)"
            problems.append(f"{loc}: {err['msg']}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
