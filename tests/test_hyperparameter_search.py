"""`Trainer.hyperparameter_search` (optuna) with `HKTTrainer`: each trial trains with its own `hkt_*` values (the
Trainer sets a trial's values only after `model_init` built the child, so without `search.py` a trial's adapter and
objective took the previous trial's values); with the HKT terms off a search equals the plain Trainer's."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import helpers as H
from hkt_hf import HKTTrainer
from hkt_hf.mixture import GATES

optuna = pytest.importorskip("optuna")

COMMON = dict(use_cpu=True, report_to="none", seed=0, save_strategy="no", eval_strategy="no", max_steps=2,
              per_device_train_batch_size=4, remove_unused_columns=False, learning_rate=1e-2)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def child_init(trial=None) -> torch.nn.Module:
    return H.tiny_resnet(8)


class TrialRecorder(TrainerCallback):
    """Per trial: its parameters, the child's weights, the adapter's gate class and the trainer's lineage."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.runs: list[dict] = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        adapter = getattr(self.trainer, "hkt_adapter", None)
        self.runs.append({
            "params": dict(state.trial_params),
            "child": {k: v.detach().clone() for k, v in model.state_dict().items() if "hkt_adapter" not in k},
            "gate": type(adapter.gates[0]).__name__ if adapter is not None else None,
            "lineage": dict(getattr(self.trainer, "hkt_lineage", {})),
        })


def hkt_trainer(tmp_path, recorder: TrialRecorder | None = None, **settings) -> HKTTrainer:
    args = H.training_args(tmp_path, **(COMMON | dict(hkt_gate="learned") | settings))
    trainer = HKTTrainer(model_init=child_init, args=args, parent_model=H.tiny_resnet(16, seed=1),
                         train_dataset=H.image_dataset(16), eval_dataset=H.image_dataset(8, seed=1),
                         callbacks=[recorder] if recorder else None)
    if recorder:
        recorder.trainer = trainer
    return trainer


def search(trainer: Trainer, space, n_trials: int = 3) -> None:
    trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=n_trials, direction="minimize",
                                  sampler=optuna.samplers.RandomSampler(seed=0))


def hkt_space(trial) -> dict:
    return {"hkt_kd_weight": trial.suggest_categorical("hkt_kd_weight", [0.0, 2.0]),
            "hkt_gate": trial.suggest_categorical("hkt_gate", ["learned", "genetic"]),
            "hkt_lambda": trial.suggest_float("hkt_lambda", 0.2, 0.8)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_each_trial_trains_with_its_own_hkt_settings(tmp_path):
    """Every trial's child equals the child of a trainer made with that trial's settings, and its adapter and lineage
    carry them."""
    recorder = TrialRecorder()
    search(hkt_trainer(tmp_path / "search", recorder), hkt_space, n_trials=4)
    assert len(recorder.runs) == 4
    assert len({(r["params"]["hkt_kd_weight"], r["params"]["hkt_gate"]) for r in recorder.runs}) > 1
    for i, run in enumerate(recorder.runs):
        params = run["params"]
        assert run["gate"] == GATES[params["hkt_gate"]].__name__
        assert {k: run["lineage"][k] for k in params} == params
        alone = hkt_trainer(tmp_path / f"alone{i}", **params)
        alone.train()
        assert_same(run["child"], {k: v for k, v in alone.model.state_dict().items() if "hkt_adapter" not in k})


def test_a_search_with_the_hkt_terms_off_equals_the_plain_trainers(tmp_path):
    """Oracle row: weights 1 0 0 and no KD; the same sampler draws the same rates, and every trial's child and
    objective equal the plain Trainer's."""
    def space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True)}

    runs = {}
    for name in ("plain", "hkt"):
        recorder = TrialRecorder()
        if name == "plain":
            trainer = Trainer(model_init=child_init, args=TrainingArguments(str(tmp_path / "plain"), **COMMON),
                              train_dataset=H.image_dataset(16), eval_dataset=H.image_dataset(8, seed=1),
                              callbacks=[recorder])
        else:
            trainer = hkt_trainer(tmp_path / "hkt", recorder, hkt_loss_weights=[1.0, 0.0, 0.0])
        search(trainer, space)
        runs[name] = recorder.runs
    assert [r["params"] for r in runs["plain"]] == [r["params"] for r in runs["hkt"]]
    for plain, hkt in zip(runs["plain"], runs["hkt"], strict=True):
        assert_same(plain["child"], hkt["child"])


@pytest.mark.parametrize("settings, message", [
    ({"hkt_parent": "other/parent"}, "parent is loaded once"),
    ({"hkt_parent_revision": "main"}, "parent is loaded once"),
    ({"hkt_carriers": "blocks"}, r"give it as a list \(\['blocks'\]\)"),
    ({"hkt_lambda": 2.0}, r"hkt_lambda must lie in \[0, 1\]"),
    ({"hkt_gate": "sigmoid"}, "hkt_gate must be one of"),
    ({"hkt_kd_wieght": 1.0}, r"Unknown HKT settings \['hkt_kd_wieght'\]"),
])
def test_a_trial_with_bad_hkt_values_is_refused_before_training(tmp_path, settings, message):
    recorder = TrialRecorder()
    trainer = hkt_trainer(tmp_path, recorder)
    before = trainer.args.hkt_settings()
    with pytest.raises(ValueError, match=message):
        search(trainer, lambda trial: settings, n_trials=1)
    assert recorder.runs == [] and trainer.args.hkt_settings() == before


def test_a_list_setting_given_as_a_list_is_searched(tmp_path):
    """Carriers and loss weights searched as lists; the lineage records the carriers resolved for the child."""
    recorder = TrialRecorder()

    def space(trial):
        w = trial.suggest_float("w", 0.1, 1.0)
        return {"hkt_carriers": ["auto"], "hkt_loss_weights": [1.0, w, w]}

    search(hkt_trainer(tmp_path, recorder), space, n_trials=2)
    for run in recorder.runs:
        w = run["params"]["w"]
        assert run["lineage"]["hkt_loss_weights"] == [1.0, w, w]
        assert run["lineage"]["hkt_carriers"] == ["classifier:input=classifier:input"]
