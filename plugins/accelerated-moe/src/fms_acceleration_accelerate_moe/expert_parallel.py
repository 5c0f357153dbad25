"""Expert parallelism (``ep_degree`` > 1): experts sharded over groups of processes, tokens sent to them.

Process groups
--------------
The world's ``W`` processes form ``W / ep_degree`` expert-parallel (EP) groups of ``ep_degree`` consecutive ranks
(ranks ``[g * ep, (g + 1) * ep)``). Rank ``r`` of an EP group holds experts ``[r * E / ep, (r + 1) * E / ep)`` of
every MoE layer. The processes holding the same experts in different EP groups (ranks ``r, r + ep, r + 2 ep, ...``)
are that shard's data-parallel replicas.

Sharding
--------
:meth:`ExpertParallel.shard` slices each experts module's 3-D parameters (and their biases) in place, so they stay
ordinary parameters of the same names whose first dimension is the local expert count. The parameter objects are
kept (an optimizer created before ``prepare`` follows them), and so are their names. The data-parallel wrappers
must leave them alone:

* DDP: the parameters are listed in DDP's ignore list (``_ddp_params_and_buffers_to_ignore``, set with DDP's own
  ``_set_params_and_buffers_to_ignore_for_model``), so DDP neither broadcasts nor all-reduces them;
* FSDP2: the experts modules are ``ignored_modules`` of the plugin's prepare contribution, so ``fully_shard``
  (the framework's units and Accelerate's root) gets their parameters as ``ignored_params``: never sharded,
  all-gathered or reduce-scattered.

Gradients
---------
A rank's expert gradients already hold the contributions of every token of its EP group (the backward of the
all-to-all brings them home). A hook on each expert parameter scales them by ``1 / W`` and sums them over the
shard's replicas, so they are the gradient of the mean loss over all processes, as DDP and FSDP average the rest
of the model. With ``ep_degree == W`` there are no replicas and no reduction.

Dispatch
--------
:meth:`ExpertParallel.experts_forward` sends each token's hidden row once to every rank that owns at least one of
its routed experts, however many of its routing slots that rank serves (with top-8 routing over a few ranks most
tokens have several slots on the same rank):

1. the sender lists the distinct (token, destination rank) pairs, grouped by destination, and exchanges with every
   rank of the EP group one small ``all_to_all_single`` of two counts per destination: the rows (pairs) and the
   routing slots it will send there;
2. it sends the rows, and for every slot the index of its row within that destination's rows, its expert's local
   id and its routing weight;
3. the receiving rank's local experts compute each slot from its row, times its routing weight, and the slots of
   the same row are summed there, so one combined row per (token, destination) goes back with the inverse
   all-to-all;
4. the sender adds the rows that came back into its tokens' outputs.

The rows and the weights travel through an autograd function whose backward is the inverse all-to-all, so the
hidden states, the routing weights (the router) and the local experts all get their gradients. Both sums (a row's
slots on the receiving rank, a token's destinations on the sender) accumulate in float32 when the experts compute
in a lower precision, and are rounded once: to the experts' output dtype for the trip back, to the hidden states'
dtype at the end. ``all_to_all_single`` with uneven splits works on gloo (CPU tensors) and NCCL.

Saving
------
:meth:`ExpertParallel.full_state_dict` (every process calls it) gathers the expert slices of each EP group into
the full tensors under the model's own names; ``save_pretrained`` given that state dict writes an ordinary
Hugging Face checkpoint that ``from_pretrained`` loads with no conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch

from fms_acceleration_accelerate.errors import AccelerationConfigError


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The process groups of one run's expert parallelism.

    Attributes:
        world_size: number of processes.
        ep_size: processes per EP group (``ep_degree``).
        ep_rank: this process's rank in its EP group (which slice of the experts it holds).
        ep_group: this process's EP group (the all-to-all runs in it).
        replicas: processes holding the same experts (``world_size / ep_size``).
        replica_group: this process's replica group (expert gradients are summed in it), ``None`` without replicas.
    """

    world_size: int
    ep_size: int
    ep_rank: int
    ep_group: Any
    replicas: int
    replica_group: Any

    @classmethod
    def create(cls, ep_size: int, path: str) -> ExpertParallelGroups:
        """Create the groups (a collective: every process must call it, in the same order).

        Raises:
            AccelerationConfigError: no process group is initialised, or ``ep_size`` does not divide its size.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise AccelerationConfigError(
                f"expert parallelism (ep_degree: {ep_size}) needs an initialised torch.distributed process group "
                "to shard the experts, and there is none",
                path=path,
                fix="launch the script with accelerate launch / torchrun and create the Accelerator (or call "
                "torch.distributed.init_process_group) before preparing the model, or set ep_degree: 1",
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % ep_size:
            raise AccelerationConfigError(
                f"ep_degree {ep_size} does not divide the world size {world}",
                path=path,
                fix="set ep_degree to a divisor of the world size and of the number of experts",
            )
        ep_group = replica_group = None
        for first in range(0, world, ep_size):  # every process creates every group, in the same order
            group = dist.new_group(list(range(first, first + ep_size)))
            if first <= rank < first + ep_size:
                ep_group = group
        replicas = world // ep_size
        if replicas > 1:
            for r in range(ep_size):
                group = dist.new_group(list(range(r, world, ep_size)))
                if rank % ep_size == r:
                    replica_group = group
        return cls(world, ep_size, rank % ep_size, ep_group, replicas, replica_group)


@dataclass(frozen=True)
class ExpertShard:
    """The experts one process holds of one experts module.

    Attributes:
        first: global id of the first local expert.
        count: number of local experts (``E / ep_degree``).
        total: number of experts of the layer (``E``).
        names: attribute names of the sharded parameters on the module.
    """

    first: int
    count: int
    total: int
    names: tuple[str, ...]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows (first dimension) with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(rows, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _sum_rows(values: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows, row ``i`` the sum of the ``values`` rows whose ``index`` is ``i``; accumulated in float32 when
    ``values`` is in a lower precision (the caller rounds the result once)."""
    total = torch.promote_types(values.dtype, torch.float32)
    return values.new_zeros(count, values.shape[1], dtype=total).index_add(0, index, values.to(total))


class _Dispatch(torch.autograd.Function):
    """The dispatch's two autograd exchanges in one node: the rows (split by ``row_splits``) and the slots' routing
    weights (split by ``slot_splits``). One node, so the backward runs both inverse all-to-alls in the same order on
    every rank of the group (rows, then weights), whichever of the outputs the graph used."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        weights: torch.Tensor,
        row_splits: tuple[list[int], list[int]],
        slot_splits: tuple[list[int], list[int]],
        group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.row_splits, ctx.slot_splits, ctx.group = row_splits, slot_splits, group
        return _all_to_all(rows, *row_splits, group), _all_to_all(weights, *slot_splits, group)

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor, grad_weights: torch.Tensor) -> tuple[Any, ...]:
        (rows_out, rows_in), (slots_out, slots_in) = ctx.row_splits, ctx.slot_splits
        return (
            _all_to_all(grad_rows, rows_in, rows_out, ctx.group),
            _all_to_all(grad_weights, slots_in, slots_out, ctx.group),
            None,
            None,
            None,
        )


def _all_to_all(rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    import torch.distributed as dist

    out = rows.new_empty((sum(out_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
    return out


class ExpertParallel:
    """One plugin's expert parallelism: its process groups (created at the first :meth:`shard`) and the experts
    modules it sharded (a weak map)."""

    def __init__(self, ep_size: int, path: str) -> None:
        self.ep_size = ep_size
        self.path = path
        self.groups: ExpertParallelGroups | None = None
        self._shards: WeakKeyDictionary[Any, ExpertShard] = WeakKeyDictionary()

    def shard_of(self, module: Any) -> ExpertShard | None:
        """The shard this process holds of ``module``, or ``None`` when the module was not sharded."""
        return self._shards.get(module)

    def is_sharded(self, name: str, module: Any) -> bool:
        """Module selector (``(qualified_name, module)``) of the sharded experts modules."""
        return module in self._shards

    # ------------------------------------------------------------------------------------------- sharding
    def shard(self, model: torch.nn.Module, experts: list[tuple[str, Any, tuple[str, ...]]]) -> list[str]:
        """Keep this process's experts of every experts module (in place) and exclude them from DDP.

        Args:
            model: the model that will be passed to the data-parallel wrapper (parameter names are relative to it).
            experts: ``(path, module, parameter attribute names)`` of each experts module; every named parameter
                has the layer's experts on its first dimension.

        Returns:
            The qualified names of the parameters sharded now (modules sharded before are skipped).

        Raises:
            AccelerationConfigError: no process group, a parameter already sharded by FSDP, or a first dimension
                that ``ep_degree`` does not divide.
        """
        from torch.distributed.tensor import DTensor
        from torch.nn.parallel import DistributedDataParallel

        if self.groups is None:
            self.groups = ExpertParallelGroups.create(self.ep_size, self.path)
        groups = self.groups
        sharded: list[str] = []
        for path, module, names in experts:
            if module in self._shards:
                continue
            params = [(n, getattr(module, n)) for n in names]
            total = params[0][1].shape[0]
            for name, param in params:
                where = f"{path}.{name}"
                if isinstance(param, DTensor):
                    raise AccelerationConfigError(
                        f"expert parameter {where} is already sharded by FSDP, so expert parallelism cannot own it",
                        path=self.path,
                        fix="let the acceleration framework prepare the model (Accelerator.prepare) before any "
                        "fully_shard of the layers, or set ep_degree: 1",
                    )
                if param.shape[0] != total or total % groups.ep_size:
                    raise AccelerationConfigError(
                        f"expert parameter {where} has shape {tuple(param.shape)}: its first dimension must be the "
                        f"layer's {total} experts, a multiple of ep_degree {groups.ep_size}",
                        path=self.path,
                        fix="set ep_degree to a divisor of the number of experts",
                    )
            count = total // groups.ep_size
            first = groups.ep_rank * count
            for name, param in params:
                with torch.no_grad():
                    param.data = param.data[first : first + count].clone()
                if param.requires_grad:
                    param.register_hook(self._expert_grad_hook)
                sharded.append(f"{path}.{name}" if path else name)
            self._shards[module] = ExpertShard(first, count, total, tuple(names))
        if sharded:
            ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [*ignored, *(n for n in sharded if n not in ignored)]
            )
        return sharded

    def _expert_grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        """Expert gradient of one backward: mean over the world's processes (see the module docstring)."""
        import torch.distributed as dist

        groups = self.groups
        assert groups is not None
        grad = grad / groups.world_size
        if groups.replica_group is not None:
            dist.all_reduce(grad, group=groups.replica_group)
        return grad

    # ------------------------------------------------------------------------------------------- forward
    def experts_forward(
        self,
        shard: ExpertShard,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        local_experts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        zero_terms: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The experts of one layer over the EP group.

        Args:
            shard: this process's experts of the layer.
            hidden: (T, H) this process's tokens.
            top_k_index: (T, k) global expert ids.
            top_k_weights: (T, k) routing weights.
            local_experts: ``(rows (M, H), local ids (M, 1), weights (M, 1)) -> (M, H)``: the local experts, each
                row's output times its weight.
            zero_terms: a zero scalar that depends on the local expert parameters (keeps their gradients, zero,
                in the graph when no row came to this process).

        Returns:
            (T, H) in ``hidden``'s dtype.

        Every (token, destination rank) pair sends one row whatever the number of its slots on that rank (see the
        module docstring's Dispatch section).
        """
        import torch.distributed as dist

        groups = self.groups
        assert groups is not None
        ep, group = groups.ep_size, groups.ep_group
        tokens = top_k_index.shape[0]
        flat = top_k_index.reshape(-1)
        slot_token = torch.arange(tokens, device=flat.device).repeat_interleave(top_k_index.shape[1])
        owner = torch.div(flat, shard.count, rounding_mode="floor")
        # the distinct (token, destination) pairs, grouped by destination then ordered by token: the sent rows
        pair_key = owner * tokens + slot_token
        hit = torch.zeros(ep * tokens, dtype=torch.bool, device=flat.device)
        hit[pair_key] = True
        pair_of_key = torch.cumsum(hit, 0) - 1  # a key's row among all the sent rows
        pair_token = hit.nonzero().squeeze(1) % tokens
        row_counts = hit.view(ep, tokens).sum(1)
        slot_counts = torch.bincount(owner, minlength=ep)
        row_starts = torch.cumsum(row_counts, 0) - row_counts
        # the slots in row order (grouped by destination too), each naming its row within its destination's rows
        slot_pair = pair_of_key.index_select(0, pair_key)
        order = torch.argsort(slot_pair, stable=True)
        slot_owner = owner.index_select(0, order)
        meta = torch.stack(
            (slot_pair.index_select(0, order) - row_starts.index_select(0, slot_owner),
             flat.index_select(0, order) - slot_owner * shard.count),
            dim=1,
        )  # fmt: skip
        counts = torch.stack((row_counts, slot_counts), dim=1)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
        (send_rows, send_slots), (recv_rows, recv_slots) = counts.T.tolist(), recv_counts.T.tolist()
        recv_meta = _all_to_all(meta, recv_slots, send_slots, group)
        rows, weights = _Dispatch.apply(
            hidden.index_select(0, pair_token),
            top_k_weights.reshape(-1).index_select(0, order),
            (recv_rows, send_rows),
            (recv_slots, send_slots),
            group,
        )
        if recv_meta.shape[0]:
            # a received slot's row: its source's first row in the receive buffer + the index the source sent
            source_starts = torch.cumsum(recv_counts[:, 0], 0) - recv_counts[:, 0]
            sources = torch.arange(ep, device=flat.device).repeat_interleave(
                recv_counts[:, 1], output_size=recv_meta.shape[0]
            )
            row_index = source_starts.index_select(0, sources) + recv_meta[:, 0]
            computed = local_experts(rows.index_select(0, row_index), recv_meta[:, 1:], weights.unsqueeze(1))
            combined = _sum_rows(computed, row_index, rows.shape[0]).to(computed.dtype)
        else:  # keep the backward all-to-alls (which the other processes wait for) and the experts in the graph
            combined = rows * 0 + zero_terms().to(rows.dtype)
        back = _AllToAll.apply(combined, send_rows, recv_rows, group)
        return _sum_rows(back, pair_token, tokens).to(hidden.dtype)

    # ------------------------------------------------------------------------------------------- saving
    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every expert of every layer (a collective: every process calls it).

        Expert slices are all-gathered in their EP group; FSDP2-sharded tensors (``DTensor``) are gathered to full
        tensors too, so the result is the unsharded model's state dict under its own names, on every process.
        """
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        state = model.state_dict()
        for key, value in list(state.items()):
            if isinstance(value, DTensor):
                state[key] = value.full_tensor()
        groups = self.groups
        if groups is None:
            return state
        for prefix, module in model.named_modules():
            shard = self._shards.get(module)
            if shard is None:
                continue
            for name in shard.names:
                key = f"{prefix}.{name}" if prefix else name
                local = getattr(module, name).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(groups.ep_size)]
                dist.all_gather(parts, local, group=groups.ep_group)
                state[key] = torch.cat(parts)
        return state


__all__ = ["ExpertParallel", "ExpertParallelGroups", "ExpertShard"]
