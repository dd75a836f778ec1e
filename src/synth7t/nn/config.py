"""Typed architecture settings of the U-net generator and the patch critic.

Both models are rebuilt from these objects alone (they are saved in a model folder's ``config.json``), so
every field has a default close to the thesis' U-nets (thesis appendix table 2) and every invalid
combination is refused here with a ``ValueError`` (pydantic's ``ValidationError`` is one) that says what was
expected, before any tensor is allocated.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from synth7t.dataset.context import CONTEXT_DIM  # the covariate vector of docs/data-layout.md


class UNetConfig(BaseModel):
    """Architecture of the 2.5D attention residual U-net (thesis 2.1.3-2.1.5, figures 20-28, table 2).

    Stages are numbered from 1 (full resolution) to ``len(channel_mult)`` (lowest resolution); stage ``i``
    has ``channels * channel_mult[i-1]`` channels and works at ``1 / 2**(i-1)`` of the input size.
    ``cross_attention_stages`` lists the stages that get a cross-attention block after each residual block
    (down and up path). The thesis also writes "CA at stages (3,4,5)" for its four-stage UNC model: index
    ``len(channel_mult) + 1`` therefore names the bottleneck, where a cross-attention block follows the
    self-attention block.

    Two architectures share these settings (thesis 2.1.5, figures 25-28):

    * ``attention_block``: ``"light"`` (synth7t's own: a cross-attention block is GroupNorm -> one attention to the
      covariate tokens -> output projection; the bottleneck has one self-attention layer with a feed-forward) or
      ``"thesis"`` (Ho et al.'s transformer block that the thesis code used, MONAI's ``SpatialTransformer``:
      GroupNorm -> 1x1 projection -> [self-attention] -> cross-attention to the covariates -> GEGLU feed-forward ->
      1x1 projection, each sub-layer with its LayerNorm and residual, figures 25 and 27; the bottleneck is figure 26:
      self-attention -> a second self-attention (or cross-attention when the bottleneck is listed in
      ``cross_attention_stages``) -> feed-forward).
    * ``attention_heads``: heads per attention layer; ``None`` gives ``channels // head_dim`` heads (light default),
      the thesis used one head (3.4.1).
    * ``up_path``: ``"stage"`` (one skip per stage, concatenated before the ``n_res`` blocks of the up stage) or
      ``"ho"`` (Ho et al.'s / MONAI's: ``n_res + 1`` blocks per up stage, each concatenating one kept feature map:
      the stem output, every down block's output and every down-sampled map, in reverse order).
    * ``self_attention``: spatial self-attention on or off (light: the bottleneck's layer; thesis: the
      self-attention sub-layer of every transformer block, and the bottleneck's second self-attention).
    * ``covariates``: ``False`` makes the network ignore the covariate vector (it sees every covariate as unknown,
      the zero vector) with the architecture and cost unchanged, so an ablation isolates what the covariates give.
    * ``adadm``: AdaDM in every residual block (thesis 2.1.1).
    * ``out_norm``: the GroupNorm before the last convolution; thesis 5.2 proposes removing it (``False``).
    * ``wavelet``: thesis 5.2's wavelet inputs (after Qu et al.'s WATNet). The network computes a one-level 2-D
      Haar transform of each input slice (orthonormal, :mod:`synth7t.nn.wavelet`: LL, LH, HL, HH at half
      resolution), upsamples the 4 sub-bands per slice back to full size by nearest neighbour (each 2x2 block
      gets its own coefficients) and concatenates them to the slices before the stem convolution: the stem sees
      ``5 * in_slices`` channels, nothing else changes. Why at the stem: the interface (B, S, H, W) -> (B, 1, H, W),
      the skip connections and every later stage stay as they are, the only new parameters are the stem's, and
      the transform is computed in torch inside ``forward`` (no weights, no buffers), so prediction needs nothing
      new and a model folder rebuilds it from ``config.json``. Needs even H and W (``downsample_factor`` >= 2).

    The defaults are synth7t's light network (the ``tiny`` preset); the ``unc``, ``biofinder`` and ``gan`` presets
    choose the thesis blocks, one head and Ho's up path.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the architecture kind (see GeneratorConfig); not written: a model folder without "kind" is this 2.5D U-net
    kind: Literal["unet"] = Field("unet", exclude=True)
    in_slices: int = 3
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    n_groups: int = 16
    n_res: int = 3
    cross_attention_stages: tuple[int, ...] = (3, 4)
    self_attention: bool = True
    context_dim: int = CONTEXT_DIM
    context_tokens: int = 4
    context_width: int = 64
    head_dim: int = 32
    attention_heads: int | None = None
    attention_block: Literal["light", "thesis"] = "light"
    up_path: Literal["stage", "ho"] = "stage"
    covariates: bool = True
    dropout: float = 0.0
    adadm: bool = True
    out_norm: bool = True
    wavelet: bool = False

    @field_validator("in_slices")
    @classmethod
    def _odd_slices(cls, v: int) -> int:
        if v < 1 or v % 2 == 0:
            raise ValueError(f"in_slices must be a positive odd number (2k+1 slices around the target), got {v}")
        return v

    @field_validator("channels", "n_res", "context_dim", "context_tokens", "context_width", "head_dim", "n_groups")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("attention_heads")
    @classmethod
    def _heads(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"attention_heads must be >= 1 (or null for channels // head_dim), got {v}")
        return v

    @field_validator("channel_mult")
    @classmethod
    def _mult(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 1 or any(m < 1 for m in v):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive integers, got {v}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> UNetConfig:
        for stage, ch in enumerate(self.stage_channels, start=1):
            if ch % self.n_groups:
                raise ValueError(
                    f"stage {stage} has channels*mult = {ch}, which is not divisible by n_groups = {self.n_groups}"
                )
        n_stages = len(self.channel_mult)
        for s in self.cross_attention_stages:
            if not 1 <= s <= n_stages + 1:
                raise ValueError(
                    f"cross_attention_stages entry {s} is out of range: stages are 1..{n_stages} "
                    f"and {n_stages + 1} is the bottleneck"
                )
        if len(set(self.cross_attention_stages)) != len(self.cross_attention_stages):
            raise ValueError(f"cross_attention_stages has duplicates: {self.cross_attention_stages}")
        for s in self.attention_stages:
            ch = self.stage_channels[min(s, n_stages) - 1]
            if ch % self.n_heads(ch):
                what = f"{self.attention_heads} heads" if self.attention_heads else f"heads of width {self.head_dim}"
                raise ValueError(f"stage {s}: {ch} channels cannot be split into {what}")
        return self

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of each stage, ``channels * channel_mult[i]``."""
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be multiples of ``2**(len(channel_mult) - 1)`` (and even with ``wavelet``)."""
        return max(2 ** (len(self.channel_mult) - 1), 2 if self.wavelet else 1)

    @property
    def attention_stages(self) -> tuple[int, ...]:
        """Stages holding any attention block (the bottleneck is ``len(channel_mult) + 1``)."""
        bottleneck = (len(self.channel_mult) + 1,) if self.self_attention else ()
        return tuple(sorted(set(self.cross_attention_stages) | set(bottleneck)))

    @property
    def n_up_blocks(self) -> int:
        """Residual blocks per up stage: ``n_res + 1`` on Ho's up path, else ``n_res``."""
        return self.n_res + 1 if self.up_path == "ho" else self.n_res

    def n_heads(self, ch: int) -> int:
        """Heads of an attention layer on ``ch`` channels: ``attention_heads``, or ``max(1, ch // head_dim)``."""
        return self.attention_heads or max(1, ch // self.head_dim)


class CriticConfig(BaseModel):
    """Patch critic of the WGAN-GP (thesis 2.2, figure 30, table 3).

    ``n_layers`` stride-2 convolutions (channels ``channels * 2**i``), then one convolution to a single
    channel: the critic maps (B, in_channels, H, W) to (B, 1, H / 2**n_layers, W / 2**n_layers).

    ``residual``: thesis 5.2's "improving the discriminator by adding residual blocks": after each down-sampling
    layer, a residual block ``x + conv3x3(act(LN(conv3x3(act(LN(x))))))`` at the same size (no batch norm, so
    the gradient penalty stays per sample). ``False`` is the thesis' plain critic of figure 30.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int = 64
    n_layers: int = 4
    in_channels: int = 1
    residual: bool = False

    @field_validator("channels", "n_layers", "in_channels")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @property
    def downsample_factor(self) -> int:
        """H and W of the critic's input must be multiples of ``2**n_layers``."""
        return 2**self.n_layers


class UNet3DConfig(BaseModel):
    """Architecture of the 3-D residual U-net trained on cubic patches (issue 16; :mod:`synth7t.nn.unet3d`).

    MONAI's ``UNet`` with residual units: ``len(channels)`` stages, stage ``i`` has ``channels[i]`` channels, each
    down step is a stride-2 residual unit of ``num_res_units`` convolutions (3x3x3, ``norm``, PReLU), the up path
    transposed convolutions and skip concatenations. The network predicts a residual added to its 3T input, as the
    2.5D U-net does. It has no covariate input: the covariates (age, sex, diagnosis) are ignored by 3-D models.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["unet3d"] = "unet3d"
    channels: tuple[int, ...] = Field((16, 32, 64, 128), min_length=2)
    num_res_units: int = Field(2, ge=0)
    norm: Literal["instance", "batch"] = "instance"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 for c in v):
            raise ValueError(f"channels must be positive stage widths, got {v}")
        return v

    @property
    def in_slices(self) -> int:
        """One input channel: the 3T patch itself (written to a model folder as ``n_slices``)."""
        return 1

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.channels)

    @property
    def context_dim(self) -> int:
        """The covariate vector's length (the model is called with it, and ignores it)."""
        return CONTEXT_DIM

    @property
    def downsample_factor(self) -> int:
        """Each side of a patch must be a multiple of ``2**(len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)


class PublishedUNetConfig(BaseModel):
    """Architecture of the thesis authors' published U-net (:mod:`synth7t.nn.published`), read from their
    settings file by ``synth7t import-thesis`` (their names in brackets).

    ``channels`` [n_channels], ``channel_mult`` [channel_mult], ``n_res`` [n_res_block] residual blocks per level,
    ``attention_res`` [attention_res]: the down-sampling factors (1, 2, 4, ...) whose levels get a transformer
    block after each residual block, ``n_groups`` [num_groups], ``n_heads`` (their class's default: 1),
    ``mid_attention`` [use_mid_attention], ``adadm`` [use_ada], ``initial_down`` [use_initial_down],
    ``in_slices`` [n_in_slices], ``context_dim`` [c_dim] and ``conditions`` [conditions]: the covariate tokens, in
    the order the authors' code fills them (``Age``, ``Sex`` (1 = F), ``Diagnostic`` (1 = cognitively normal or
    SCD), ``position``). ``n_slices_position`` [n_slices]: the divisor of the slice-position covariate
    ``2 (j - mid) / n_slices_position``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["thesis_published"] = "thesis_published"
    in_slices: int = Field(3, ge=1)
    channels: int = Field(256, ge=1)
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    n_res: int = Field(3, ge=1)
    attention_res: tuple[int, ...] = (4, 8)
    n_groups: int = Field(64, ge=1)
    n_heads: int = Field(1, ge=1)
    mid_attention: bool = True
    adadm: bool = True
    initial_down: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    context_dim: int = Field(1, ge=1)
    conditions: tuple[str, ...] = ("Sex", "Age", "position")
    n_slices_position: int = Field(244, ge=1)

    @field_validator("conditions")
    @classmethod
    def _conditions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in v if c not in PUBLISHED_CONDITIONS]
        if unknown or not v:
            raise ValueError(f"conditions must be some of {', '.join(PUBLISHED_CONDITIONS)}, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PublishedUNetConfig:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult) or self.channel_mult[0] != 1:
            raise ValueError(f"channel_mult must be positive integers starting with 1, got {self.channel_mult}")
        for ch in set(self.stage_channels):
            if ch % self.n_groups:
                raise ValueError(f"{ch} channels are not divisible by num_groups = {self.n_groups}")
            if ch % self.n_heads:
                raise ValueError(f"{ch} channels cannot be split into {self.n_heads} heads")
        return self

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be multiples of this (the authors' padding pads them to it)."""
        return 2 ** (len(self.channel_mult) - 1 + int(self.initial_down))

    @property
    def context_tokens(self) -> int:
        return len(self.conditions)


#: The covariates the authors' code knows, in the order its training data stored them.
PUBLISHED_CONDITIONS = ("Age", "Sex", "Diagnostic", "position")


def generator_kind(value: Any) -> str:
    """The architecture kind of a model section (dict or config object); absent = the 2.5D ``unet``."""
    return value.get("kind", "unet") if isinstance(value, dict) else getattr(value, "kind", "unet")


#: The ``model.kind`` values this version builds: the tags of :data:`GeneratorConfig`, in its order.
GENERATOR_KINDS = ("unet", "unet3d", "thesis_published")
#: A generator's settings: ``model.kind`` ``unet`` (or absent; 2.5D, :class:`UNetConfig`), ``unet3d`` or
#: ``thesis_published`` (the authors' published network, :class:`PublishedUNetConfig`).
GeneratorConfig = Annotated[
    Annotated[UNetConfig, Tag(GENERATOR_KINDS[0])] | Annotated[UNet3DConfig, Tag(GENERATOR_KINDS[1])]
    | Annotated[PublishedUNetConfig, Tag(GENERATOR_KINDS[2])],
    Discriminator(generator_kind),
]
_GENERATOR = TypeAdapter(GeneratorConfig)


def generator_config(data: dict | UNetConfig | UNet3DConfig | PublishedUNetConfig
                     ) -> UNetConfig | UNet3DConfig | PublishedUNetConfig:
    """A model section (``config.json["model"]``) -> its validated config, by ``kind`` (ValueError if bad)."""
    return _GENERATOR.validate_python(data)
