"""The model folder: the self-describing directory a training run writes and prediction reads.

A model folder holds ``model.safetensors`` (the generator's weights; no pickles), ``config.json`` (what
inference needs: architecture, slices, grid, normalization, context, preprocessing recipe), ``metrics.json``,
``model_card.md`` and ``checksums.sha256`` (sha256 of each of those files). This module writes one
(:func:`save_model_folder`), checks one (:func:`verify_model_folder`) and rebuilds the generator from one
(:func:`load_generator`: the 2.5D U-net, or the 3-D patch U-net when ``config.json["model"]["kind"]`` is
``unet3d``). It imports neither Lightning nor :mod:`synth7t.training`, so prediction does not
either; what goes *into* ``config.json`` and the card is decided by :mod:`synth7t.training.card`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from synth7t import __version__
from synth7t.errors import InputError
from synth7t.io import atomic_path, read_json, write_json, write_text

log = logging.getLogger(__name__)

MODEL_FILES = ("model.safetensors", "config.json")
FUSION_FILE = "fusion.safetensors"  # a learned fusion of the views (``synth7t train-fusion``)


def weight_files(cfg: dict) -> list[str]:
    """The weights files a model folder's ``config.json`` names: ``model.safetensors``, or one per view
    (``"networks": {view: {"weights": "model_<view>.safetensors", "model": {...}}}``)."""
    nets = cfg.get("networks")
    if not nets:
        return ["model.safetensors"]
    if not isinstance(nets, dict) or not all(isinstance(n, dict) and isinstance(n.get("weights"), str)
                                             for n in nets.values()):
        raise InputError("config.json: networks must map each view to {\"weights\": file, \"model\": {...}}")
    names = [n["weights"] for n in nets.values()]
    bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
    if bad:
        raise InputError(f"config.json: networks name weights files {bad}; expected *.safetensors in the folder")
    return names


def model_digest(cfg: dict, digests: dict[str, str]) -> str:
    """What identifies a model's outputs: the sha256 of ``model.safetensors`` for one network without a learned
    fusion (as always); else the sha256 of the ``checksums.sha256`` lines of its weights files (sorted by name),
    the fusion network's included."""
    files = weight_files(cfg) + ([FUSION_FILE] if cfg.get("fusion") == "learned" else [])
    if files == ["model.safetensors"]:
        return digests["model.safetensors"]
    return hashlib.sha256("".join(f"{digests[f]}  {f}\n" for f in sorted(files)).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generator_state(module_or_ckpt: Any) -> dict[str, torch.Tensor]:
    """The generator's weights, from a module or a checkpoint file (loaded with ``weights_only=True``).

    Where training kept a moving average of the weights (``optim.ema_decay``) and it has had a step, the average
    (``ema.module.*``): the weights that were validated."""
    if isinstance(module_or_ckpt, (str, Path)):
        ckpt = torch.load(module_or_ckpt, map_location="cpu", weights_only=True)
        sd = ckpt["state_dict"]
    else:
        sd = module_or_ckpt.state_dict()
    averaged = "ema.n_averaged" in sd and int(sd["ema.n_averaged"]) > 0
    prefix = "ema.module." if averaged else "generator."
    return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in sd.items() if k.startswith(prefix)}


def save_model_folder(out: Path, state: dict[str, torch.Tensor] | None, config: dict, metrics: dict, card: str,
                      extra_files: dict[str, Path] | None = None,
                      weights: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a model folder: weights (safetensors), config.json, metrics.json, model_card.md, checksums.sha256.

    ``state``: the weights of ``model.safetensors`` (None for a folder of one network per view); ``weights``:
    further ``{file name: state}`` (``model_<view>.safetensors``, ``fusion.safetensors``). ``extra_files``:
    ``{name in the folder: source file}`` copied in (atomically) and listed in the checksums (an imported model's
    templates, say)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, src in (extra_files or {}).items():
        with atomic_path(out / name) as tmp:
            shutil.copyfile(src, tmp)
    weights = {**({"model.safetensors": state} if state is not None else {}), **(weights or {})}
    for name, sd in weights.items():
        _save_weights(out / name, sd)
    write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", config)
    write_text(out / "model_card.md", card)
    files = [*weights, "config.json", "metrics.json", "model_card.md", *(extra_files or {})]
    _write_checksums(out, files)
    log.info("model folder written: %s", out)
    return out


def _save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "synth7t", "version": __version__})


def _write_checksums(out: Path, files) -> None:
    write_text(out / "checksums.sha256", "".join(f"{sha256_file(out / f)}  {f}\n" for f in dict.fromkeys(files)))


def update_model_folder(model_dir: str | Path, config: dict, *, card: str | None = None,
                        weights: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Add to a verified model folder (a learned fusion, a default fusion): write ``weights`` (``{file: state}``),
    the new ``config.json`` (and card), each atomically, then ``checksums.sha256`` over every file it listed and
    the new ones. A process killed in between leaves a folder whose checksums say which file changed."""
    d = Path(model_dir)
    _, digests = _verify(d)
    for name, sd in (weights or {}).items():
        _save_weights(d / name, sd)
    write_json(d / "config.json", config)
    if card is not None:
        write_text(d / "model_card.md", card)
    _write_checksums(d, [*digests, *(weights or {}), "config.json"])
    log.info("model folder updated: %s", d)
    return d


def verify_model_folder(model_dir: str | Path) -> dict:
    """Check a model folder's files and checksums; return its config. One-line InputError on any problem."""
    return _verify(Path(model_dir))[0]


def _verify(d: Path) -> tuple[dict, dict[str, str]]:
    """(config, {file name: sha256 computed}) of a model folder; see :func:`verify_model_folder`."""
    if not d.is_dir():
        raise InputError(f"{d}: model folder not found")
    for name in ("config.json", "checksums.sha256"):
        if not (d / name).is_file():
            raise InputError(f"{d}: not a synth7t model folder ({name} is missing)")
    try:
        names = weight_files(read_json(d / "config.json"))
    except InputError as exc:
        raise InputError(f"{d / 'config.json'}: {str(exc).split(': ', 1)[-1]}") from None
    except Exception:  # noqa: BLE001 - an unreadable config.json: the checksums below name the file
        names = ["model.safetensors"]
    for name in names:
        if not (d / name).is_file():
            raise InputError(f"{d}: not a synth7t model folder ({name} is missing)")
    digests = {}
    for line in (d / "checksums.sha256").read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        f = d / name.strip()
        if not f.is_file():
            raise InputError(f"{d}: {name.strip()} listed in checksums.sha256 is missing")
        digests[name.strip()] = sha256_file(f)
        if digests[name.strip()] != digest:
            raise InputError(f"{f}: checksum mismatch (file changed or corrupt)")
    cfg = read_json(d / "config.json")
    if cfg.get("format") != "synth7t-model" or "model" not in cfg:
        raise InputError(f"{d / 'config.json'}: not a synth7t model config")
    unlisted = [n for n in (*names, *([FUSION_FILE] if cfg.get("fusion") == "learned" else [])) if n not in digests]
    if unlisted:
        raise InputError(f"{d}: {', '.join(unlisted)} not listed in checksums.sha256")
    return cfg, digests


def _first_error(exc: Exception) -> str:
    """The first line that names the problem: pydantic's second line (its first only counts the errors)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and "validation error" in lines[0]:
        return lines[1]
    return lines[0] if lines else type(exc).__name__


def load_generator(model_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the generator from a model folder (config.json + model.safetensors); returns (model, config).

    ``config.json["model"]["kind"]`` chooses the network: ``unet3d`` the 3-D patch U-net, absent the 2.5D U-net."""
    net, cfg, _ = load_generator_with_digest(model_dir, device)
    return net, cfg


def load_generator_with_digest(model_dir: str | Path, device: str | torch.device = "cpu"):
    """:func:`load_generator` plus the weights' sha256: (model, config, sha256 of ``model.safetensors``).

    The digest is the one computed while verifying the checksums: the file is hashed once.
    """
    d = Path(model_dir)
    cfg, digests = _verify(d)
    if cfg.get("networks"):
        raise InputError(f"{model_dir}: holds one network per view ({', '.join(cfg['networks'])}); "
                         "load_networks reads them (synth7t predict and evaluate do)")
    net = _build(model_dir, cfg["model"], d / "model.safetensors")
    digest = digests.get("model.safetensors") or sha256_file(d / "model.safetensors")
    return net.to(device).eval(), cfg, digest


def load_networks(model_dir: str | Path, device: str | torch.device = "cpu"):
    """Every network of a model folder, by view: ``({view: model}, config, digest)``.

    A single-view or shared multi-view folder gives the same network for each of its ``views`` (``["axial"]``
    when config.json does not say); a folder of one network per view (``"networks"``) one network each, built from
    its own model section and weights file. ``digest``: :func:`model_digest`."""
    d = Path(model_dir)
    cfg, digests = _verify(d)
    if not cfg.get("networks"):
        net = _build(model_dir, cfg["model"], d / "model.safetensors").to(device).eval()
        return {v: net for v in cfg.get("views") or ["axial"]}, cfg, model_digest(cfg, digests)
    nets = {view: _build(model_dir, n.get("model", cfg["model"]), d / n["weights"]).to(device).eval()
            for view, n in cfg["networks"].items()}
    return nets, cfg, model_digest(cfg, digests)


def _build(model_dir, model_section: dict, weights: Path):
    """A network from a model section and its weights file; one-line InputError when either is unusable."""
    from safetensors.torch import load_file

    from synth7t.nn import build_generator

    try:
        net = build_generator(model_section)  # dispatches on model_section["kind"]
    except Exception as exc:  # an unknown kind or invalid settings: say what config.json holds, not "weights"
        from synth7t.nn.config import GENERATOR_KINDS, generator_kind

        kind = generator_kind(model_section) if isinstance(model_section, dict) else None
        if kind not in GENERATOR_KINDS:
            raise InputError(f"{model_dir}: config.json model.kind {kind!r} is not a network this version knows "
                             f"({', '.join(GENERATOR_KINDS)}); a newer synth7t may have written it") from None
        raise InputError(f"{model_dir}: config.json has an invalid model section ({_first_error(exc)})") from None
    try:
        net.load_state_dict(load_file(str(weights), device="cpu"))
    except Exception as exc:  # a config/weights mismatch is a broken model folder, not a bug
        raise InputError(f"{model_dir}: weights do not match config.json ({weights.name}: "
                         f"{str(exc).splitlines()[0]})") from None
    return net
