"""Fusing a multi-view model's per-view volumes into one prediction (``data.views``, :mod:`synth7t.dataset.views`).

:func:`fuse` takes the views' predictions of one stack, ``(V, Z, H, W)`` on the model grid, and returns one
``(Z, H, W)`` volume:

* ``mean``: the voxel-wise mean (a model folder's default);
* ``median``: the voxel-wise median (with two views the mean);
* ``learned``: the model folder's fusion network (``fusion.safetensors``, :class:`synth7t.nn.fusion.FusionNet`,
  written by ``synth7t train-fusion``, :mod:`synth7t.inference.fusion_fit`), applied in slabs of
  :data:`SLAB` axial slices with the network's halo of overlap, so memory stays that of a slab whatever the
  brain's size and the result is the same as on the whole volume at once.

One view is returned as it is, whatever the method.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from synth7t.errors import ConfigError, InputError
from synth7t.model_folder import FUSION_FILE

FUSIONS = ("mean", "median", "learned")
SLAB = 32  # axial slices per forward pass of the learned fusion


def check_fusion(method: str) -> str:
    if method not in FUSIONS:
        raise ConfigError(f"fusion {method!r}: expected one of {', '.join(FUSIONS)}")
    return method


def load_fusion(model_dir: str | Path, config: dict, device: torch.device | str = "cpu"):
    """The model folder's learned fusion network, or None when it has none (``fusion_network`` in config.json; the
    folder's checksums were verified by :func:`synth7t.model_folder.load_networks`)."""
    from safetensors.torch import load_file

    from synth7t.nn.fusion import FusionConfig, FusionNet

    record = config.get("fusion_network")
    if not record:
        return None
    path = Path(model_dir) / FUSION_FILE
    try:
        net = FusionNet(FusionConfig.model_validate(record["settings"]))
        net.load_state_dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # noqa: BLE001 - a broken record or file: one line naming it
        raise InputError(f"{path}: unusable learned fusion ({str(exc).splitlines()[0]})") from None
    return net.to(device).eval()


def fuse(preds: np.ndarray, method: str = "mean", net: torch.nn.Module | None = None,
         device: torch.device | str = "cpu") -> np.ndarray:
    """(V, Z, H, W) per-view predictions -> the fused (Z, H, W) float32 volume (module docstring)."""
    check_fusion(method)
    preds = np.asarray(preds, np.float32)
    if preds.shape[0] == 1 and (method != "learned" or net is None):  # one view: nothing to fuse (without a
        return preds[0]  # learned 3-D refinement of it, train_fusion(..., single_view=True))
    if method == "mean":
        return preds.mean(0)
    if method == "median":
        return np.median(preds, 0).astype(np.float32)
    if net is None:
        raise ConfigError("fusion learned: this model folder has no learned fusion; run `synth7t train-fusion "
                          "MODEL STORE` first, or use --fusion mean or median")
    return apply_fusion(net, preds, device)


@torch.inference_mode()
def apply_fusion(net: torch.nn.Module, preds: np.ndarray, device: torch.device | str = "cpu",
                 slab: int = SLAB) -> np.ndarray:
    """The fusion network over a (V, Z, H, W) array, ``slab`` axial slices at a time with ``net.cfg.halo`` slices
    of overlap on each side (exactly the whole-volume result: the halo covers the receptive field), clipped to
    [0, 1]."""
    if preds.shape[0] != net.cfg.n_views:
        raise InputError(f"the learned fusion takes {net.cfg.n_views} views, the model gave {preds.shape[0]}")
    z = preds.shape[1]
    halo = net.cfg.halo
    out = np.empty(preds.shape[1:], np.float32)
    dtype = next(net.parameters()).dtype
    for z0 in range(0, z, slab):
        z1 = min(z, z0 + slab)
        a, b = max(0, z0 - halo), min(z, z1 + halo)
        x = torch.from_numpy(np.ascontiguousarray(preds[:, a:b], np.float32))[None].to(device, dtype)
        y = net(x)[0, 0].float().clamp(0, 1).cpu().numpy()  # (b - a, H, W)
        out[z0:z1] = y[z0 - a:z1 - a]
    return out
