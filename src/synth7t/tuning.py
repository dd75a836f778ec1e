"""``synth7t tune``: Optuna search over the thesis' training settings (thesis 3.4.3, "things to explore").

The study lives in ``OUT/study.db`` (SQLite): rerunning the command continues it (a trial that was running
when the process was killed is marked failed and its parameters are queued again). Each trial is a normal
run folder ``OUT/trials/trial-NNNN`` (a model folder that ``predict``/``evaluate`` accept), trained for
``budget_minutes``. Objectives are the validation brain PSNR and brain SSIM (multi-objective, NSGA-II) or one
of them (TPE with median pruning). Bad trials are pruned from their per-epoch validation PSNR: against the
median of earlier trials at the same epoch (single objective, Optuna's MedianPruner), or, for the
multi-objective search where Optuna offers no pruner, against the 25th percentile of earlier trials at the same
epoch once 3 trials are finished. The Pareto front goes to ``pareto.csv`` and ``pareto.png``, every trial to
``trials.csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from synth7t.errors import ConfigError

log = logging.getLogger(__name__)

OBJECTIVES = {"multi": ("val/psnr_brain", "val/ssim_brain"), "psnr": ("val/psnr_brain",),
              "ssim": ("val/ssim_brain",)}


def search_space(trial, base: dict[str, Any]) -> dict[str, Any]:
    """Overrides for one trial: learning rate and schedule, width, depth, groups, attention, slices, losses."""
    if (base.get("model") or {}).get("kind") == "unet3d":
        return search_space_3d(trial, base)
    base_ch = int(base["model"]["channels"])
    channels = trial.suggest_categorical("model.channels", [max(8, base_ch // 2), base_ch, base_ch * 2])
    groups = trial.suggest_categorical("model.n_groups", [4, 8])
    n_stages = len(base["model"]["channel_mult"])
    ca = trial.suggest_categorical("model.cross_attention_stages", ["none", "deepest", "two_deepest"])
    stages = {"none": [], "deepest": [n_stages], "two_deepest": [n_stages - 1, n_stages]}[ca]
    over = {
        "optim.lr": trial.suggest_float("optim.lr", 1e-4, 5e-3, log=True),
        "optim.schedule": trial.suggest_categorical("optim.schedule", ["plateau", "step", "epoch"]),
        "model.channels": channels,
        "model.n_groups": groups,
        "model.n_res": trial.suggest_int("model.n_res", 1, 3),
        "model.cross_attention_stages": stages,
        "model.in_slices": trial.suggest_categorical("model.in_slices", [3, 5]),
        "loss.perceptual_weight": trial.suggest_categorical("loss.perceptual_weight", [0.0, 1e-3, 5e-3]),
    }
    if base.get("critic"):
        over["loss.gan_weight"] = trial.suggest_float("loss.gan_weight", 0.01, 0.5, log=True)
    return over


def search_space_3d(trial, base: dict[str, Any]) -> dict[str, Any]:
    """Overrides for one trial of a 3-D patch model: learning rate and schedule, width (the base's stage widths
    halved, kept or doubled), residual units per stage, perceptual weight."""
    from synth7t.nn.config import UNet3DConfig

    widths = tuple(base["model"].get("channels") or UNet3DConfig().channels)
    scale = trial.suggest_categorical("model.width", [0.5, 1.0, 2.0])
    return {
        "optim.lr": trial.suggest_float("optim.lr", 1e-4, 5e-3, log=True),
        "optim.schedule": trial.suggest_categorical("optim.schedule", ["plateau", "step", "epoch"]),
        "model.channels": [max(4, int(c * scale)) for c in widths],
        "model.num_res_units": trial.suggest_int("model.num_res_units", 1, 3),
        "loss.perceptual_weight": trial.suggest_categorical("loss.perceptual_weight", [0.0, 1e-3, 5e-3]),
    }


def _pruning_callback(trial, multi: bool):
    import lightning.pytorch as pl
    import optuna

    class Prune(pl.Callback):
        def on_validation_epoch_end(self, trainer, module) -> None:
            value = trainer.callback_metrics.get("val/psnr_brain")
            if value is None:
                return
            epoch, psnr = int(trainer.current_epoch), float(value)
            trial.set_user_attr(f"psnr_epoch_{epoch}", psnr)
            if not np.isfinite(psnr):
                raise optuna.TrialPruned(f"non-finite validation PSNR at epoch {epoch}")
            if not multi:
                trial.report(psnr, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {epoch}: PSNR {psnr:.2f} below the median of earlier trials")
                return
            done = [t.user_attrs.get(f"psnr_epoch_{epoch}") for t in trial.study.get_trials(deepcopy=False)
                    if t.state == optuna.trial.TrialState.COMPLETE]
            done = [d for d in done if d is not None]
            if len(done) >= 3 and psnr < np.percentile(done, 25):
                raise optuna.TrialPruned(f"epoch {epoch}: PSNR {psnr:.2f} below the 25th percentile of earlier trials")

    return Prune()


def _requeue_interrupted(study) -> None:
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
        log.warning("trial %d was interrupted: marked failed, its parameters queued again", t.number)


def tune(store: str | Path, out: str | Path, *, trials: int = 20, budget_minutes: float = 10.0,
         preset: str = "tiny", objective: str = "multi", seed: int = 0, overrides: dict | None = None,
         progress: bool = True) -> Path:
    """Run (or continue) the study until ``trials`` trials are finished; returns ``OUT/study.db``.

    ``overrides`` (``--set``) fix settings of the base preset for every trial; the search space varies the rest.
    """
    import optuna

    from synth7t.config import apply_overrides, load_config, preset_dict, validate_config
    from synth7t.training import train

    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r}: expected multi, psnr or ssim")
    if trials < 1 or budget_minutes <= 0:
        raise ConfigError("--trials must be >= 1 and --budget-minutes > 0")
    load_config(preset, overrides)  # validates the preset and the fixed overrides early
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "study.db"
    metrics = OBJECTIVES[objective]
    multi = len(metrics) > 1
    sampler = optuna.samplers.NSGAIISampler(seed=seed) if multi else optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.NopPruner() if multi else optuna.pruners.MedianPruner(n_startup_trials=2)
    study = optuna.create_study(study_name="synth7t", storage=f"sqlite:///{db}", load_if_exists=True,
                                directions=["maximize"] * len(metrics), sampler=sampler, pruner=pruner)
    study.set_user_attr("objective", objective)
    _requeue_interrupted(study)
    base = apply_overrides(preset_dict(preset), overrides or {})

    def run_trial(trial) -> tuple[float, ...] | float:
        over = search_space(trial, base)
        over.update({"trainer.max_minutes": budget_minutes, "trainer.seed": seed})
        try:
            cfg = validate_config(apply_overrides(base, over), source=f"trial {trial.number}")
        except ConfigError as exc:
            raise optuna.TrialPruned(f"invalid combination: {exc}") from None
        run = out / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run", str(run))
        model_dir = train(store, run, config=cfg, progress=progress,
                          extra_callbacks=[_pruning_callback(trial, multi)])
        from synth7t.io import read_json

        m = read_json(Path(model_dir) / "metrics.json")
        values = tuple(float(m.get(k, float("nan"))) for k in metrics)
        if not all(np.isfinite(values)):
            raise optuna.TrialPruned("no validation metrics (empty validation split?)")
        return values if multi else values[0]

    finished = lambda: sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # noqa: E731
                           for t in study.get_trials(deepcopy=False))
    while finished() < trials:
        study.optimize(run_trial, n_trials=1, catch=(RuntimeError,), gc_after_trial=True)
    write_study_tables(study, out, metrics)
    return db


def write_study_tables(study, out: Path, metrics: tuple[str, ...]) -> None:
    """``trials.csv`` (every trial), ``pareto.csv`` (best trials) and ``pareto.png``."""
    import optuna

    from synth7t.io import atomic_path

    df = study.trials_dataframe()
    with atomic_path(out / "trials.csv") as tmp:
        df.to_csv(tmp, index=False)
    best = study.best_trials if len(metrics) > 1 else [study.best_trial] if _any_complete(study) else []
    rows = [{"trial": t.number, **{m: v for m, v in zip(metrics, t.values, strict=True)},
             **{f"param:{k}": v for k, v in t.params.items()}, "run": t.user_attrs.get("run")} for t in best]
    import csv

    with atomic_path(out / "pareto.csv") as tmp, open(tmp, "w", newline="") as fh:
        cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "trial", k.startswith("param:"), k))
        writer = csv.DictWriter(fh, fieldnames=cols or ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    if len(metrics) > 1:
        _pareto_plot(study, best, out / "pareto.png", metrics, optuna)


def _any_complete(study) -> bool:
    import optuna

    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _pareto_plot(study, best, path: Path, metrics, optuna) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synth7t.io import atomic_path

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([t.values[0] for t in done], [t.values[1] for t in done], c="0.6", label="trials")
    front = sorted(best, key=lambda t: t.values[0])
    ax.plot([t.values[0] for t in front], [t.values[1] for t in front], "o-", c="C3", label="Pareto front")
    for t in front:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(f"{metrics[0]} (dB)")
    ax.set_ylabel(metrics[1])
    ax.set_title("synth7t tune: validation brain PSNR vs SSIM")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
