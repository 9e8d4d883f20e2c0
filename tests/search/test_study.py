"""The search's bookkeeping of an interrupted study, on a real Optuna SQLite study: what a killed search leaves is
queued to be drawn again exactly once, with the values it had finished drawing and the sampler's record of it."""

from __future__ import annotations

import optuna
import pytest

from mergegate.search.run import _requeue_interrupted, _take_over_sampler_state

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Killed(BaseException):
    """The process dying at a write: nothing after it runs."""


def _study(tmp_path, **kwargs):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.sqlite'}", **kwargs)


def test_a_resume_killed_while_it_requeues_the_interrupted_trial_queues_it_once(tmp_path, monkeypatch):
    sampler = optuna.samplers.NSGAIISampler(seed=0, population_size=4)
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.sqlite'}",
                        directions=["maximize", "maximize"], sampler=sampler)
    study = _study(tmp_path, sampler=sampler)
    interrupted = study.ask()  # drawn whole, then the search was killed mid-trial
    value = interrupted.suggest_float("x", 0.0, 1.0)
    interrupted.set_user_attr("recipe", "merge_method: linear")

    resuming = _study(tmp_path, sampler=sampler)

    def killed_tell(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(resuming, "tell", killed_tell)  # the resume dies after queuing, before marking it failed
    with pytest.raises(Killed):
        _requeue_interrupted(resuming)

    study = _study(tmp_path, sampler=sampler)  # started again
    _requeue_interrupted(study)
    assert [(t.state.name, t.user_attrs.get("rerun_of")) for t in study.get_trials()] == [
        ("FAIL", None), ("WAITING", 0)]
    rerun = study.ask()
    _take_over_sampler_state(study, rerun)
    assert rerun.suggest_float("x", 0.0, 1.0) == value
    # NSGA-II counts the re-run in the generation it counted the interrupted trial in
    recorded = study.get_trials()
    assert recorded[1].system_attrs["NSGAIISampler:generation"] == recorded[0].system_attrs[
        "NSGAIISampler:generation"]


def test_a_trial_killed_mid_draw_is_drawn_again_whole_and_a_rerun_keeps_what_it_was_queued_with(tmp_path):
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.sqlite'}")
    study = _study(tmp_path)
    cut_short = study.ask()
    cut_short.suggest_float("x", 0.0, 1.0)  # killed before drawing "y"
    _requeue_interrupted(study)
    assert study.get_trials()[1].system_attrs["fixed_params"] == {}  # nothing fixed: drawn again whole

    whole = study.ask()
    whole_values = {"x": whole.suggest_float("x", 0.0, 1.0), "y": whole.suggest_float("y", 0.0, 1.0)}
    whole.set_user_attr("recipe", "merge_method: linear")
    again = _study(tmp_path)
    _requeue_interrupted(again)  # killed mid-trial: its values are queued
    rerun = again.ask()  # ... and that re-run is killed before drawing anything
    _requeue_interrupted(_study(tmp_path))
    fixed = [t.system_attrs["fixed_params"] for t in _study(tmp_path).get_trials() if t.number > rerun.number]
    assert fixed == [whole_values]  # the values its original drew, not none
