"""MultipackBatchSampler on its own: packing and balance on the shipped length distribution, determinism, resume,
equal batch counts, lengths measured from datasets, plain DataLoader and Accelerate use, bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch
from fms_acceleration_accelerate_aadp.multipack import (
    MultipackBatchSampler,
    budget_for_batch_size,
    example_lengths,
    plan_stats,
)
from torch.utils.data import DataLoader

from .multipack_helpers import shipped_lengths


def _flat(plan):
    return [i for step in plan for batch in step for i in batch]


def _fixed_count_plan(lengths, per_batch, replicas, seed):
    """The usual alternative: shuffled examples, a fixed number per rank batch, ranks taking batches in turn."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
    steps = len(batches) // replicas
    return tuple(tuple(tuple(batches[s * replicas + r]) for r in range(replicas)) for s in range(steps))


# ------------------------------------------------------------------------------------------------ shipped data
@pytest.mark.parametrize("replicas", [1, 2, 4, 8])
@pytest.mark.parametrize("budget", [2048, 4096, 16384])
def test_packing_and_balance_on_the_shipped_distribution(replicas, budget):
    lengths = shipped_lengths()
    total = sum(lengths)
    assert len(lengths) == 1506 and max(lengths) == 1971  # the dataset the benchmarks train on (with <eos>)
    sampler = MultipackBatchSampler(lengths, budget, num_replicas=replicas, seed=7)
    for epoch in range(2):
        plan = sampler.plan(epoch)
        # every example exactly once, every batch within the budget, every rank a batch at every step
        assert sorted(_flat(plan)) == list(range(len(lengths)))
        assert all(len(step) == replicas and all(step) for step in plan)
        assert all(sum(lengths[i] for i in batch) <= budget for step in plan for batch in step)
        stats = sampler.stats(epoch)
        fewest = math.ceil(total / (replicas * budget))  # no plan can have fewer steps
        print(
            f"\nmultipack shipped data: ranks={replicas} budget={budget} epoch={epoch}: steps={stats.steps} "
            f"(lower bound {fewest}), efficiency={stats.efficiency:.4f}, step_efficiency={stats.step_efficiency:.4f}, "
            f"rank_balance(max/min epoch tokens)={stats.rank_balance:.4f}, worst step max/min={stats.worst_step_balance:.3f}"
        )
        assert stats.steps <= fewest + 1
        assert stats.efficiency >= 0.97 * total / (fewest * replicas * budget)
        assert stats.step_efficiency >= 0.99
        assert stats.rank_balance <= 1.01
        assert stats.worst_step_balance <= 1.1


def test_multipack_beats_fixed_count_batches_on_the_shipped_distribution():
    lengths = shipped_lengths()
    replicas, per_batch = 4, 8
    budget = budget_for_batch_size(lengths, per_batch)  # upstream's default rule: batch size x mean length
    assert budget == max(lengths)  # 8 x 202.4 = 1620 is below the longest example, which sets the budget
    packed = MultipackBatchSampler(lengths, budget, num_replicas=replicas).stats()
    fixed = plan_stats(_fixed_count_plan(lengths, per_batch, replicas, seed=42), lengths, budget)
    print(
        f"\nper-rank budget {budget}, 4 ranks: multipack {packed.steps} steps, step_efficiency "
        f"{packed.step_efficiency:.3f}, worst step {packed.worst_step_balance:.2f}; 8 examples per batch: "
        f"{fixed.steps} steps, step_efficiency {fixed.step_efficiency:.3f}, worst step {fixed.worst_step_balance:.2f}"
    )
    assert packed.step_efficiency >= 0.99 > 0.8 > fixed.step_efficiency
    assert packed.worst_step_balance < 1.1 < 2 < fixed.worst_step_balance


# ------------------------------------------------------------------------------------------------ determinism
def test_plan_is_deterministic_by_seed_and_epoch():
    lengths = shipped_lengths()
    a = MultipackBatchSampler(lengths, 4096, num_replicas=2, seed=3)
    b = MultipackBatchSampler(list(lengths), 4096, num_replicas=2, seed=3)
    assert a.plan(0) == b.plan(0) and a.plan(5) == b.plan(5)
    assert a.plan(0) != a.plan(1)  # a new shuffle each epoch
    assert a.plan(0) != MultipackBatchSampler(lengths, 4096, num_replicas=2, seed=4).plan(0)
    unshuffled = MultipackBatchSampler(lengths, 4096, num_replicas=2, shuffle=False)
    assert unshuffled.plan(0) == unshuffled.plan(1)
    # iterating gives the plan: rank mode takes its column, rank=None yields the ranks of each step in turn
    assert list(a) == [list(batch) for step in a.plan(0) for batch in step]
    for rank in range(2):
        one = MultipackBatchSampler(lengths, 4096, num_replicas=2, rank=rank, seed=3)
        assert list(one) == [list(step[rank]) for step in a.plan(0)]
        assert list(one) == [list(step[rank]) for step in a.plan(1)]  # auto-advanced to epoch 1


def test_a_complete_pass_advances_the_epoch_and_set_epoch_selects_one():
    sampler = MultipackBatchSampler(shipped_lengths(), 8192, num_replicas=2, rank=1)
    first = list(sampler)
    assert sampler.epoch == 1 and sampler.position == 0
    sampler.set_epoch(0)
    assert list(sampler) == first
    sampler.set_epoch(4)
    assert list(sampler) == [list(step[1]) for step in sampler.plan(4)]


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("rank", [None, 0, 1])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(rank):
    lengths = shipped_lengths()
    sampler = MultipackBatchSampler(lengths, 4096, num_replicas=2, rank=rank, seed=11)
    sampler.set_epoch(2)
    full = list(MultipackBatchSampler(lengths, 4096, num_replicas=2, rank=rank, seed=11).plan(2))
    expected = [list(b) for step in full for b in (step if rank is None else (step[rank],))]
    iterator = iter(sampler)
    done = 13 if rank is not None else 26  # 13 steps
    taken = [next(iterator) for _ in range(done)]
    assert taken == expected[:done]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 13
    # a new process: same arguments, state restored; a trainer's set_epoch of the same epoch keeps the position
    resumed = MultipackBatchSampler(lengths, 4096, num_replicas=2, rank=rank, seed=11)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert len(resumed) == len(expected)
    assert list(resumed) == expected[done:]
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0
    # the original sampler, asked again, also continues where it stopped
    assert list(sampler) == expected[done:]


def test_resume_at_the_end_of_an_epoch_yields_nothing_then_the_next_epoch():
    sampler = MultipackBatchSampler(shipped_lengths(), 4096, num_replicas=2, rank=0)
    steps = len(sampler)
    iterator = iter(sampler)
    for _ in range(steps):
        next(iterator)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, steps)
    resumed = MultipackBatchSampler(shipped_lengths(), 4096, num_replicas=2, rank=0)
    resumed.load_state_dict(state)
    assert list(resumed) == []
    assert list(resumed) == [list(step[0]) for step in resumed.plan(1)]


def test_state_from_another_plan_is_refused():
    lengths = shipped_lengths()
    state = MultipackBatchSampler(lengths, 4096, num_replicas=2).state_dict()
    with pytest.raises(ValueError, match=r"num_replicas: saved 2, now 4.*same dataset, max_tokens"):
        MultipackBatchSampler(lengths, 4096, num_replicas=4).load_state_dict(state)
    with pytest.raises(ValueError, match="max_tokens: saved 4096, now 8192"):
        MultipackBatchSampler(lengths, 8192, num_replicas=2).load_state_dict(state)
    with pytest.raises(ValueError, match="position 1000 is outside epoch 0"):
        MultipackBatchSampler(lengths, 4096, num_replicas=2).load_state_dict({**state, "position": 1000})


# ------------------------------------------------------------------------------------------------ equal counts
@pytest.mark.parametrize("seed", range(6))
def test_every_rank_gets_the_same_number_of_batches(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(20, 400))]
    replicas = rng.choice([2, 3, 5, 8])
    budget = rng.choice([300, 700, 2000])
    per_rank = [list(MultipackBatchSampler(lengths, budget, num_replicas=replicas, rank=r)) for r in range(replicas)]
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(batches for rank_batches in per_rank for batches in rank_batches)  # no empty batch
    seen = [i for rank_batches in per_rank for batch in rank_batches for i in batch]
    assert sorted(seen) == list(range(len(lengths)))  # disjoint and covering: splitting, never repeating


def test_a_dataset_smaller_than_the_ranks_repeats_its_shortest_examples():
    sampler = MultipackBatchSampler([5, 9, 3], 100, num_replicas=4)
    plan = sampler.plan()
    assert len(plan) == 1 and all(plan[0])
    assert sorted(_flat(plan)) == [0, 1, 2, 2]  # each once, plus the shortest again for the fourth rank


# ------------------------------------------------------------------------------------------------ lengths
def test_lengths_from_a_hugging_face_dataset_and_a_column():
    datasets = pytest.importorskip("datasets")
    rows = [list(range(n)) for n in (3, 1, 7, 2)]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "length": [30, 10, 70, 20]})
    assert example_lengths(ds, progress=False) == [3, 1, 7, 2]
    assert example_lengths(ds, lengths_column="length") == [30, 10, 70, 20]
    sampler = MultipackBatchSampler(ds, 8, progress=False)
    assert sampler.lengths == [3, 1, 7, 2]
    with pytest.raises(ValueError, match=r"no 'input_ids' column.*give the lengths"):
        example_lengths(datasets.Dataset.from_dict({"text": ["a"]}))


def test_lengths_of_a_hugging_face_dataset_in_several_processes(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import fms_acceleration_accelerate_aadp.multipack as multipack

    monkeypatch.setattr(multipack, "_EXAMPLES_PER_PROCESS", 10)  # 2 processes for 40 examples
    monkeypatch.setattr(multipack.os, "cpu_count", lambda: 2)
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * (n % 13 + 1) for n in range(40)]})
    processes = []
    original_map = datasets.Dataset.map

    def counting_map(self, *args, **kwargs):
        processes.append(kwargs.get("num_proc"))
        return original_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counting_map)
    assert example_lengths(ds, num_proc=8, progress=False) == [n % 13 + 1 for n in range(40)]
    assert processes[0] == 2  # capped by the CPU count


def test_lengths_of_a_map_style_dataset_in_threads():
    data = [{"input_ids": torch.arange(n)} for n in range(1, 50)]
    assert example_lengths(data, num_proc=2, progress=False) == list(range(1, 50))
    assert example_lengths(torch.tensor([4, 5])) == [4, 5]
    with pytest.raises(ValueError, match=r"example 1 has no 'input_ids' field .*tokenize the dataset first"):
        example_lengths([{"input_ids": [1]}, {"text": "x"}], progress=False)
    with pytest.raises(ValueError, match="example 1 has length 0"):
        example_lengths([3, 0])


# ------------------------------------------------------------------------------------------------ loaders
def test_plain_dataloader_with_the_sampler():
    lengths = [int(n) for n in shipped_lengths()[:300]]
    data = [{"input_ids": list(range(n))} for n in lengths]
    sampler = MultipackBatchSampler(data, 2048, num_replicas=2, rank=1, progress=False)

    def collate(examples):
        return torch.tensor([len(e["input_ids"]) for e in examples])

    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(loader) == len(sampler.plan(0))
    assert all(int(b.sum()) <= 2048 for b in batches)
    assert [b.tolist() for b in batches] == [[lengths[i] for i in step[1]] for step in sampler.plan(0)]


def test_accelerate_one_process_prepare_reaches_set_epoch():
    from accelerate import Accelerator

    lengths = list(shipped_lengths()[:200])
    sampler = MultipackBatchSampler(lengths, 2048)
    loader = Accelerator(cpu=True).prepare(DataLoader(lengths, batch_sampler=sampler, collate_fn=lambda b: b))
    loader.set_epoch(3)
    assert sampler.epoch == 3
    assert list(loader) == [[lengths[i] for i in step[0]] for step in sampler.plan(3)]


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_are_refused():
    with pytest.raises(
        ValueError, match=r"2 example\(s\) are longer than the token budget max_tokens=10 .*at least 12"
    ):
        MultipackBatchSampler([3, 11, 12], 10)
    with pytest.raises(ValueError, match="the dataset is empty"):
        MultipackBatchSampler([], 10)
    with pytest.raises(ValueError, match=r"rank must be None or an int in \[0, 2\)"):
        MultipackBatchSampler([3], 10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        MultipackBatchSampler([3], 0)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        MultipackBatchSampler([3], 10).set_epoch(-1)
