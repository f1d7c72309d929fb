"""FluidTokenDispatcher: permute, uneven all-to-all dispatch, expert-major sort, and back.

Shape legend: T local tokens, H hidden, E experts, P = ep size, G = num_local_experts (E = P*G),
R = rows this rank sends (T*topk when dropless), C = number of pipeline chunks.

One forward, in order (the stage names are Megatron's MoEAlltoAllTokenDispatcher's):
  1. `dispatch_preprocess(hidden, routing_map, probs)`:
     counts_E = routing_map.sum(0) on the device; an equal-split all-to-all of counts_E over the EP
     group gives recv_PG (rows each rank sends to each of this rank's experts); both are copied to
     the host *at once* (non_blocking into pinned memory on CUDA) and the copy is only waited for
     at the first all-to-all, after the permutation kernels were queued. That is the layer's only
     device->host synchronization; at EP = 1 (one chunk, dropless) the forward has none: nothing
     is sent, the grouped GEMM takes device offsets, and the host counts are read only where
     needed (HostCounts). Permutation (as megatron.core.transformer.moe.moe_utils.permute,
     unfused): rows expert-major, and with C > 1 chunk-major first (see `chunk_of_rows`).
  2. `token_dispatch` / `launch_dispatch` (or `dispatch_chunks` + `launch_dispatch_part`, for the
     caller that orders launches itself, FluidMoELayer.forward): per chunk, one all-to-all of the
     rows and one of their probs through `fluid_all_to_all` (uneven splits; async, so the caller
     can compute meanwhile).
  3. `dispatch_postprocess(tokens, probs, chunk)`: received rows are ordered (source rank, local
     expert); reorder them to (local expert, source rank) so each expert's rows are contiguous.
  4. experts run on the chunk (FluidGroupedMLP).
  5. `combine_preprocess(out, chunk)`: the inverse reorder; `token_combine` / `launch_combine`:
     the all-to-all back with the splits swapped.
  6. `combine_postprocess(chunks)`: concatenate the chunks (the order rows were sent in) and
     unpermute (scatter-add of each token's top-k rows, as Megatron's unfused unpermute).

Chunking (forward pipelining): every (expert e, sending rank) segment of n rows is cut into C
pieces at rows floor(c*n/C). Both sides know n (the sender from counts_E, the receiver from
recv_PG), so every chunk's splits follow from the one count exchange, with no extra
communication or synchronization; chunk c+1's all-to-all then overlaps chunk c's experts.
Each row is computed exactly as with C = 1; only GEMM row blocking and the order of the top-k
additions in the unpermute differ.

Deduplicated dispatch (`dedup=True`, chunks 1, no capacity factor; DeepEP's idea): a token routed
to several experts of one rank is sent to that rank once, with the probs and routing mask of that
rank's G experts beside it (`[rows, 2G]`, probs dtype), and the receiver copies it to each of its
experts. The expert inputs are then the same rows in the same order as without dedup
(expert-major, source rank, token). The combine goes back deduplicated too: the expert rank sums a
token's expert outputs (one index_add per local expert) and sends one row per (token, rank); the
source adds the ranks' rows rank by rank. With top-1 and top-2 each token's output is the same
one- or two-term bf16 sum as stock's unpermute, so the forward is bit-identical to the plain
dispatch; with more terms only their grouping differs. The backward of the combine copies
gradients exactly as the plain path does; the dispatch backward sums a token's gradient copies on
the expert rank first, then across ranks. Every all-to-all of the layer then carries one row per
distinct (token, rank) pair: with uniform routing 56% of the plain rows for 64 experts top-6 on 4
ranks, 93% for 8 experts top-2. The row count must be known before the permutation, so the host
sync comes before the permutation kernels instead of after them.

Metadata of the forward in flight lives in `self.plan` (a DispatchPlan), because Megatron's stage
methods are called one after another without passing it; the dispatcher is therefore not
re-entrant (one forward at a time per layer, as Megatron's own dispatchers). Megatron's
combined-1F1B schedule keeps to that: it runs one layer's forward stages back to back
(TransformerLayerSchedulePlan.run) and the other micro-batch's backward reads only its autograd
graph. Its stages run on two streams, though: called through the stage API (`staged=True`, the
default of `dispatch_preprocess`), the plan's device tensors a later stage reads (`offs`,
`sorted_indices`) are handed over with an event and `record_stream` (fluid.moe.handoff).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import unpermute

from fluid.comm import CommContext, fluid_all_to_all
from fluid.comm.context import current_stream
from fluid.moe.counts import HostCounts, PendingCounts, local_offsets
from fluid.moe.grouped_gemm import offsets_for
from fluid.moe.handoff import Handoff


def chunk_bounds(n: int, num_chunks: int) -> list[int]:
    """Row boundaries `floor(c*n/C)`, c = 0..C, of a segment of n rows cut into C chunks."""
    return [c * n // num_chunks for c in range(num_chunks + 1)]


def chunk_of_rows(offset_in_segment: torch.Tensor, segment_len: torch.Tensor, num_chunks: int):
    """Chunk index of each row given its offset o in a segment of n rows (inverse of chunk_bounds).

    Row o is in chunk c iff floor(c*n/C) <= o < floor((c+1)*n/C), i.e. c = floor(((o+1)*C-1)/n).
    """
    return torch.div((offset_in_segment + 1) * num_chunks - 1, segment_len, rounding_mode="floor")


class _SegmentedIndexAdd(torch.autograd.Function):
    """`segmented_index_add` with a one-kernel backward.

    Autograd through the per-segment `index_add_` calls gave each segment's `src` slice its own
    SliceBackward (a zero fill of all of `src`'s shape plus a copy) and summed the G slices (G
    full-size adds): with 32 local experts about 33 fills and 33 adds per layer backward. The
    gradient of `src` is `grad[index]` row by row whatever the segmentation, so one index_select
    gives the same values (a gather; the old sum only added zeros to each row)."""

    @staticmethod
    def forward(ctx, dst, index, src, counts):
        start = 0
        for n in counts:
            dst.index_add_(0, index[start : start + n], src[start : start + n])
            start += n
        ctx.mark_dirty(dst)
        ctx.save_for_backward(index[:start])
        return dst

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad_src = grad.index_select(0, index) if ctx.needs_input_grad[2] else None
        return grad, None, grad_src, None


def segmented_index_add(dst, index, src, counts) -> torch.Tensor:
    """`dst.index_add_(0, index, src)` one segment of `counts` rows at a time, in order.

    Within a segment the indices are distinct, so no two atomic adds meet and the sum order is
    fixed (segment 0 first): deterministic on CUDA too. `dst` joins the autograd graph (and the
    collective backward runs) on a rank with no rows too. Backward: `_SegmentedIndexAdd`."""
    return _SegmentedIndexAdd.apply(dst, index, src, tuple(int(n) for n in counts))


def check_dedup_settings(config, num_chunks: int) -> None:
    """Deduplicated dispatch is implemented for chunks 1 and dropless routing only."""
    from fluid.config import FluidConfigError

    if num_chunks != 1:
        raise FluidConfigError(
            f"--fluid-moe-dedup on (deduplicated dispatch) needs --fluid-moe-chunks 1, got "
            f"{num_chunks}: drop one of them"
        )
    if config.moe_expert_capacity_factor is not None:
        raise FluidConfigError(
            "--fluid-moe-dedup on (deduplicated dispatch) does not support "
            "--moe-expert-capacity-factor (token dropping): unset one of them"
        )


@dataclass
class DispatchPlan:
    """Host-side routing metadata of one forward (all lists are host ints).

    Attributes:
        send_splits: `[C][P]` rows this rank sends to each rank, per chunk.
        recv_splits: `[C][P]` rows this rank receives from each rank, per chunk.
        recv_counts: `[C][P*G]` received rows per (source rank, local expert), row-major.
        tokens_per_expert: `[C][G]` rows per local expert, per chunk. At EP = 1 with one chunk
            (dropless) both are one HostCounts, read from the device only where a value is used.
        sorted_indices: `[R]` the token index of every sent row (device); with dedup the rows
            are one per (token, destination rank), rank-major, tokens ascending within a rank.
        offs: per chunk, int32 cumulative tokens_per_expert on the GPU (None on CPU).
        expand_rows: dedup only, `[N]` the received row each expert-major row was copied from.
        local_offs: EP = 1 with one chunk (`_finish_local_plan`): the int32 offsets made from the
            device counts in dispatch_preprocess, on the stream that made the counts (None on CPU).
        staged: built through the stage API (`dispatch_preprocess(staged=True)`): the stages may
            run on different streams, so `indices_handoff` / `offs_handoff` carry sorted_indices
            (pre-dispatch stage) and offs (dispatch stage) to their readers (experts, combine).
    """

    hidden_shape: torch.Size
    num_tokens: int
    routing_map: torch.Tensor
    sorted_indices: torch.Tensor
    send_splits: list = field(default_factory=list)
    recv_splits: list = field(default_factory=list)
    recv_counts: list = field(default_factory=list)
    tokens_per_expert: list = field(default_factory=list)
    offs: list = field(default_factory=list)
    expand_rows: Optional[torch.Tensor] = None
    staged: bool = False
    indices_handoff: Optional[Handoff] = None
    offs_handoff: Optional[Handoff] = None
    local_offs: Optional[torch.Tensor] = None

    def offs_for_chunk(self, chunk: int) -> Optional[torch.Tensor]:
        """`offs[chunk]`, usable on the current stream (see `staged`)."""
        if self.offs_handoff is not None:
            return self.offs_handoff.take()[chunk]
        return self.offs[chunk]

    def indices(self) -> torch.Tensor:
        """`sorted_indices`, usable on the current stream (see `staged`)."""
        if self.indices_handoff is not None:
            return self.indices_handoff.take()[0]
        return self.sorted_indices


class FluidTokenDispatcher:
    """All-to-all token dispatcher over the expert-parallel group (expert TP size 1).

    Args:
        num_local_experts: G.
        local_expert_indices: the G consecutive global expert ids of this rank.
        config: TransformerConfig (num_moe_experts, moe_router_topk, capacity settings).
        comm: CommContext of the EP group (its stream carries the all-to-alls).
        num_chunks: C, forward pipelining depth (1 = off).
        dedup: send a token once per destination rank (see the module docstring).
    """

    def __init__(
        self,
        num_local_experts,
        local_expert_indices,
        config,
        comm: CommContext,
        num_chunks=1,
        dedup=False,
    ):
        if num_chunks < 1:
            raise ValueError(f"--fluid-moe-chunks must be >= 1, got {num_chunks}")
        self.dedup = bool(dedup)
        if self.dedup:
            check_dedup_settings(config, num_chunks)
        self.config = config
        self.comm = comm
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.num_experts = config.num_moe_experts
        self.ep_size = comm.size
        self.num_chunks = num_chunks
        self.dynamic_rows = config.moe_expert_capacity_factor is not None
        self.plan: Optional[DispatchPlan] = None
        self._pending: Optional[PendingCounts] = None
        self.shared_experts = None

    # -- 1. metadata + permutation ------------------------------------------------------------
    def _counts_all_to_all(self, send: torch.Tensor, staged: bool) -> torch.Tensor:
        """Equal-split all-to-all of a small count vector over the EP group, waited.

        Staged (Megatron's combined-1F1B schedule), the pre-dispatch stage runs on the compute
        stream while the other micro-batch's all-to-alls of this group run on the CommContext
        stream. ProcessGroupNCCL runs a synchronous collective on the current stream, so two
        collectives of one communicator could run concurrently, in an order that may differ
        between ranks (a hang). Through the CommContext every collective of the group stays on
        one stream, in the order the host issued them, which is the same on every rank."""
        recv = torch.empty_like(send)
        if staged and self.comm.is_nccl:
            self.comm.all_to_all_single(recv, send, None, None).wait()
        else:
            dist.all_to_all_single(recv, send, group=self.comm.group)
        return recv

    def _exchange_counts(self, routing_map: torch.Tensor, staged: bool) -> torch.Tensor:
        """`[E]` local counts and `[P*G]` received counts, concatenated on the device; with P = 1
        only the `[E]` local counts (they are the received ones: no cat kernel)."""
        counts_E = routing_map.sum(dim=0).long()
        if self.ep_size == 1:
            return counts_E
        return torch.cat([counts_E, self._counts_all_to_all(counts_E, staged)])

    def _permutation(self, routing_map: torch.Tensor, counts_E: torch.Tensor, num_rows: int):
        """Flat indices into `routing_map.T` of the rows to send, chunk-major then expert-major."""
        num_tokens = routing_map.shape[0]
        flat = routing_map.bool().T.contiguous().reshape(-1)
        flat_sorted = flat.argsort(descending=True, stable=True)[:num_rows]
        if self.num_chunks > 1 and num_rows > 0:
            expert = torch.div(flat_sorted, num_tokens, rounding_mode="floor")
            starts = torch.cumsum(counts_E, 0) - counts_E
            offset = torch.arange(num_rows, device=flat.device) - starts[expert]
            chunk = chunk_of_rows(offset, counts_E[expert], self.num_chunks)
            order = (chunk * self.num_experts + expert).argsort(stable=True)
            flat_sorted = flat_sorted[order]
        return flat_sorted

    def dispatch_preprocess(self, hidden_states, routing_map, probs, *, staged: bool = True):
        """`[S, B, H]` or `[T, H]` tokens -> permuted rows `[R, H]` and their probs `[R]`
        (dedup: one row per (token, destination rank), `[R, H]` and `[R, 2G]`).

        `staged`: the later stages may run on other streams (Megatron's stage API, the default;
        see DispatchPlan.staged). FluidMoELayer.forward, all on one stream, passes False."""
        assert routing_map.dim() == 2 and routing_map.dtype == torch.bool
        if self.dedup:
            check_dedup_settings(self.config, self.num_chunks)
            out = self._dedup_preprocess(hidden_states, routing_map, probs, staged)
        else:
            out = self._plain_preprocess(hidden_states, routing_map, probs, staged)
        if staged:  # the combine stage's unpermute reads sorted_indices (and saves it)
            plan = self._current_plan()
            plan.staged = True
            plan.indices_handoff = Handoff(plan.sorted_indices)
        return out

    def _plain_preprocess(self, hidden_states, routing_map, probs, staged):
        hidden_shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_shape[-1])
        num_tokens = hidden.shape[0]
        counts = self._exchange_counts(routing_map, staged)
        self._pending = PendingCounts(counts)
        counts_E = counts[: self.num_experts]
        if self.dynamic_rows:  # token dropping: the row count is data-dependent, sync here
            num_rows = sum(self._pending.get()[: self.num_experts])
        else:
            num_rows = num_tokens * self.config.moe_router_topk
        flat_sorted = self._permutation(routing_map, counts_E, num_rows)
        sorted_indices = flat_sorted % num_tokens if num_tokens else flat_sorted
        self.plan = DispatchPlan(hidden_shape, num_tokens, routing_map, sorted_indices)
        if self._local_plan_applies():  # on this stage's stream, where counts_E was made
            self.plan.local_offs = local_offsets(counts_E)
        permuted = hidden.index_select(0, sorted_indices)
        # index_select, not [flat_sorted]: same gather, but its backward is a fill + one index_add
        # instead of index_put(accumulate=True), which sorts the indices on CUDA (several
        # kernels); the indices are distinct, so both write each gradient once into zeros.
        permuted_probs = probs.T.contiguous().reshape(-1).index_select(0, flat_sorted)
        return permuted, permuted_probs

    # -- 1'. deduplicated dispatch (see the module docstring) ---------------------------------
    def _dedup_preprocess(self, hidden_states, routing_map, probs, staged):
        E, G, P = self.num_experts, self.num_local_experts, self.ep_size
        hidden_shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_shape[-1])
        T = hidden.shape[0]
        map3 = routing_map.reshape(T, P, G)
        rank_map = map3.any(dim=2)  # [T, P] token goes to rank
        counts_E = routing_map.sum(dim=0).long()  # [E] rows per expert (full volume)
        uniq_P = rank_map.sum(dim=0).long()  # [P] distinct tokens per destination rank
        send = torch.cat([counts_E.view(P, G), uniq_P.view(P, 1)], dim=1).reshape(-1)
        recv = send
        if P > 1:
            recv = self._counts_all_to_all(send, staged)
        self._pending = PendingCounts(torch.cat([counts_E, uniq_P, recv]))
        host = self._pending.get()  # the one sync: the row count sizes the permutation below
        num_send = sum(host[E : E + P])
        # Rows to send: rank-major, tokens ascending within a rank.
        flat = rank_map.T.contiguous().reshape(-1)  # [P*T]
        flat_sorted = flat.argsort(descending=True, stable=True)[:num_send]
        token = flat_sorted % T if T else flat_sorted
        dest = torch.div(flat_sorted, T, rounding_mode="floor") if T else flat_sorted
        rows = hidden.index_select(0, token)
        # [R, G] rows (token, dest) of the [T*P, G] views, differentiable. index_select rather
        # than [token, dest]: the same gather, and the (distinct) rows' backward is one index_add
        # instead of index_put(accumulate=True), which sorts the indices on CUDA.
        pair = dest.add(token, alpha=P)  # token * P + dest
        local_probs = probs.reshape(T * P, G).index_select(0, pair)
        local_mask = map3.reshape(T * P, G).index_select(0, pair).to(local_probs.dtype)
        meta = torch.cat([local_probs, local_mask], dim=1)  # [R, 2G]
        self.plan = DispatchPlan(hidden_shape, T, routing_map, token)
        return rows, meta

    def _finish_dedup_plan(self, plan: DispatchPlan) -> DispatchPlan:
        E, G, P = self.num_experts, self.num_local_experts, self.ep_size
        host = self._take_pending()
        uniq, recv = host[E : E + P], host[E + P :]
        recv_rg = [recv[r * (G + 1) + g] for r in range(P) for g in range(G)]
        plan.send_splits.append(list(uniq))
        plan.recv_splits.append([recv[r * (G + 1) + G] for r in range(P)])
        plan.recv_counts.append(recv_rg)
        tpe = [sum(recv_rg[r * G + g] for r in range(P)) for g in range(G)]
        plan.tokens_per_expert.append(tpe)
        plan.offs.append(offsets_for(tpe, plan.sorted_indices.device))
        return plan

    def _dedup_expand(self, tokens, meta, plan: DispatchPlan):
        """Received `[R, H]` rows and `[R, 2G]` meta -> expert-major rows `[N, H]`, probs `[N]`.

        Rows of expert g are those whose mask bit g is set, in received order (source rank, then
        token): the order `_reorder` gives without dedup. Sizes come from the host counts, so
        there is no sync here."""
        G = self.num_local_experts
        R = tokens.shape[0]
        n = sum(plan.tokens_per_expert[0])
        # One transposed copy `[2G, R]` for both halves: its first G*R entries are the probs
        # `[G, R]` flattened, so idx (< G*R) indexes them directly, and backward needs no
        # slice_backward (zero fill + copy) of meta[:, :G].
        meta_T = meta.T.contiguous()
        mask_GR = meta_T[G:] > 0.5
        idx = mask_GR.reshape(-1).argsort(descending=True, stable=True)[:n]
        row = idx % R if R else idx
        plan.expand_rows = row
        # index_select: distinct indices, a cheaper backward than [idx] (see _plain_preprocess)
        probs = meta_T.reshape(-1).index_select(0, idx)
        return tokens.index_select(0, row), probs

    def _dedup_reduce(self, out, plan: DispatchPlan):
        """Expert-major rows `[N, H]` -> one row per received (token, source rank) `[R', H]`: the
        sum of that token's expert outputs on this rank, local expert by local expert."""
        partial = out.new_zeros((sum(plan.recv_splits[0]), out.shape[1]))
        return segmented_index_add(partial, plan.expand_rows, out, plan.tokens_per_expert[0])

    def _current_plan(self) -> DispatchPlan:
        """The plan of the forward in flight; the stages after dispatch_preprocess read it."""
        if self.plan is None:
            raise RuntimeError(
                "FluidTokenDispatcher: no dispatch plan; call dispatch_preprocess first"
            )
        return self.plan

    def _pop_pending(self) -> PendingCounts:
        """The counts dispatch_preprocess sent on their way to the host, forgotten here."""
        if self._pending is None:
            raise RuntimeError(
                "FluidTokenDispatcher: no counts pending; call dispatch_preprocess first"
            )
        pending, self._pending = self._pending, None
        return pending

    def _take_pending(self) -> list[int]:
        """The host counts dispatch_preprocess sent on their way (waits once), then forgets them."""
        return self._pop_pending().get()

    def _finish_plan(self) -> DispatchPlan:
        """Turn the host counts into per-chunk splits (waits for the device->host copy once)."""
        plan = self._current_plan()
        if plan.send_splits:
            return plan
        if self.dedup:
            self._finish_dedup_plan(plan)
        else:
            self._finish_chunk_plan(plan)
        if plan.staged:  # offs are read by the experts stage, maybe on another stream
            plan.offs_handoff = Handoff(*plan.offs)
        return plan

    def _local_plan_applies(self) -> bool:
        """EP = 1, one chunk, dropless (the deduplicated dispatch builds its own plan), and no
        emulated link: over one (fluid.comm.emulated_link) the layer takes the EP > 1 plan and
        waits for the host counts once per forward, as it does for split sizes over a real
        group, so emulated runs keep that wait and compare chunked with plain as EP > 1 would."""
        return (
            self.ep_size == 1
            and self.num_chunks == 1
            and not self.dynamic_rows
            and self.comm.emulated_link is None
        )

    def _finish_local_plan(self, plan: DispatchPlan) -> DispatchPlan:
        """EP = 1, one chunk, dropless: no split needs the host counts (all R rows stay here),
        the grouped GEMM's offsets come from the device counts, and tokens_per_expert is a
        HostCounts read only where a value is needed. So the forward does not wait for the
        device: it waited once per MoE layer before, and then the host queued the rest of the
        layer with the GPU idle (the host-bound 64-expert model on one H200,
        docs/benchmarks/breakdown.md)."""
        rows = plan.sorted_indices.shape[0]
        counts = HostCounts(self._pop_pending())
        plan.send_splits.append([rows])
        plan.recv_splits.append([rows])
        plan.recv_counts.append(counts)
        plan.tokens_per_expert.append(counts)
        plan.offs.append(plan.local_offs)
        return plan

    def _finish_chunk_plan(self, plan: DispatchPlan) -> DispatchPlan:
        E, G, P, C = self.num_experts, self.num_local_experts, self.ep_size, self.num_chunks
        if self._local_plan_applies():
            return self._finish_local_plan(plan)
        counts = self._take_pending()
        local = counts[:E]
        recv = counts[E:] if P > 1 else local  # P = 1: `_exchange_counts` sent only local
        local_b = [chunk_bounds(n, C) for n in local]
        recv_b = [chunk_bounds(n, C) for n in recv]
        for c in range(C):
            per_e = [b[c + 1] - b[c] for b in local_b]
            per_rg = [b[c + 1] - b[c] for b in recv_b]
            plan.send_splits.append([sum(per_e[r * G : (r + 1) * G]) for r in range(P)])
            plan.recv_splits.append([sum(per_rg[r * G : (r + 1) * G]) for r in range(P)])
            plan.recv_counts.append(per_rg)
            tpe = [sum(per_rg[r * G + g] for r in range(P)) for g in range(G)]
            plan.tokens_per_expert.append(tpe)
            plan.offs.append(offsets_for(tpe, plan.sorted_indices.device))
        return plan

    # -- 2. dispatch all-to-all ---------------------------------------------------------------
    def dispatch_chunks(self, permuted, permuted_probs):
        """Everything the dispatch all-to-alls need, prepared so that chunks can be launched in
        any later order without waiting for the compute queued meanwhile (`launch_dispatch_part`).

        Returns `(parts, ready)`: `parts[c] = ((rows, recv_rows), (probs, recv_probs))`, the
        contiguous send views (`[R_c, H]`, `[R_c, ...]`) and their receive buffers, allocated
        here, before `ready` (an event marking all of them written; None on CPU) is recorded.
        """
        plan = self._finish_plan()
        rows = [sum(s) for s in plan.send_splits]
        parts = []
        if rows == [permuted.shape[0]]:  # one chunk: a 1-piece split's backward is a full copy
            pieces = [permuted], [permuted_probs]
        else:
            pieces = permuted.split(rows), permuted_probs.split(rows)
        for c, (x, p) in enumerate(zip(*pieces, strict=True)):
            n = sum(plan.recv_splits[c])
            parts.append(((x, x.new_empty((n, *x.shape[1:]))), (p, p.new_empty((n, *p.shape[1:])))))
        ready = None
        if permuted.is_cuda:
            ready = torch.cuda.Event()
            ready.record(current_stream(permuted.device.index))
        return parts, ready

    def launch_dispatch_part(self, part, chunk: int, ready=None):
        """Start the dispatch all-to-all of one `(send, recv)` part (rows or probs) of `chunk`
        from `dispatch_chunks`: returns `(received, handle)`."""
        plan = self._current_plan()
        x, out = part
        return fluid_all_to_all(
            self.comm,
            x,
            plan.recv_splits[chunk],
            plan.send_splits[chunk],
            async_op=True,
            ready=ready,
            out=out,
        )

    def launch_dispatch(self, permuted, permuted_probs):
        """Start every chunk's dispatch; returns `[(tokens, probs, handles)]` per chunk."""
        parts, ready = self.dispatch_chunks(permuted, permuted_probs)
        inflight = []
        for c, (x, p) in enumerate(parts):
            x_out, hx = self.launch_dispatch_part(x, c, ready)
            p_out, hp = self.launch_dispatch_part(p, c, ready)
            inflight.append((x_out, p_out, (hx, hp)))
        return inflight

    def token_dispatch(self, permuted, permuted_probs):
        """Megatron stage API: dispatch and wait; with C > 1 the chunks are concatenated."""
        if self.num_chunks != 1:
            raise RuntimeError("token_dispatch (stage API) needs --fluid-moe-chunks 1")
        ((x, p, handles),) = self.launch_dispatch(permuted, permuted_probs)
        for h in handles:
            h.wait()
        return x, p

    # -- 3. sort by local expert ----------------------------------------------------------------
    def _reorder(self, x, counts_rg, to_expert_major: bool):
        """(rank, expert)-major rows <-> (expert, rank)-major rows, given `[P*G]` counts."""
        G, P = self.num_local_experts, self.ep_size
        if G == 1 or P == 1:
            return x
        if to_expert_major:
            pieces = list(x.split(counts_rg))
            return torch.cat([pieces[r * G + g] for g in range(G) for r in range(P)])
        counts_gr = [counts_rg[r * G + g] for g in range(G) for r in range(P)]
        pieces = list(x.split(counts_gr))
        return torch.cat([pieces[g * P + r] for r in range(P) for g in range(G)])

    def dispatch_postprocess(self, tokens, probs, chunk: int = 0):
        """Received rows of `chunk` -> (rows grouped by local expert, tokens_per_expert, probs,
        offs); tokens_per_expert is a host list, offs the int32 GPU offsets or None."""
        plan = self._finish_plan()
        if self.dedup:
            tokens, probs = self._dedup_expand(tokens, probs, plan)
            return tokens, plan.tokens_per_expert[chunk], probs, plan.offs_for_chunk(chunk)
        counts = plan.recv_counts[chunk]
        expected = sum(plan.recv_splits[chunk])  # = sum(counts), without reading HostCounts
        if tokens.shape[0] != expected:
            raise RuntimeError(
                f"dispatch_postprocess: {tokens.shape[0]} received rows, the plan of this layer's "
                f"forward in flight expects {expected} (stages of two forwards interleaved?)"
            )
        tokens = self._reorder(tokens, counts, True)
        probs = self._reorder(probs, counts, True)
        return tokens, plan.tokens_per_expert[chunk], probs, plan.offs_for_chunk(chunk)

    # -- 5. combine -----------------------------------------------------------------------------
    def combine_preprocess(self, expert_out, chunk: int = 0):
        if self.dedup:
            return self._dedup_reduce(expert_out, self._current_plan())
        return self._reorder(expert_out, self._current_plan().recv_counts[chunk], False)

    def launch_combine(self, x, chunk: int = 0):
        plan = self._current_plan()
        return fluid_all_to_all(
            self.comm, x, plan.send_splits[chunk], plan.recv_splits[chunk], async_op=True
        )

    def token_combine(self, x):
        """Megatron stage API: the combine all-to-all of chunk 0, waited."""
        out, handle = self.launch_combine(x, 0)
        handle.wait()
        return out

    # -- 6. unpermute ---------------------------------------------------------------------------
    def combine_postprocess(self, rows):
        """Rows back in send order (a tensor, or the list of chunks) -> output like the input."""
        plan = self._current_plan()
        if isinstance(rows, (list, tuple)):
            rows = torch.cat(list(rows)) if len(rows) > 1 else rows[0]
        hidden = plan.hidden_shape[-1]
        if self.dedup:  # one row per (token, rank): add each rank's rows, rank by rank
            out = rows.new_zeros((plan.num_tokens, hidden))
            segmented_index_add(out, plan.indices(), rows, plan.send_splits[0])
            self.plan = None
            return out.view(plan.hidden_shape)
        out = unpermute(
            rows,
            plan.indices(),
            restore_shape=torch.Size((plan.num_tokens, hidden)),
            routing_map=plan.routing_map,
            fused=False,
        )
        self.plan = None
        return out.view(plan.hidden_shape)

    # -- FluidMoE v0.5's one-call form (thin wrappers over the stages above) --------------------
    def dispatch(self, hidden_states, routing_map, probs):
        """Stages 1-3 at once: `[S, B, H]` or `[T, H]` tokens, the router's `routing_map [T, E]`
        (bool) and `probs [T, E]` -> `(rows [N, H] grouped by local expert, tokens_per_expert
        (G host ints), row probs [N])`, ready for the experts. Needs --fluid-moe-chunks 1 (as
        `token_dispatch`); `combine` must follow before the next `dispatch`."""
        rows, row_probs = self.dispatch_preprocess(hidden_states, routing_map, probs)
        rows, row_probs = self.token_dispatch(rows, row_probs)
        rows, tokens_per_expert, row_probs, _ = self.dispatch_postprocess(rows, row_probs)
        return rows, tokens_per_expert, row_probs

    def combine(self, expert_output):
        """Stages 5-6 at once: the experts' `[N, H]` output of the last `dispatch` -> the layer
        output, shaped like the `hidden_states` given to it."""
        rows = self.token_combine(self.combine_preprocess(expert_output))
        return self.combine_postprocess(rows)
