"""DeepSpeed config of a run: kcpt's required keys over the user's JSON; conflicts named; offload settings."""

from __future__ import annotations

import json

import pytest

from kcpt.config import MixturePhase, load_config
from kcpt.errors import ConfigError
from kcpt.train.engine import deepspeed_config
from kcpt.train.mixture import MixtureSampler


def _cfg(*extra: str):
    return load_config(None, ["train.micro_batch_size=4", "train.grad_accum=3", "train.clip_grad_norm=0.5",
                              "model.dtype=bfloat16", *extra])


def test_required_keys_come_from_the_kcpt_config():
    ds = deepspeed_config(_cfg("train.deepspeed={zero_stage: 3, offload_optimizer: true, offload_params: true}"))
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}
    # torch AdamW on offloaded partitions, and rollback points loadable on every node
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["checkpoint"]["use_node_local_storage"] is True


def test_user_json_is_merged_under_the_required_keys(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 3,
                             "zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7},
                             "activation_checkpointing": {"partition_activations": True}}))
    ds = deepspeed_config(_cfg(f"train.deepspeed={{zero_stage: 2, config: {f}}}"))
    assert ds["zero_optimization"] == {"overlap_comm": True, "reduce_bucket_size": 5e7, "stage": 2}
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["train_micro_batch_size_per_gpu"] == 4     # "auto" filled by kcpt


@pytest.mark.parametrize(("user", "key"), [
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"bf16": {"enabled": False}}, "bf16"),
])
def test_a_conflicting_required_key_is_an_error_naming_it(tmp_path, user, key):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match=f"ds.json: {key} = .*kcpt sets"):
        deepspeed_config(_cfg(f"train.deepspeed={{zero_stage: 2, config: {f}}}"))


def test_bad_user_json_and_bad_offload_are_errors(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"a": 1,\n oops}')
    with pytest.raises(ConfigError, match="ds.json: line 2: not valid JSON"):
        deepspeed_config(_cfg(f"train.deepspeed={{config: {f}}}"))
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        deepspeed_config(_cfg("train.deepspeed={zero_stage: 2, offload_params: true}"))


def test_step_mixture_phases_hold_until_the_next_phase():
    """The recipe's 70:30 → 50:50 → 60:40 (exam:raw) as step phases at 0, 1/3, 2/3 of the stage."""
    phases = [MixturePhase(start_frac=0.0, weights={"exam": 0.7, "raw": 0.3}),
              MixturePhase(start_frac=1 / 3, weights={"exam": 0.5, "raw": 0.5}),
              MixturePhase(start_frac=2 / 3, weights={"exam": 0.6, "raw": 0.4})]
    step = MixtureSampler({"exam": 0.7, "raw": 0.3}, seed=0, schedule=phases, max_steps=90, mode="step")
    linear = MixtureSampler({"exam": 0.7, "raw": 0.3}, seed=0, schedule=phases, max_steps=90)
    assert step.weights_at(29)["exam"] == pytest.approx(0.7)
    assert step.weights_at(30)["exam"] == pytest.approx(0.5)
    assert step.weights_at(59)["exam"] == pytest.approx(0.5)
    assert step.weights_at(60)["exam"] == pytest.approx(0.6) and step.weights_at(89)["exam"] == pytest.approx(0.6)
    assert linear.weights_at(15)["exam"] == pytest.approx(0.6)   # halfway between 0.7 and 0.5


def test_recipe_defaults():
    cfg = load_config(None, [])
    st = cfg.plan[0].stop.__class__()
    assert (st.patience, st.min_delta, st.min_delta_relative) == (5, 0.01, 0.002)
    a = cfg.train.anomaly
    assert (a.k_mad, a.min_history, a.min_lr_scale) == (6.0, 20, 0.125)
