"""Import the thesis authors' published BioFINDER-2 models into synth7t model folders (``synth7t import-thesis``).

The journal version of the thesis (arXiv 2507.13782) published two trained networks in the repository
DeMONLab-BioFINDER/SuperResolutionMalo (CC BY-NC 4.0, Git LFS): ``models/my_unet_no_diag.pt`` (the U-net) and
``models/my_unetGanNoDiag.pt`` (the U-net trained with a critic), their settings files (``params_no_diag.txt``,
``paramsGanNoDiag.txt``: a Python dict literal), the 3T and 7T templates they register to and the affine between
them. synth7t never ships them: a user downloads them and :func:`import_thesis` turns them into a model folder:

* the settings are read with :func:`ast.literal_eval` (never ``eval``) into a
  :class:`~synth7t.nn.config.PublishedUNetConfig`;
* the checkpoint's ``model_state_dict`` tensors are read by :mod:`synth7t.torchfile`, which runs none of the
  file's pickled code (the real files also hold a pandas DataFrame of losses: it is skipped, never built);
* every parameter of :class:`~synth7t.nn.published.PublishedUNet` is taken from the authors' key of the same
  weight (:func:`authors_keys`), shapes checked; the constant time embedding of ``timesteps = 1`` is computed once
  from ``time_embed`` and each residual block's ``emb_layers`` and added to the bias of its first convolution
  (:func:`fold_time_embedding`): the module needs no time path and computes the same function;
* the templates (and the template affine) are copied into the folder, and ``config.json`` records the template
  grid, the slice axis and the authors' normalization; the model card records the source file's sha256 (and
  whether it is one of the published files), the licence, the citation and every difference from the authors'
  pipeline.
"""

from __future__ import annotations

import ast
import logging
import math
from pathlib import Path

import torch

from synth7t import __version__
from synth7t.errors import InputError
from synth7t.nn.config import PublishedUNetConfig

log = logging.getLogger(__name__)

#: The published checkpoints, by their Git LFS sha256: (file name, size in bytes, what it is).
PUBLISHED_CHECKPOINTS = {
    "edf579c48dbee460db36b34d0c44dd488903a8c80915388584d5942028f135eb":
        ("my_unet_no_diag.pt", 1_036_772_295, "the published U-net (L1 + perceptual loss)"),
    "6574f2a5f5076184a17efb59a6de14472ec48d565fbe2b0bbfbc468dbd547ceb":
        ("my_unetGanNoDiag.pt", 889_565_303, "the published GAN-trained U-net (L1 + perceptual + critic)"),
}
SOURCE_REPOSITORY = "DeMONLab-BioFINDER/SuperResolutionMalo"
LICENCE = "CC BY-NC 4.0 (the weights and templates; non-commercial use only, attribution required)"
CITATION = ("M. Gicquel, Enhancing the resolution of brain MRIs using deep learning, master's thesis 2024:E67, "
            "Lund University; and its journal version, arXiv:2507.13782")
TEMPLATE_SPACE = "thesis7T"  # the BIDS space label of the template grid
TEMPLATE_FILES = {"template_7t": "template_7T.nii.gz", "template_3t": "template_3T.nii.gz",
                  "template_affine": "template_3T_to_7T.mat"}
#: The authors' 3T N4 (func/processing/BiasCorrection.py: ANTs N4, shrink 2, 150 x 4 iterations, tolerance 1e-7;
#: ANTs' defaults otherwise), as synth7t's SimpleITK N4 parameters.
AUTHORS_N4_3T = {"bias_fwhm": 0.15, "wiener_noise": 0.01, "convergence": 1e-7, "iterations": [150, 150, 150, 150],
                 "shrink_factor": 2, "control_points": 4, "histogram_bins": 200}

# the authors' settings that change the network, and the values synth7t can build
_SUPPORTED = {"use_spatial_transformer": True, "block_method": "slices", "normalization_method": "min_max"}


# ---------------------------------------------------------------------------------------------------------
# settings


def read_params(path: str | Path) -> dict:
    """The authors' settings file (a Python dict literal, tuples allowed) as a dict; one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: settings file not found")
    text = p.read_text(encoding="utf-8", errors="replace").strip()
    try:
        params = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise InputError(f"{p}: not a Python dict literal ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise InputError(f"{p}: expected a dict literal, found a {type(params).__name__}")
    return params


def published_config(params: dict, source: str | Path = "params") -> PublishedUNetConfig:
    """The network settings of an authors' settings dict; one line naming the first missing or unsupported key."""
    required = ("n_channels", "num_groups", "n_res_block", "channel_mult", "attention_res", "n_in_slices",
                "conditions", "c_dim", "n_slices")
    if missing := [k for k in required if k not in params]:
        raise InputError(f"{source}: lacks {', '.join(missing)}")
    for key, want in _SUPPORTED.items():
        if key in params and params[key] != want:
            raise InputError(f"{source}: {key} = {params[key]!r} is not supported (synth7t builds {want!r})")
    try:
        return PublishedUNetConfig(
            in_slices=params["n_in_slices"], channels=params["n_channels"], channel_mult=tuple(params["channel_mult"]),
            n_res=params["n_res_block"], attention_res=tuple(params["attention_res"]), n_groups=params["num_groups"],
            mid_attention=bool(params.get("use_mid_attention", True)), adadm=bool(params.get("use_ada", False)),
            initial_down=bool(params.get("use_initial_down", False)), dropout=0.0,
            context_dim=params["c_dim"], conditions=tuple(params["conditions"]),
            n_slices_position=params["n_slices"])
    except (ValueError, TypeError) as exc:
        errors = exc.errors() if hasattr(exc, "errors") else []  # pydantic: the first error, its field and message
        what = (f"{'.'.join(map(str, errors[0]['loc'])) or 'settings'}: {errors[0]['msg']}" if errors
                else str(exc).splitlines()[0])
        raise InputError(f"{source}: {what.replace('Value error, ', '')}") from None


# ---------------------------------------------------------------------------------------------------------
# weights


def _res_keys(ours: str, theirs: str, cin: int, cout: int, adadm: bool) -> dict[str, str]:
    keys = {f"{ours}.norm1.weight": f"{theirs}.in_layers.0.weight", f"{ours}.norm1.bias": f"{theirs}.in_layers.0.bias",
            f"{ours}.conv1.weight": f"{theirs}.in_layers.2.weight", f"{ours}.conv1.bias": f"{theirs}.in_layers.2.bias",
            f"{ours}.norm2.weight": f"{theirs}.out_layers.0.weight",
            f"{ours}.norm2.bias": f"{theirs}.out_layers.0.bias",
            f"{ours}.conv2.weight": f"{theirs}.out_layers.3.weight",
            f"{ours}.conv2.bias": f"{theirs}.out_layers.3.bias"}
    if adadm:
        keys |= {f"{ours}.adadm.weight": f"{theirs}.phi.weight", f"{ours}.adadm.bias": f"{theirs}.phi.bias"}
    if cin != cout:
        keys |= {f"{ours}.skip.weight": f"{theirs}.skip_connection.weight",
                 f"{ours}.skip.bias": f"{theirs}.skip_connection.bias"}
    return keys


def _attn_keys(ours: str, theirs: str) -> dict[str, str]:
    tb = f"{theirs}.transformer_blocks.0"
    keys = {}
    for o, t in (("norm", "norm"), ("proj_in", "proj_in"), ("proj_out", "proj_out")):
        keys |= {f"{ours}.{o}.weight": f"{theirs}.{t}.weight", f"{ours}.{o}.bias": f"{theirs}.{t}.bias"}
    for o, t in (("ln1", "norm1"), ("ln2", "norm2"), ("ln3", "norm3"), ("ff_in", "ff.net.0.proj"),
                 ("ff_out", "ff.net.2")):
        keys |= {f"{ours}.{o}.weight": f"{tb}.{t}.weight", f"{ours}.{o}.bias": f"{tb}.{t}.bias"}
    for o, t in (("attn_self", "attn1"), ("attn_context", "attn2")):
        keys |= {f"{ours}.{o}.q.weight": f"{tb}.{t}.to_q.weight", f"{ours}.{o}.k.weight": f"{tb}.{t}.to_k.weight",
                 f"{ours}.{o}.v.weight": f"{tb}.{t}.to_v.weight", f"{ours}.{o}.out.weight": f"{tb}.{t}.to_out.0.weight",
                 f"{ours}.{o}.out.bias": f"{tb}.{t}.to_out.0.bias"}
    return keys


def authors_keys(cfg: PublishedUNetConfig) -> tuple[dict[str, str], dict[str, str]]:
    """``({our parameter: the authors' key}, {our residual block: its authors' prefix})`` for a configuration.

    The authors' module tree: ``input_blocks.0.0`` (stem conv, or ``.0.op`` with ``use_initial_down``), then one
    ``input_blocks.i`` per residual block (``.0``; ``.1`` its transformer) or down-sampling (``.0.op``);
    ``middle_block.0/1/2``; one ``output_blocks.i`` per up residual block (``.0``, ``.1`` transformer, last
    ``.conv`` the upsampling); ``final_up.conv``; ``out.1``. A residual block: ``in_layers.0`` GroupNorm,
    ``in_layers.2`` conv, ``emb_layers.1`` the time projection, ``out_layers.0`` GroupNorm, ``out_layers.3`` conv,
    ``phi`` AdaDM, ``skip_connection``. A transformer: ``norm``, ``proj_in``, ``transformer_blocks.0``
    (``attn1``/``attn2`` with ``to_q``, ``to_k``, ``to_v``, ``to_out.0``; ``ff.net.0.proj``, ``ff.net.2``;
    ``norm1..3``), ``proj_out``.
    """
    from synth7t.nn.published import PublishedResBlock, PublishedTransformer, PublishedUNet

    with torch.device("meta"):  # the structure only, no memory
        net = PublishedUNet(cfg)
    keys: dict[str, str] = {}
    blocks: dict[str, str] = {}
    stem = "input_blocks.0.0.op" if cfg.initial_down else "input_blocks.0.0"
    keys |= {"stem.weight": f"{stem}.weight", "stem.bias": f"{stem}.bias"}

    def entry(ours: str, theirs: str, layers) -> None:
        for j, layer in enumerate(layers):
            if isinstance(layer, PublishedResBlock):
                keys.update(_res_keys(f"{ours}.{j}", f"{theirs}.{j}", layer.norm1.num_channels,
                                      layer.conv1.out_channels, layer.adadm is not None))
                blocks[f"{ours}.{j}"] = f"{theirs}.{j}"
            elif isinstance(layer, PublishedTransformer):
                keys.update(_attn_keys(f"{ours}.{j}", f"{theirs}.{j}"))
            else:  # the up-sampling convolution
                keys.update({f"{ours}.{j}.weight": f"{theirs}.{j}.conv.weight",
                             f"{ours}.{j}.bias": f"{theirs}.{j}.conv.bias"})

    for i, block in enumerate(net.down):
        if isinstance(block, torch.nn.Conv2d):
            keys |= {f"down.{i}.weight": f"input_blocks.{i + 1}.0.op.weight",
                     f"down.{i}.bias": f"input_blocks.{i + 1}.0.op.bias"}
        else:
            entry(f"down.{i}", f"input_blocks.{i + 1}", block)
    mid = [("mid1", net.mid1), *([("mid_attn", net.mid_attn)] if net.mid_attn is not None else []), ("mid2", net.mid2)]
    for j, (name, layer) in enumerate(mid):
        if isinstance(layer, PublishedResBlock):
            keys.update(_res_keys(name, f"middle_block.{j}", layer.norm1.num_channels, layer.conv1.out_channels,
                                  cfg.adadm))
            blocks[name] = f"middle_block.{j}"
        else:
            keys.update(_attn_keys(name, f"middle_block.{j}"))
    for i, block in enumerate(net.up):
        entry(f"up.{i}", f"output_blocks.{i}", block)
    if cfg.initial_down:
        keys |= {"final_up.weight": "final_up.conv.weight", "final_up.bias": "final_up.conv.bias"}
    keys |= {"head.weight": "out.1.weight", "head.bias": "out.1.bias"}
    return keys, blocks


def time_embedding(state: dict[str, torch.Tensor], channels: int, t: float = 1.0) -> torch.Tensor:
    """The authors' time embedding of ``timesteps = t`` (float64): ``time_embed`` (Linear -> SiLU -> Linear)
    of the sinusoidal code ``[cos(t f_i), sin(t f_i)]``, ``f_i = exp(-ln(10000) i / (C/2))``, i < C/2 (a zero
    appended for odd C)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    code = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
    if channels % 2:
        code = torch.cat([code, torch.zeros(1, dtype=torch.float64)])
    w0, b0 = state["time_embed.0.weight"].double(), state["time_embed.0.bias"].double()
    w2, b2 = state["time_embed.2.weight"].double(), state["time_embed.2.bias"].double()
    return torch.nn.functional.silu(code @ w0.T + b0) @ w2.T + b2


def fold_time_embedding(state: dict[str, torch.Tensor], blocks: dict[str, str], channels: int
                        ) -> dict[str, torch.Tensor]:
    """``{our conv1.bias: the authors' in_layers.2.bias + emb_layers.1(SiLU(emb))}`` for every residual block."""
    emb = torch.nn.functional.silu(time_embedding(state, channels))
    out = {}
    for ours, theirs in blocks.items():
        w, b = state[f"{theirs}.emb_layers.1.weight"].double(), state[f"{theirs}.emb_layers.1.bias"].double()
        bias = state[f"{theirs}.in_layers.2.bias"].double()
        const = emb @ w.T + b
        if const.shape != bias.shape:
            raise InputError(f"{theirs}.emb_layers.1 gives {tuple(const.shape)} values for {tuple(bias.shape)} "
                             "channels (scale-shift norm is not supported)")
        out[f"{ours}.conv1.bias"] = (bias + const).to(state[f"{theirs}.in_layers.2.bias"].dtype)
    return out


def convert_state(state: dict[str, torch.Tensor], cfg: PublishedUNetConfig, source: str | Path = "checkpoint"
                  ) -> dict[str, torch.Tensor]:
    """The authors' state dict (``module.`` removed) -> :class:`PublishedUNet`'s, float32, with the time embedding
    folded. One line naming the first missing, unexpected or mis-shaped tensor."""
    from synth7t.nn.published import PublishedUNet

    keys, blocks = authors_keys(cfg)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in PublishedUNet(cfg).state_dict().items()}
    time_keys = {"time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias"}
    time_keys |= {f"{t}.emb_layers.1.{p}" for t in blocks.values() for p in ("weight", "bias")}
    for k in [*time_keys, *keys.values()]:
        if k not in state:
            raise InputError(f"{source}: the settings imply a tensor {k} that the checkpoint lacks "
                             f"(n_channels {cfg.channels}, channel_mult {cfg.channel_mult}, n_res_block {cfg.n_res}, "
                             f"attention_res {list(cfg.attention_res)})")
    if extra := sorted(set(state) - time_keys - set(keys.values())):
        raise InputError(f"{source}: the checkpoint holds {extra[0]}, which the settings do not imply "
                         f"({len(extra)} such tensors)")
    for ours, theirs in keys.items():
        if tuple(state[theirs].shape) != shapes[ours]:
            raise InputError(f"{source}: {theirs} has shape {tuple(state[theirs].shape)}, the settings imply "
                             f"{shapes[ours]}")
    emb_dim = state["time_embed.0.weight"].shape
    if tuple(emb_dim) != (4 * cfg.channels, cfg.channels):
        raise InputError(f"{source}: time_embed.0.weight has shape {tuple(emb_dim)}, the settings imply "
                         f"{(4 * cfg.channels, cfg.channels)}")
    out = {ours: state[theirs].float().contiguous() for ours, theirs in keys.items()}
    out.update({k: v.float() for k, v in fold_time_embedding(state, blocks, cfg.channels).items()})
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{source}: tensor {keys.get(bad[0], bad[0])} holds NaN or infinite values")
    return out


# ---------------------------------------------------------------------------------------------------------
# the model folder


def _template_record(template_7t: Path, slice_dim: int, cfg: PublishedUNetConfig, params: dict) -> dict:
    from synth7t.io import load_volume

    vol = load_volume(template_7t)
    shape = vol.shape
    if slice_dim not in (0, 1, 2):
        raise InputError(f"--slice-dim {slice_dim}: expected 0, 1 or 2")
    in_plane = tuple(s for i, s in enumerate(shape) if i != slice_dim)
    want = tuple(params.get("slice_size") or in_plane)
    if in_plane != want:
        raise InputError(f"{template_7t}: its grid {shape} sliced along axis {slice_dim} gives {in_plane} slices, "
                         f"but the model was trained on {want} (params slice_size); check --slice-dim")
    if shape[slice_dim] < cfg.in_slices:
        raise InputError(f"{template_7t}: {shape[slice_dim]} slices along axis {slice_dim}, fewer than a window")
    zooms = [round(float(z), 4) for z in vol.zooms]
    return {"name": TEMPLATE_SPACE, "file": TEMPLATE_FILES["template_7t"], "shape": list(shape),
            "affine": vol.affine.tolist(), "slice_dim": slice_dim, "voxel_size_mm": zooms}


def import_thesis(checkpoint: str | Path, params: str | Path, template_7t: str | Path, out: str | Path, *,
                  template_3t: str | Path | None = None, template_affine: str | Path | None = None,
                  slice_dim: int | None = None) -> Path:
    """Import an authors' checkpoint into the model folder ``out`` (module docstring); returns ``out``.

    ``template_3t`` and ``template_affine`` go together: prediction then registers a scan rigidly to the 3T
    template and maps it through the affine onto the 7T template grid, as the authors did; without them it
    registers the scan (rigid + affine) straight to the 7T template. ``slice_dim``: the template axis the model
    slices along (default: the settings' ``slice_dim``, else 1).
    """
    from synth7t.model_folder import save_model_folder, sha256_file
    from synth7t.preprocess.register import read_itk_affine
    from synth7t.torchfile import read_state_dict

    checkpoint, params_path, template_7t = Path(checkpoint), Path(params), Path(template_7t)
    if (template_3t is None) != (template_affine is None):
        raise InputError("--template-3t and --template-affine go together (give both, or neither)")
    settings = read_params(params_path)
    cfg = published_config(settings, params_path)
    slice_dim = int(settings.get("slice_dim", 1) if slice_dim is None else slice_dim)
    template = _template_record(template_7t, slice_dim, cfg, settings)
    extra = {TEMPLATE_FILES["template_7t"]: template_7t}
    if template_3t is not None:
        from synth7t.io import load_volume

        load_volume(template_3t)  # a readable 3-D scan, or one line now rather than at prediction
        read_itk_affine(template_affine)
        extra |= {TEMPLATE_FILES["template_3t"]: Path(template_3t),
                  TEMPLATE_FILES["template_affine"]: Path(template_affine)}
        template |= {"template_3t": TEMPLATE_FILES["template_3t"], "affine_file": TEMPLATE_FILES["template_affine"]}
    else:
        template |= {"template_3t": None, "affine_file": None}
    log.info("reading %s (its pickled objects are skipped, not run)", checkpoint)
    state, ckpt = read_state_dict(checkpoint)
    if ckpt.skipped:
        log.info("skipped objects in the checkpoint: %s", ", ".join(sorted(ckpt.skipped)[:6]))
    weights = convert_state(state, cfg, checkpoint)
    del state
    digest = sha256_file(checkpoint)
    known = PUBLISHED_CHECKPOINTS.get(digest)
    source = {"file": checkpoint.name, "sha256": digest, "bytes": checkpoint.stat().st_size,
              "published": None if known is None else {"name": known[0], "what": known[2]},
              "repository": SOURCE_REPOSITORY, "licence": LICENCE, "citation": CITATION,
              "params_file": params_path.name, "params": {k: _jsonable(v) for k, v in settings.items()},
              "epoch": ckpt.root.get("epoch") if isinstance(ckpt.root, dict) and
              isinstance(ckpt.root.get("epoch"), int) else None}
    config = published_model_config(cfg, template, source)
    card = published_model_card(config)
    metrics = {"imported": True, "source_sha256": digest}
    out = Path(out)
    save_model_folder(out, weights, config, metrics, card, extra_files=extra)
    log.info("imported %s (%s parameters) -> %s", checkpoint.name, f"{config['parameters']:,}", out)
    return out


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v if isinstance(v, (str, int, float, bool)) or v is None else repr(v)


def published_model_config(cfg: PublishedUNetConfig, template: dict, source: dict) -> dict:
    """``config.json`` of an imported model: what prediction needs, and where it came from."""
    from synth7t.nn.published import PublishedUNet

    with torch.device("meta"):
        n_params = PublishedUNet(cfg).count_parameters()
    return {
        "format": "synth7t-model",
        "synth7t_version": __version__,
        "preset": "thesis_published",
        "architecture": "the thesis authors' published 2.5D attention U-net (AdaDM, covariate cross-attention)",
        "model": cfg.model_dump(mode="json"),
        "n_slices": cfg.in_slices,
        "multiple": cfg.downsample_factor,
        **template_entries(cfg.model_dump(mode="json"), template),
        "normalization": {"method": "published", "lower_pct": 1.0, "upper_pct": 99.0, "clipped": False,
                          "of": "the voxels > 0 of the 3T brain on the template grid: (x - p1) / (p99 - p1)"},
        "preprocessing": {"skullstrip": "deepbet", "n4_3t": dict(AUTHORS_N4_3T), "registration": "template"},
        "training_data": {"source": "BioFINDER-2 3T/7T pairs (the authors' training; not in this folder)",
                          "n_train": source["params"].get("train_size"), "n_test": source["params"].get("test_size"),
                          "simulated": False},
        "parameters": int(n_params),
        "source": source,
        "init_from": None,
    }


def template_entries(model: dict, template: dict) -> dict:
    """The ``config.json`` entries every model on a template grid has, imported or fine-tuned: its template, slice
    axis and voxel size, no input standardization, the 7T output units, the covariate tokens and those required."""
    return {
        "template": template,
        "slice_axis": f"axis {template['slice_dim']} of the template's voxel order (no reorientation)",
        "voxel_size_mm": template["voxel_size_mm"],
        "input_standardization": {"method": "none"},
        "output_contrast": "7T, in the units of the normalized 7T targets (0 and 1 = the 7T brain's 1st and 99th "
                           "percentiles)",
        "context": {"tokens": list(model["conditions"]), "dim": model["context_dim"],
                    "position": f"2 (j - mid) / {model['n_slices_position']}", "sex": "1 = F, 0 = M",
                    "diagnostic": "1 = cognitively normal or SCD, 0 = otherwise"},
        "requires_covariates": required_covariates(model["conditions"]),
    }


def required_covariates(conditions) -> list[str]:
    """The covariates (synth7t names) a published model's ``conditions`` need at prediction."""
    names = {"Age": "age", "Sex": "sex", "Diagnostic": "diagnosis"}
    return [names[c] for c in conditions if c in names]


#: Where synth7t's prediction of an imported model differs from the authors' scripts, and why (model card).
DIFFERENCES = (
    ("Skull stripping", "deepbet (offline, bundled network), or SynthStrip with --skullstrip synthstrip when FreeSurfer"
     " is on PATH; the authors used SynthStrip before and after N4."),
    ("3T N4", "SimpleITK's N4 with the authors' iteration counts (150 x 4), tolerance 1e-7 and shrink factor 2 on the "
     "whole head before skull stripping, 4 control points; the authors ran ANTs' N4 (B-spline mesh of 200 mm) on the "
     "stripped brain with an Otsu mask."),
    ("Registration", "rigid (ANTs, mutual information) to the 3T template composed with the template affine into one "
     "resampling onto the 7T template grid (the authors resampled twice); without --template-3t, a rigid + affine "
     "registration straight to the 7T template."),
    ("Which slice a window predicts", "slices j, j+1, j+2 predict slice j, as in the authors' training data "
     "(their inference script writes the output to slice j+1); the last two slices along the slice axis get no "
     "prediction."),
    ("Position covariate", "2 (j - mid) / n_slices with n_slices from the settings (244) and mid the centre of the "
     "non-zero extent along the slice axis on the template grid, as in training (their inference script divides "
     "by its own grid size and mixes cropped and uncropped indices)."),
    ("Output", "the network's output, not clamped (training targets reached 1.5), masked to the registered brain; "
     "written on the template grid and, through the inverse transform, on the model's voxel grid over the input "
     "scan."),
    ("Test-time augmentation", "--tta averages the prediction of the scan and of its left-right mirror (flipped "
     "along the template axis closest to left-right); the authors had none."),
    ("Device", "CPU or CUDA, chosen at run time; bf16 autocast on GPUs that support it and on CPUs with native bf16 "
     "where a matmul probe finds it faster than fp32 (the authors ran fp32 on CUDA)."),
)


def published_model_card(config: dict) -> str:
    """The model card of an imported model: what it is, where it came from, licence, citation, differences."""
    src, m, t = config["source"], config["model"], config["template"]
    known = src["published"]
    ident = (f"This is the published file `{known['name']}` ({known['what']}): its sha256 matches the Git LFS "
             "object of the authors' repository." if known else
             "This file is NOT one of the published checkpoints (its sha256 matches neither "
             f"`{'`, `'.join(v[0] for v in PUBLISHED_CHECKPOINTS.values())}`).")
    diffs = "\n".join(f"- **{k}**: {v}" for k, v in DIFFERENCES)
    tokens = ", ".join(config["context"]["tokens"])
    return (
        f"# synth7t model (thesis_published): {src['file']}\n\n"
        f"Imported by synth7t {config['synth7t_version']} from `{src['file']}` "
        f"(sha256 `{src['sha256']}`, {src['bytes']:,} bytes) with the settings `{src['params_file']}`. {ident}\n\n"
        f"- Source: {src['repository']} (the thesis authors' repository); synth7t does not redistribute the weights.\n"
        f"- Licence of the weights and templates: {src['licence']}.\n"
        f"- Cite: {src['citation']}.\n"
        f"- Training data: {config['training_data']['source']}, {config['training_data']['n_train']} training "
        f"subjects.\n\n"
        "## The network\n"
        f"The authors' LDM-style U-net at timesteps = 1: {m['channels']} base channels, multipliers "
        f"{tuple(m['channel_mult'])}, {m['n_res']} residual blocks per level (AdaDM: {m['adadm']}), transformer "
        f"blocks (self-attention, cross-attention to {len(config['context']['tokens'])} covariate tokens of "
        f"dimension {m['context_dim']}: {tokens}; GEGLU feed-forward; {m['n_heads']} head) at down-sampling factors "
        f"{tuple(m['attention_res'])} and in the middle ({m['mid_attention']}), GroupNorm of {m['n_groups']} groups "
        "(eps 1e-6), stride-2 convolutions down, nearest x2 + convolution up, a SiLU -> conv3x3 head with no norm, "
        f"no residual and no clamp; {config['parameters']:,} parameters after folding the constant time embedding "
        "into the residual blocks' first biases.\n\n"
        "## Input\n"
        f"A 3T T1w scan, N4-corrected and skull-stripped, registered onto the 7T template grid {tuple(t['shape'])} "
        f"({t['voxel_size_mm']} mm), normalized as in training: (x - p1) / (p99 - p1) with the 1st and 99th "
        f"percentiles of the voxels > 0, not clipped; {m['in_slices']} neighbouring slices along axis "
        f"{t['slice_dim']} of the template's voxel order, padded with zeros in-plane to multiples of "
        f"{config['multiple']}. Covariates: {tokens} (age in years; sex 1 = F; position "
        f"{config['context']['position']}). Age and sex are required.\n\n"
        "## Differences from the authors' pipeline\n"
        f"{diffs}\n\n"
        "## Intended use\nResearch on brain MRI. Outputs are estimates learnt from paired BioFINDER-2 data; they can "
        "miss or invent detail for anatomy, scanners or protocols unlike that cohort.\n\n"
        "**Not a clinical device. Not for diagnosis or treatment decisions.**\n"
    )


# ---------------------------------------------------------------------------------------------------------
# a fine-tuning start: a store on the model's grid


def pack_like(work: str | Path, out: str | Path, model_dir: str | Path, *, split=(0.7, 0.15, 0.15), seed: int = 0,
              overwrite: bool = False, progress: bool = True) -> Path:
    """``synth7t pack WORK --like MODEL_DIR``: pack a work folder's pairs onto the grid of a model that works on a
    template (:mod:`synth7t.dataset.template_store`: its template, slice axis, normalization and covariate tokens),
    so that ``synth7t train STORE --init MODEL_DIR`` fine-tunes it. Returns ``out/store.json``."""
    from synth7t.dataset.template_store import pack_on_template
    from synth7t.model_folder import verify_model_folder

    d = Path(model_dir)
    cfg = verify_model_folder(d)
    if cfg["model"].get("kind") != "thesis_published" or "template" not in cfg:
        raise InputError(f"{d}: --like needs a model that works on a template grid (one imported by "
                         "`synth7t import-thesis`, or fine-tuned from one); this one works on each scan's own grid")
    template = dict(cfg["template"])
    for key in ("file", "template_3t", "affine_file"):
        if template.get(key):
            template[key] = str(d / template[key])
    norm = cfg.get("normalization", {})
    model = {**cfg["model"], "lower_pct": norm.get("lower_pct", 1.0), "upper_pct": norm.get("upper_pct", 99.0)}
    return pack_on_template(work, out, template, model, split=split, seed=seed, overwrite=overwrite,
                            progress=progress)
