"""Hyper-parameter search: trials are normal run folders, the study resumes, the Pareto front is written."""

from __future__ import annotations

import csv

import optuna

from synth7t.tuning import tune


def test_three_trials_then_resume(tiny_store, tmp_path, fast_training):
    _, store = tiny_store
    fixed = {**fast_training, "trainer.max_epochs": 1}
    db = tune(store, tmp_path / "study", trials=3, budget_minutes=0.5, overrides=fixed, progress=False)
    study = optuna.load_study(study_name="synth7t", storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    assert len(states) == 3 and states.count(optuna.trial.TrialState.COMPLETE) >= 1
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(len(t.values) == 2 for t in done)
    assert (tmp_path / "study" / "trials" / "trial-0000" / "model.safetensors").exists()
    front = list(csv.DictReader((tmp_path / "study" / "pareto.csv").open()))
    assert front and "val/psnr_brain" in front[0] and (tmp_path / "study" / "pareto.png").stat().st_size > 1000

    # a trial killed while running is marked failed and its parameters run again; finished ones are kept
    trial = study.ask()
    trial.suggest_float("optim.lr", 1e-4, 5e-3, log=True)
    tune(store, tmp_path / "study", trials=4, budget_minutes=0.5, overrides=fixed, progress=False)
    study = optuna.load_study(study_name="synth7t", storage=f"sqlite:///{db}")
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4
    assert study.trials[3].state == optuna.trial.TrialState.FAIL


def test_tune_accepts_the_3d_preset(tiny_store, tmp_path, fast_3d):
    db = tune(tiny_store[1], tmp_path / "study3d", trials=2, budget_minutes=0.5, preset="tiny3d",
              overrides={**fast_3d, "trainer.max_epochs": 1}, progress=False)
    study = optuna.load_study(study_name="synth7t", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and {"model.width", "model.num_res_units"} <= set(done[0].params)
