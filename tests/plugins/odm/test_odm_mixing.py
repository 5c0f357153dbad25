"""Online data mixing: EXP3 against a hand-computed example, the mixing stream (determinism, sharding, resume),
config errors, and the mixture learnt during a short HF Trainer run."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fms_acceleration_accelerate_odm")

from fms_acceleration_accelerate_odm import Exp3, OnlineMixingDataset, read_metrics


# ------------------------------------------------------------------------------------------------ EXP3
def test_exp3_matches_a_hand_computed_example():
    """K=2, gamma=0.1, eta=0.5, weights [1, 1].

    start:    p = 0.9 * [1/2, 1/2] + 0.1/2 = [0.5, 0.5]
    round 1:  arm 0 rewarded 0.8 -> estimate 0.8 / 0.5 = 1.6 -> log w0 += 0.5 * 1.6 / 2 = 0.4
              w = [e^0.4, 1] = [1.491825, 1];  w0 / sum = 0.598688
              p0 = 0.9 * 0.598688 + 0.05 = 0.588819;  p1 = 0.9 * 0.401312 + 0.05 = 0.411181
    round 2:  arm 1 rewarded 1.0 -> estimate 1.0 / 0.411181 = 2.432022 -> log w1 += 0.5 * 2.432022 / 2 = 0.608005
              w0 / sum = 1 / (1 + e^(0.608005 - 0.4)) = 1 / (1 + 1.231224) = 0.448184
              p0 = 0.9 * 0.448184 + 0.05 = 0.453366;  p1 = 0.546634
    """
    bandit = Exp3(2, gamma=0.1, eta=0.5)
    assert bandit.probabilities() == pytest.approx([0.5, 0.5])
    assert bandit.update({0: 0.8}) == pytest.approx([0.588819, 0.411181], abs=1e-6)
    assert bandit.update({1: 1.0}) == pytest.approx([0.453366, 0.546634], abs=1e-6)
    # weights are stored scaled so that the largest is 1: w0 / w1 = e^(0.4 - 0.608005)
    assert bandit.weights == pytest.approx([math.exp(0.4 - 0.608005), 1.0], abs=1e-6)
    # full information: no importance weighting, log w0 += 0.5 * 2.0 / 2 = 0.5
    full = Exp3(2, gamma=0.0, eta=0.5)
    assert full.update({0: 2.0, 1: 0.0}, full_information=True) == pytest.approx(
        [math.e**0.5 / (1 + math.e**0.5), 1 / (1 + math.e**0.5)]
    )


def test_exp3_state_round_trip_and_no_overflow():
    bandit = Exp3(3, gamma=0.05, eta=0.3)
    for _ in range(2000):  # unbounded rewards: log-space weights never overflow
        bandit.update({0: 9.0, 2: 1.0})
    probabilities = bandit.probabilities()
    assert all(math.isfinite(p) for p in probabilities) and probabilities[0] > 0.8 > probabilities[2]
    assert min(probabilities) >= 0.05 / 3 - 1e-12
    twin = Exp3(3, gamma=0.5, eta=1.0)
    twin.load_state_dict(bandit.state_dict())
    assert twin.probabilities() == probabilities


# ------------------------------------------------------------------------------------------------ stream
def _categories(size: int = 50) -> dict[str, list[dict]]:
    return {name: [{"id": f"{name}{i}"} for i in range(size)] for name in ("code", "math", "prose")}


def _take(iterator, n):
    return [next(iterator)["id"] for _ in range(n)]


def _run(dataset: OnlineMixingDataset, steps: int, per_step: int, rewards: dict[str, float], start: int = 0):
    """A loop that trains ``per_step`` examples per step and rewards each step with the reward of its category."""
    iterator = iter(dataset)
    seen = []
    for step in range(start, start + steps):
        ids = _take(iterator, per_step)
        seen += ids
        category = ids[0].rstrip("0123456789")
        dataset.reward(rewards[category], examples=per_step, step=step)
    return seen


def test_stream_is_deterministic_by_seed_and_follows_rewards():
    rewards = {"code": 1.0, "math": 0.1, "prose": 0.1}
    runs = [
        _run(OnlineMixingDataset(_categories(), sampling_interval=4, seed=7, eta=0.5), 40, 4, rewards) for _ in range(2)
    ]
    assert runs[0] == runs[1]
    other_seed = _run(OnlineMixingDataset(_categories(), sampling_interval=4, seed=8, eta=0.5), 40, 4, rewards)
    assert other_seed != runs[0]
    # blocks of sampling_interval examples come from one category, read in order
    first = runs[0][:4]
    assert len({i.rstrip("0123456789") for i in first}) == 1
    late = runs[0][-40:]
    assert sum(i.startswith("code") for i in late) > 20  # most rewarded category drawn most


def test_ranks_share_the_category_sequence_and_split_the_examples():
    whole = iter(OnlineMixingDataset(_categories(), sampling_interval=3, seed=3))
    expected = _take(whole, 30)
    shards = [
        iter(OnlineMixingDataset(_categories(), sampling_interval=3, seed=3, rank=r, world_size=2)) for r in (0, 1)
    ]
    got = [_take(shards[0], 15), _take(shards[1], 15)]
    assert got[0] == expected[0::2] and got[1] == expected[1::2]


def test_resume_continues_exactly():
    rewards = {"code": 0.2, "math": 1.0, "prose": 0.5}

    def build():
        return OnlineMixingDataset(_categories(7), sampling_interval=2, seed=11, eta=0.4)  # 7: categories wrap

    uninterrupted = _run(build(), 30, 3, rewards)

    first = build()
    head = _run(first, 12, 3, rewards)
    # the loader read ahead of training by one batch: the state gives those examples back
    next(iter(first)), next(iter(first)), next(iter(first))
    state = first.state_dict(consumed=first.rewarded_until)
    import json

    state = json.loads(json.dumps(state))  # as saved in a checkpoint
    second = build()
    second.load_state_dict(state)
    tail = _run(second, 18, 3, rewards, start=12)
    assert head + tail == uninterrupted
    assert second.probabilities() == pytest.approx(build_and_run_probabilities(build, rewards))


def build_and_run_probabilities(build, rewards):
    dataset = build()
    _run(dataset, 30, 3, rewards)
    return dataset.probabilities()


def test_metrics_are_json_lines(tmp_path):
    dataset = OnlineMixingDataset(_categories(), sampling_interval=2, output_dir=tmp_path)
    _run(dataset, 3, 2, {"code": 1.0, "math": 0.5, "prose": 0.0})
    records = read_metrics(tmp_path)
    assert [r["update"] for r in records] == [1, 2, 3]
    assert set(records[-1]) >= {"sampling_weights", "sampling_ratio", "category_counts", "rewards", "chosen"}
    assert sum(records[-1]["category_counts"].values()) == 6
    assert sum(records[-1]["sampling_ratio"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "at least two categories"),
        ({"a": [{"id": 1}], "b": []}, "category 'b' is empty"),
        ({"a": [{"id": 1}], "b": iter([{"id": 2}])}, "has no length"),
    ],
)
def test_bad_datasets_are_refused(data, message):
    with pytest.raises((TypeError, ValueError), match=message):
        OnlineMixingDataset(data)


def test_bad_reward_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="Did you mean 'train_loss'"):
        OnlineMixingDataset(_categories(), reward_type="train_los")
    with pytest.raises(ValueError, match="Did you mean 'velocity'"):
        OnlineMixingDataset(_categories(), reward_type="velocty")
    # upstream's rewards that need extra evaluation forwards on few-shot data: a clear "not available"
    with pytest.raises(ValueError, match=r"'LEARNABILITY' is not available.*Use 'velocity'"):
        OnlineMixingDataset(_categories(), reward_type="LEARNABILITY")


def test_velocity_reward_is_bounded_and_resumes():
    """velocity = (previous - loss) / max(previous, loss): upstream's 1 - loss/previous for a fall, its mirror for a
    rise, so a spike near 0 loss costs at most 1 (upstream's ratio: 1 - 1.0/0.05 = -19) and its recovery gives it
    back."""
    from fms_acceleration_accelerate_odm.dataset import loss_velocity

    assert loss_velocity(None, 3.0) == 0.0
    assert loss_velocity(4.0, 3.0) == pytest.approx(0.25) == 1 - 3.0 / 4.0
    assert loss_velocity(3.0, 4.0) == pytest.approx(-0.25)
    assert loss_velocity(0.05, 1.0) == pytest.approx(-0.95) and loss_velocity(1.0, 0.05) == pytest.approx(0.95)
    assert loss_velocity(0.0, 0.0) == 0.0

    def build():
        data = {name: [{"id": f"{name}{i}"} for i in range(10)] for name in ("a", "b")}
        return OnlineMixingDataset(data, sampling_interval=2, reward_type="velocity", eta=0.5, seed=5)

    losses = [3.0, 2.5, 2.0, 2.2, 1.0, 0.5, 0.6, 0.4]
    whole = build()
    stream = iter(whole)
    for step, loss in enumerate(losses):
        _take(stream, 2)
        whole.reward_velocity(loss, examples=2, step=step)
    # each update covers one category (sampling_interval 2 = examples per update): its reward is its own velocity
    previous: dict[str, float] = {}
    for record, loss in zip(whole.history, losses):
        ((category, reward),) = record["rewards"].items()
        assert reward == pytest.approx(loss_velocity(previous.get(category), loss))
        previous[category] = loss

    import json

    first = build()
    stream = iter(first)
    for step, loss in enumerate(losses[:4]):
        _take(stream, 2)
        first.reward_velocity(loss, examples=2, step=step)
    second = build()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    stream = iter(second)
    for step, loss in enumerate(losses[4:], start=4):
        _take(stream, 2)
        second.reward_velocity(loss, examples=2, step=step)
    assert [r["rewards"] for r in second.history] == [r["rewards"] for r in whole.history[4:]]
    assert second.probabilities() == whole.probabilities()


# ------------------------------------------------------------------------------------------------ config
def test_upstream_section_activates_the_plugin_and_bad_keys_are_refused():
    from fms_acceleration import AccelerationFramework
    from fms_acceleration_accelerate_odm import OnlineDataMixingPlugin, OnlineMixingCallback

    from fms_acceleration_accelerate.errors import AccelerationConfigError

    section = {"update_interval": 2, "sampling_interval": 4, "reward_type": "ENTROPY", "gamma": 0.2, "eta": 0.3}
    framework = AccelerationFramework({"plugins": {"training": {"odm": {"odm": section}}}})
    (plugin,) = framework.plugins
    assert isinstance(plugin, OnlineDataMixingPlugin) and plugin.config.reward_type == "entropy"
    (callback,) = framework.get_callbacks_and_ready_for_train()
    assert isinstance(callback, OnlineMixingCallback) and callback.update_interval == 2

    with pytest.raises(AccelerationConfigError) as bad_reward:
        AccelerationFramework({"plugins": {"training": {"odm": {"odm": {"reward_type": "entropi"}}}}})
    text = str(bad_reward.value)
    assert "plugins.training.odm.odm" in text and "Did you mean 'entropy'" in text and "fix:" in text
    with pytest.raises(AccelerationConfigError) as unknown:
        AccelerationFramework({"plugins": {"training": {"odm": {"odm": {"update_intervall": 1}}}}})
    assert "plugins.training.odm.odm.update_intervall" in str(unknown.value)
    assert "update_interval" in str(unknown.value)
    with pytest.raises(AccelerationConfigError, match="sampling_interval must be a positive int"):
        AccelerationFramework({"plugins": {"training": {"odm": {"odm": {"sampling_interval": 0}}}}})


def test_resume_from_checkpoint_key_reaches_the_callback():
    """true (default) / a folder / false reach the callback that restores the mixture; other values are refused."""
    from fms_acceleration import AccelerationFramework

    from fms_acceleration_accelerate.errors import AccelerationConfigError

    def callback_for(section):
        framework = AccelerationFramework({"plugins": {"training": {"odm": {"odm": section}}}})
        (callback,) = framework.get_callbacks_and_ready_for_train()
        return callback

    assert callback_for({}).resume_from_checkpoint is True
    assert callback_for({"resume_from_checkpoint": False}).resume_from_checkpoint is False
    assert callback_for({"resume_from_checkpoint": "out/checkpoint-5"}).resume_from_checkpoint == "out/checkpoint-5"
    with pytest.raises(AccelerationConfigError) as bad:
        AccelerationFramework({"plugins": {"training": {"odm": {"odm": {"resume_from_checkpoint": 5}}}}})
    assert "resume_from_checkpoint" in str(bad.value) and "fix:" in str(bad.value)
