"""``synth7t train-fusion MODEL STORE``: learn how to fuse a multi-view model's views, and add it to the model folder.

As the thesis authors did after the thesis (their ``fusion_CNN_unet_1.py`` on the per-view U-nets' outputs), the
fusion network (:class:`synth7t.nn.fusion.FusionNet`: the views' mean plus a small residual 3-D CNN) is trained on
the per-view predictions of the store's *validation* split: the training split's predictions are overfit, so a
fusion learnt on them would learn to trust the views as much as they fit their own training data.

1. Every validation subject's 3T stack is predicted along each view (:meth:`Predictor.predict_views`, exactly as
   ``predict`` does, standardization included) and the views are written, float16, to a temporary folder; they are
   then read back through memory maps, so RAM holds one subject's views at a time, never the split's.
2. The network is trained for ``steps`` Adam steps on random cubes (``cube`` voxels a side, at most the volume's)
   centred on brain voxels, with an L1 loss inside the brain mask against the real 7T (the store's, in the same
   clipped min-max units as the predictions).
3. ``fusion.safetensors`` is written into the model folder, ``config.json`` gets ``"fusion": "learned"`` and
   ``"fusion_network"`` (its settings, the split it saw, its steps, and the brain L1 of the mean fusion and of the
   learned one on those subjects, in-sample), the card a line, and ``checksums.sha256`` is rewritten
   (:func:`synth7t.model_folder.update_model_folder`).

:func:`set_fusion` changes only a model folder's default fusion (``mean``, ``median`` or ``learned``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from synth7t.errors import ConfigError, InputError
from synth7t.inference.fusion import check_fusion
from synth7t.model_folder import FUSION_FILE, update_model_folder, verify_model_folder

log = logging.getLogger(__name__)


def set_fusion(model_dir: str | Path, method: str) -> Path:
    """Make ``method`` the model folder's default fusion (``config.json`` ``fusion``; checksums rewritten)."""
    check_fusion(method)
    cfg = verify_model_folder(model_dir)
    if len(cfg.get("views") or ["axial"]) < 2:
        raise ConfigError(f"{model_dir}: a model of one view has nothing to fuse")
    if method == "learned" and not cfg.get("fusion_network"):
        raise ConfigError(f"{model_dir}: no learned fusion yet; run `synth7t train-fusion {model_dir} STORE`")
    return update_model_folder(model_dir, {**cfg, "fusion": method},
                               card=_card_with_fusion(model_dir, f"{method} (set by set_fusion)."))


def train_fusion(model_dir: str | Path, store: str | Path, *, split: str = "val", steps: int = 300, cube: int = 32,
                 batch_size: int = 4, lr: float = 1e-3, channels: int = 16, layers: int = 3, seed: int = 0,
                 device: str = "auto", progress: bool = True, single_view: bool = False) -> Path:
    """Train the learned fusion of ``model_dir`` on the ``split`` subjects of ``store`` (module docstring); returns
    the model folder, now with ``fusion.safetensors`` and ``"fusion": "learned"``.

    ``single_view``: accept a model of one view; the network is then a learned 3-D refinement of that view's
    prediction (the same residual 3-D CNN on one input), trained and applied the same way. It is the control
    that separates what the fusion's 3-D convolutions, trained on the validation split, add from what the
    views add (``benchmarks/variants.py``: ``tiny_learned``)."""
    from synth7t.dataset.slices import SliceStore
    from synth7t.inference.predictor import Predictor
    from synth7t.nn.fusion import FusionConfig, FusionNet

    if steps < 1 or cube < 4 or batch_size < 1:
        raise ConfigError(f"train-fusion: steps {steps}, cube {cube}, batch size {batch_size}: expected >= 1, >= 4, "
                          ">= 1")
    st = SliceStore(store)
    predictor = Predictor(model_dir, device)
    if len(predictor.views) < 2 and not single_view:
        raise ConfigError(f"{model_dir}: a model of one view ({predictor.views[0]}) has nothing to fuse; train one "
                          "with data.views, or use --single-view for a learned 3-D refinement of its one view")
    subjects = [s for s in st.split_subjects(split) if st.info(s).get("has_t7")]
    if not subjects:
        raise InputError(f"{st.root}: split {split!r} has no subject with a 7T to learn the fusion from")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = FusionNet(FusionConfig(n_views=len(predictor.views), channels=channels, layers=layers)).to(predictor.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="synth7t-fusion-") as tmp:
        cache = _cache_views(predictor, st, subjects, Path(tmp), progress)
        before = _brain_l1(net, st, cache, predictor.device, mean_only=True)
        _fit(net, st, cache, rng, steps=steps, cube=cube, batch_size=batch_size, lr=lr, device=predictor.device,
             progress=progress)
        after = _brain_l1(net, st, cache, predictor.device)
    seconds = time.perf_counter() - t0
    log.info("learned fusion: brain L1 %.5f (mean of the views) -> %.5f on the %d %s subjects, %.0f s",
             before, after, len(subjects), split, seconds)
    cfg = verify_model_folder(model_dir)
    record = {"settings": net.cfg.model_dump(mode="json"), "views": predictor.views,
              "trained_on": {"store": Path(st.root).resolve().name, "split": split, "subjects": len(subjects),
                             "steps": steps, "cube": cube, "batch_size": batch_size, "lr": lr, "seed": seed,
                             "seconds": round(seconds, 1)},
              "brain_l1_in_sample": {"mean": round(before, 6), "learned": round(after, 6)}}
    line = (f"learned (a {layers}-layer 3-D CNN added to the mean of the views, trained on the per-view "
            f"predictions of {len(subjects)} {split} subjects, {steps} steps; brain L1 {before:.4f} -> {after:.4f} "
            "in-sample).")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return update_model_folder(model_dir, {**cfg, "fusion": "learned", "fusion_network": record},
                               card=_card_with_fusion(model_dir, line), weights={FUSION_FILE: state})


def _card_with_fusion(model_dir, text: str) -> str:
    """The model card with its "Fusion of the views:" sentence saying ``text`` (added if the card has none)."""
    card = (Path(model_dir) / "model_card.md").read_text(encoding="utf-8")
    if FUSION_SENTENCE in card:
        head, tail = card.split(FUSION_SENTENCE, 1)
        rest = tail.split("\n", 1)[1] if "\n" in tail else ""
        return f"{head}{FUSION_SENTENCE} {text}\n{rest}"
    return f"{card.rstrip()}\n\n{FUSION_SENTENCE} {text}\n"


FUSION_SENTENCE = "Fusion of the views:"


def _cache_views(predictor, st, subjects: list[str], tmp: Path, progress: bool) -> dict[str, np.ndarray]:
    """Each subject's per-view predictions (V, Z, H, W), written float16 to ``tmp`` and reopened as memmaps."""
    from synth7t.progress import progress_bar

    cache = {}
    for s in progress_bar(subjects, "views of the fusion's subjects", enabled=progress):
        info = st.info(s)
        stack = np.asarray(st.array(s, "t3"), np.float32)
        views = predictor.predict_views(stack, age=info.get("age"), sex=info.get("sex"), group=info.get("group"))[0]
        path = tmp / f"{len(cache)}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=views.shape)
        arr[:] = views
        arr.flush()
        del arr, views, stack
        cache[s] = np.load(path, mmap_mode="r")
    return cache


def _cube(st, cache, name: str, rng: np.random.Generator, side: tuple[int, int, int]):
    """(views (V, c, c, c), target (1, ...), mask (1, ...)) float32 of a random cube centred near a brain voxel."""
    views = cache[name]
    shape = views.shape[1:]
    z = int(rng.choice(st.valid_slices(name)))
    m = np.asarray(st.array(name, "mask")[z]) > 0
    hits = np.argwhere(m)
    y, x = hits[rng.integers(len(hits))] if len(hits) else (shape[1] // 2, shape[2] // 2)
    lo = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip((z, y, x), side, shape, strict=True)]
    sl = tuple(slice(a, a + s) for a, s in zip(lo, side, strict=True))
    out = [np.asarray(views[(slice(None), *sl)], np.float32)]
    for kind in ("t7", "mask"):
        out.append(np.asarray(st.array(name, kind)[sl], np.float32)[None])
    return out


def _fit(net, st, cache, rng, *, steps: int, cube: int, batch_size: int, lr: float, device, progress: bool) -> None:
    from synth7t.progress import progress_bar

    names = list(cache)
    side = tuple(min(cube, min(cache[n].shape[1 + a] for n in names)) for a in range(3))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in progress_bar(range(steps), "fusion steps", enabled=progress):
        parts = [_cube(st, cache, names[rng.integers(len(names))], rng, side) for _ in range(batch_size)]
        v, t, m = (torch.from_numpy(np.stack(p)).to(device) for p in zip(*parts, strict=True))
        loss = ((net(v) - t).abs() * m).sum() / m.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()


@torch.inference_mode()
def _brain_l1(net, st, cache, device, mean_only: bool = False) -> float:
    """Mean absolute error inside the brain masks of the cached subjects: of the learned fusion, or of the views'
    mean."""
    from synth7t.inference.fusion import apply_fusion

    err, n = 0.0, 0
    for name, views in cache.items():
        fused = np.asarray(views, np.float32).mean(0) if mean_only else apply_fusion(net, views, device)
        t7 = np.asarray(st.array(name, "t7"), np.float32)
        m = np.asarray(st.array(name, "mask")) > 0
        err += float(np.abs(fused - t7)[m].sum())
        n += int(m.sum())
    return err / max(n, 1)
