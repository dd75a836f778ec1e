"""What a training run writes into its model folder: ``config.json`` (:func:`model_config`) and the model card.

:func:`write_model_folder` gathers the trained generator's weights, the run's metrics, the description and the
card, and hands them to :func:`synth7t.model_folder.save_model_folder`, which owns the folder's format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synth7t import __version__
from synth7t.config import TrainConfig
from synth7t.dataset.recipe import normalization_record
from synth7t.model_folder import generator_state, save_model_folder
from synth7t.training.data import input_standardization


def write_model_folder(out: Path, module, cfg: TrainConfig, store, trainer, elapsed: float,
                       weights_from: str | None, data_notes: dict, *, init_from: dict | None = None) -> Path:
    """Write model.safetensors, config.json, metrics.json, model_card.md and checksums.sha256 into ``out``."""
    state = generator_state(weights_from) if weights_from else generator_state(module)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(epochs=int(trainer.current_epoch), steps=int(trainer.global_step), train_seconds=round(elapsed, 1),
                   precision=str(trainer.precision), weights="best" if weights_from else "final",
                   weights_average=f"EMA {cfg.optim.ema_decay:g}" if cfg.optim.ema_decay else "none")
    config = model_config(cfg, store, module)
    config["training_data"].update(data_notes)
    config["init_from"] = init_from  # None: trained from random weights; else the source model's sha256
    extra = {}
    if getattr(store, "on_template", False):  # a model on a template grid carries its template files
        config, extra = template_model_config(config, store)
    return save_model_folder(out, state, config, metrics, model_card(cfg, config, metrics), extra_files=extra)


def template_model_config(config: dict, store) -> tuple[dict, dict[str, Path]]:
    """A template store's model (a fine-tuned published thesis model): what prediction needs to run it as it was
    trained (the template record, the authors' normalization, the covariates it requires), and the template files
    to copy in from ``STORE/template/``."""
    from synth7t.thesis import TEMPLATE_FILES, template_entries

    template = dict(store.meta["template"])
    files = {}
    for key, name in (("file", "template_7t"), ("template_3t", "template_3t"), ("affine_file", "template_affine")):
        if template.get(key):
            files[TEMPLATE_FILES[name]] = Path(store.root) / "template" / template[key]
            template[key] = TEMPLATE_FILES[name]
    template.setdefault("voxel_size_mm", config["voxel_size_mm"])
    config = {**config, **template_entries(config["model"], template),
              "normalization": dict(store.meta["normalization"]), "target_matched_to_input": False,
              "preprocessing": {**store.meta.get("preprocessing", {}), "registration": "template"},
              "architecture": "the thesis authors' published 2.5D attention U-net (AdaDM, covariate "
                              "cross-attention), fine-tuned"}
    return config, files


DEFAULT_NORMALIZATION = normalization_record(1.0, 99.0)  # a store that does not say: the thesis' 1st-99th
OUTPUT_CONTRAST = {  # config.json "output_contrast", by data.match_target_to_input
    False: "7T",
    True: "the input's (standardized) 3T contrast: in training each 7T target was histogram-matched to its 3T input",
}


def model_config(cfg: TrainConfig, store, module) -> dict:
    """What inference needs, and nothing it must guess: architecture, slices, grid, normalization, context.

    ``store=None`` describes an untrained model (benchmarks): 0.65 mm grid, no training data.
    ``module`` is the LightningModule (its ``generator`` is counted) or the network itself.
    """
    meta = store.meta if store is not None else {}
    net = getattr(module, "generator", module)
    if store is None:
        data = {"untrained": True}
    else:
        data = {"store": str(Path(store.root).resolve().name), "n_train": len(store.split_subjects("train")),
                "n_val": len(store.split_subjects("val")), "n_test": len(store.split_subjects("test")),
                "simulated": bool(meta.get("simulated", False))}
    three_d = {"patch3d": cfg.data.patch3d, "covariates": "ignored"} if cfg.is_3d else {}
    return {
        "format": "synth7t-model",
        "synth7t_version": __version__,
        "preset": cfg.preset,
        "architecture": "residual U-net (3-D patches, MONAI UNet)" if cfg.is_3d else "attention residual U-net (2.5D)",
        "model": cfg.model.model_dump(mode="json"),  # "kind": "unet3d" for a 3-D model, absent for the 2.5D U-net
        **three_d,
        "n_slices": cfg.model.in_slices,
        "slice_axis": "axial (canonical RAS+ axis 2)" if cfg.data.views == ("axial",) else
                      f"{', '.join(cfg.data.views)} (synth7t.dataset.views)",
        "views": list(cfg.data.views),
        **(_views_record(cfg) if len(cfg.data.views) > 1 else {}),
        "voxel_size_mm": store_voxel_size(store) if store is not None else [0.65, 0.65, 0.65],
        "multiple": cfg.model.downsample_factor,
        "normalization": meta.get("normalization", DEFAULT_NORMALIZATION),
        "input_standardization": input_standardization(store, cfg) if store is not None else {"method": "none"},
        "target_matched_to_input": cfg.data.match_target_to_input,
        "output_contrast": OUTPUT_CONTRAST[cfg.data.match_target_to_input],
        "context": meta.get("context", {"dim": cfg.model.context_dim}),
        "preprocessing": meta.get("preprocessing", {}),
        "perceptual": cfg.loss.perceptual if store is not None and cfg.loss.perceptual_weight > 0 else "none",
        "gan": cfg.is_gan,
        "training_data": data,
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "train_config": cfg.model_dump(mode="json"),
    }


def _views_record(cfg: TrainConfig) -> dict:
    """config.json's description of a multi-view model: its design and default fusion."""
    design = ("one network for every view, told the view by a one-hot [axial, coronal, sagittal] appended to its "
              "context vector" if cfg.view_coded else "one network per view (networks)")
    return {"view_design": cfg.data.view_design, "view_networks": design, "fusion": "mean"}


def write_per_view_folder(out: Path, cfg: TrainConfig, runs: dict[str, Path]) -> Path:
    """The model folder of a ``per_view`` run from the model folders its views' runs wrote (``runs``: view ->
    folder): each view's ``model.safetensors`` copied in as ``model_<view>.safetensors``, named with its model
    section in config.json's ``networks``; metrics per view (``val/<metric>_<view>``) and summed steps and seconds."""
    from synth7t.io import read_json
    from synth7t.model_folder import verify_model_folder

    configs = {v: verify_model_folder(p) for v, p in runs.items()}
    first = configs[cfg.data.views[0]]
    runs_metrics = {v: read_json(p / "metrics.json") for v, p in runs.items()}
    networks = {v: {"weights": f"model_{v}.safetensors", "model": c["model"], "parameters": c["parameters"]}
                for v, c in configs.items()}
    config = {**first, **_views_record(cfg), "views": list(cfg.data.views), "networks": networks,
              "slice_axis": f"{', '.join(cfg.data.views)} (synth7t.dataset.views), one network each",
              "parameters": int(sum(c["parameters"] for c in configs.values())),
              "train_config": cfg.model_dump(mode="json")}
    metrics = {f"val/{k[4:]}_{v}": val for v, m in runs_metrics.items() for k, val in m.items()
               if k.startswith("val/")}
    metrics.update(steps=int(sum(m.get("steps", 0) for m in runs_metrics.values())),
                   train_seconds=round(sum(float(m.get("train_seconds", 0)) for m in runs_metrics.values()), 1),
                   epochs=" + ".join(str(m.get("epochs", "?")) for m in runs_metrics.values()),
                   precision=runs_metrics[cfg.data.views[0]].get("precision", "?"),
                   per_view={v: {k: m[k] for k in ("steps", "train_seconds", "epochs", "weights") if k in m}
                             for v, m in runs_metrics.items()})
    files = {f"model_{v}.safetensors": p / "model.safetensors" for v, p in runs.items()}
    return save_model_folder(out, None, config, metrics, model_card(cfg, config, metrics), extra_files=files)


def store_voxel_size(store) -> list[float]:
    """Voxel size (mm) of the store's training grid, from its first training subject's affine."""
    subjects = store.split_subjects("train") or store.subjects
    affine = np.asarray(store.info(subjects[0]).get("affine", np.diag([0.65, 0.65, 0.65, 1.0])), float)
    return [round(float(z), 4) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))]


def architecture_summary(m) -> str:
    """One line on the attention design of a UNetConfig (the residual units of a UNet3DConfig), for the card."""
    if m.kind == "unet3d":
        return f"{m.num_res_units} residual units per stage, {m.norm} norm, covariates ignored"
    if m.kind == "thesis_published":
        return (f"the thesis authors' published network: transformer blocks at down-sampling factors "
                f"{tuple(m.attention_res)} and in the middle, {m.n_heads} head, covariate tokens "
                f"{', '.join(m.conditions)}")
    heads = f"{m.attention_heads} head{'s' if m.attention_heads != 1 else ''}" if m.attention_heads else \
        f"heads of {m.head_dim} channels"
    if m.attention_block == "thesis":
        block = "thesis attention blocks (self-attention -> cross-attention -> feed-forward)"
    else:
        block = "light attention blocks"
    parts = [block, heads, f"{m.n_up_blocks} residual blocks per up stage"]
    if not m.self_attention:
        parts.append("no self-attention")
    if not m.covariates:
        parts.append("covariates ignored")
    if not m.out_norm:
        parts.append("no last normalization")
    return ", ".join(parts)


def model_card(cfg: TrainConfig, d: dict, metrics: dict) -> str:
    """A short human-readable card: what the model is, what it was trained on, what it is not for."""
    t = d["training_data"]
    sim = " The training data were SIMULATED (synth7t demo); this model is for trying the tool only." if t[
        "simulated"] else ""
    val = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val/")) or "no validation split"
    return (
        f"# synth7t model ({cfg.preset})\n\n"
        f"Turns 3T T1-weighted brain MRI into a synthetic 7T-like image at {d['voxel_size_mm']} mm.\n\n"
        f"- Architecture: {_architecture_name(cfg)}, channels "
        f"{cfg.model.stage_channels}, {architecture_summary(cfg.model)}, "
        f"{'WGAN-GP critic' if cfg.is_gan else 'no critic'}; {d['parameters']:,} parameters.\n"
        f"- Input standardization: {d.get('input_standardization', {}).get('method', 'none')}. Output contrast: "
        f"{d.get('output_contrast', OUTPUT_CONTRAST[False])}."
        "\n"
        f"- Loss: L1 + {cfg.loss.perceptual_weight:g} x perceptual ({d['perceptual']}).\n"
        f"- Training data: {t['n_train']} training / {t['n_val']} validation / {t['n_test']} test subjects.{sim}\n"
        f"- Training: {metrics.get('epochs', '?')} epochs, {metrics.get('steps', '?')} steps, "
        f"{metrics.get('train_seconds', '?')} s, precision {metrics.get('precision', '?')}."
        f"{_init_line(d.get('init_from'))}{_average_line(cfg)}\n"
        f"{_views_line(d)}"
        f"- Validation: {val}.\n\n"
        f"{_derived_licence(cfg)}"
        "## Intended use\nResearch on brain MRI: producing 7T-like images from 3T scans for visualisation and for\n"
        "downstream analyses whose sensitivity to synthetic data has been checked. Outputs are estimates learnt\n"
        "from paired data; they can miss or invent detail, especially for anatomy unlike the training cohort\n"
        "(lesions, other scanners, children).\n\n**Not a clinical device. Not for diagnosis or treatment decisions.**\n"
    )


def _architecture_name(cfg: TrainConfig) -> str:
    if cfg.is_3d:
        p = cfg.data.patch3d
        return f"3-D residual U-net (MONAI UNet) trained on {p}x{p}x{p} patches, predicting by sliding window"
    return f"2.5D attention residual U-net, {cfg.model.in_slices} input slices"


def _views_line(d: dict) -> str:
    """The card's line on a multi-view model: its views, design and default fusion."""
    views = d.get("views") or ["axial"]
    if len(views) < 2:
        return ""
    return (f"- Views: {', '.join(views)}; {d.get('view_networks')}. Fusion of the views: {d.get('fusion', 'mean')} "
            "(`synth7t predict --fusion` chooses another; `synth7t train-fusion` learns one).\n")


def _average_line(cfg: TrainConfig) -> str:
    if not cfg.optim.ema_decay:
        return ""
    return f" Weights: exponential moving average (decay {cfg.optim.ema_decay:g}) of the training steps."


def _init_line(init_from: dict | None) -> str:
    if not init_from:
        return ""
    return (f" Fine-tuned from the model whose model.safetensors has sha256 {init_from['sha256']}"
            f" (preset {init_from.get('preset')}).")


def _derived_licence(cfg: TrainConfig) -> str:
    """A fine-tuned published thesis model inherits its weights' licence: say so."""
    if getattr(cfg.model, "kind", "unet") != "thesis_published":
        return ""
    from synth7t.thesis import CITATION, LICENCE, SOURCE_REPOSITORY

    return (f"## Licence\nFine-tuned from the thesis authors' published weights ({SOURCE_REPOSITORY}): {LICENCE}. "
            f"Cite: {CITATION}.\n\n")
