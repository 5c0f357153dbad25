"""``fms_acceleration_odm``: the original's import name, with the original's ``OnlineMixingDataset`` constructor
(parameters, order, defaults), its ``Reward`` names and plugin class name, served by this project's plugin."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

pytest.importorskip("fms_acceleration_accelerate_odm")

STAND_IN = (
    Path(__file__).resolve().parents[3]
    / "plugins"
    / "online-data-mixing"
    / "src"
    / "fms_acceleration_accelerate_odm"
    / "upstream_names"
)


def _stand_in_found() -> bool:
    spec = importlib.util.find_spec("fms_acceleration_odm")
    return spec is not None and "upstream_names" in str(spec.origin)


pytestmark = pytest.mark.skipif(
    not _stand_in_found(), reason="installed without fms_acceleration_accelerate_upstream_names.pth (or the original)"
)

# the original's OnlineMixingDataset.__init__: (name, default) in order (no default: required)
ORIGINAL_SIGNATURE = [
    ("dataset_dict", inspect.Parameter.empty),
    ("collators_dict", None),
    ("eval_dataset_dict", None),
    ("eval_collators_dict", None),
    ("sampling_weights", None),
    ("gamma", 0.1),
    ("eta", 0.3),
    ("sampling_interval", 1),
    ("eval_batch_size", 5),
    ("output_dir", "odm"),
    ("reward_type", "entropy"),
    ("auto_categorize_config", None),
    ("seed", 42),
    ("templated_eval_dataset_dict", None),
    ("templated_eval_collators_dict", None),
    ("beta", 1.0),
]


def _categories():
    return {name: [{"input_ids": [i, i + 1, i + 2], "labels": [i, i + 1, i + 2]} for i in range(8)] for name in "abc"}


def test_the_names_and_the_original_constructor(tmp_path):
    import fms_acceleration_odm
    from fms_acceleration_accelerate_odm import AutoCategorizeConfig as OurConfig
    from fms_acceleration_accelerate_odm import OnlineDataMixingPlugin
    from fms_acceleration_accelerate_odm import OnlineMixingDataset as Ours
    from fms_acceleration_odm import (
        AutoCategorizeConfig,
        OnlineDataMixingAccelerationPlugin,
        OnlineMixingDataset,
        Reward,
    )

    assert Path(fms_acceleration_odm.__file__).parent.parent == STAND_IN
    assert OnlineDataMixingAccelerationPlugin is OnlineDataMixingPlugin and AutoCategorizeConfig is OurConfig
    assert issubclass(OnlineMixingDataset, Ours)
    parameters = list(inspect.signature(OnlineMixingDataset.__init__).parameters.values())[1:]
    assert [(p.name, p.default) for p in parameters] == ORIGINAL_SIGNATURE
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)

    # called positionally the way the original's tests call it (weights per category in sorted order)
    data = _categories()
    dataset = OnlineMixingDataset(data, None, data, None, [1, 100, 2], 0.1, 0.3, 1, 4, str(tmp_path), Reward.ENTROPY)
    assert dataset.category_list == ["a", "b", "c"] and dataset.total_categories == 3
    assert dataset.reward_type == "entropy" and dataset.eval_batch_size == 4 and dataset.bandit.eta == 0.3
    assert dataset.sampling_ratio == pytest.approx([0.9 * w / 103 + 0.1 / 3 for w in (1, 100, 2)])
    assert dataset.sampling_weights == pytest.approx([0.01, 1.0, 0.02])
    assert set(dataset.dataset_dict) == set(dataset.collators_dict) == {"a", "b", "c"}
    # the default output folder is the original's "odm" (relative to the working directory)
    assert OnlineMixingDataset(data, {}, {}, {}).output_dir == Path("odm")

    assert Reward["TRAIN_LOSS"] is Reward("train_loss") is Reward.TRAIN_LOSS and str(Reward.VELOCITY) == "velocity"
    assert OnlineMixingDataset(data, reward_type=Reward.VELOCITY).reward_type == "velocity"
    assert OnlineMixingDataset(data, reward_type="TRAIN_LOSS").reward_type == "train_loss"
    with pytest.raises(ValueError, match="is not available"):
        OnlineMixingDataset(data, reward_type=Reward.LEARNABILITY)
    with pytest.raises(ValueError, match="learnability and combined rewards"):
        OnlineMixingDataset(data, templated_eval_dataset_dict=data)
    with pytest.raises(NotImplementedError, match="RewardTracker"):
        dataset.update_sampling_weights(None, None, None)


def test_fms_hf_tuning_finds_the_plugin_and_its_section_activates_it():
    from fms_acceleration import AccelerationFramework
    from fms_acceleration_odm import OnlineDataMixingAccelerationPlugin

    from tests.integration.fms_hf_tuning_replay import is_fms_accelerate_available

    assert is_fms_accelerate_available("odm")
    section = {
        "update_interval": 1,
        "sampling_interval": 1,
        "reward_type": "train_loss",
        "gamma": 0.1,
        "eta": 0.1,
        "resume_from_checkpoint": False,
        "auto_categorize_input_column": None,
        "auto_categorize_num_categories": None,
        "auto_categorize_model_name": "Qwen/Qwen3-Embedding-0.6B",
        "auto_categorize_batch_size": 64,
    }  # every field of fms-hf-tuning's ODM dataclass, with its defaults
    framework = AccelerationFramework({"plugins": {"training": {"odm": {"odm": section}}}})
    assert [type(plugin) for _name, plugin in framework.active_plugins] == [OnlineDataMixingAccelerationPlugin]
