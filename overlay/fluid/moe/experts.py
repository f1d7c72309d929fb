"""FluidGroupedMLP: all local experts in one grouped GEMM per projection, dW deferred.

Shape legend: T dispatched tokens (expert-major), H hidden, F expert FFN size
(`moe_ffn_hidden_size`), G = num_local_experts, F1 = 2F with a gated linear unit else F.

Weights are stored stacked for the grouped GEMM:
    weight1 `[G, F1, H]`  (fc1 of every local expert)
    weight2 `[G, H, F]`   (fc2)
but `state_dict()`, `load_state_dict()` and `sharded_state_dict()` present Megatron's
SequentialMLP layout (local spec, `MLP` experts with local Column/RowParallelLinear), so
checkpoints move both ways:
    local_experts.{g}.linear_fc1.weight `[F1, H]`, local_experts.{g}.linear_fc1._extra_state
    local_experts.{g}.linear_fc2.weight `[H, F]`,  local_experts.{g}.linear_fc2._extra_state
With a gated linear unit, SequentialMLP's fc1 rows are `[gate (F rows); up (F rows)]`: MLP.forward
does `x_glu, x_linear = chunk(fc1(x), 2, dim=-1)` and returns `act(x_glu) * (x_linear + offset)`
(megatron/core/transformer/mlp.py); weight1[g] is exactly that matrix, and the same chunk is used
here, so no re-ordering happens on conversion.

Forward per expert (as MLP.forward with `per_token_scale=probs`):
    h = x @ W1^T; a = act(h) or act(h_gate) * (h_up + glu_linear_offset) (clamped if configured);
    a = (a * probs).to(dtype); y = a @ W2^T.
Which path runs (decided per forward call, `FluidGroupedMLP.forward`):
  - `torch._grouped_mm` for all local experts at once (`use_grouped_mm`; `--fluid-grouped-gemm
    auto` keeps it for experts below LOOP_MIN_EXPERT_GFLOP), dW deferred to the BackwardScheduler;
  - large experts: one cuBLAS GEMM per expert, as the same composition (grouped_linear's loop);
  - large experts under Megatron DDP with dW inline: `fluid.moe.expert_loop.sequential_experts`,
    forward and backward one expert after another, each dW added into `main_grad[g]`.
All three give the same values per expert; the last two are bit-identical to each other.

With `bias_activation_fusion` (Megatron's default `--bias-swiglu-fusion`) the activation and the
probs scaling go through the same fused functions stock MLP calls (`weighted_bias_swiglu_impl`,
`weighted_bias_quick_geglu_impl`): same numerics as stock, and only h is saved for backward (the
unfused chain keeps act(h_gate), h_up + offset and a as well).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from fluid.moe.chunk_wgrad import ChunkedWgrad
from fluid.moe.counts import HostCounts
from fluid.moe.expert_loop import has_main_grad, sequential_experts
from fluid.moe.grouped_gemm import GroupedMMFallbacks, grouped_linear, offsets_for, use_grouped_mm
from fluid.moe.scale_rows import scale_rows
from fluid.runtime import runtime_for

_FC_NAMES = ("linear_fc1", "linear_fc2")


class FluidGroupedMLP(MegatronModule):
    """Experts module with the `ExpertsInterface` of Megatron's MoELayer.

    Args:
        num_local_experts: G.
        config: the TransformerConfig (moe_ffn_hidden_size, gated_linear_unit, activation_func,
            params_dtype, init methods).
        pg_collection: needs `.ep`, `.expt_tp` (size 1) and `.expt_dp` (for sharded_state_dict).
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection=None,
        name: Optional[str] = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            raise ValueError("FluidGroupedMLP needs an explicit pg_collection")
        if config.add_bias_linear:
            raise ValueError("FluidGroupedMLP does not support expert biases (add_bias_linear)")
        if config.use_te_activation_func:
            raise ValueError("FluidGroupedMLP does not support use_te_activation_func")
        if config.moe_latent_size:
            raise ValueError("FluidGroupedMLP does not support moe_latent_size")
        # The model's runtime (fluid.runtime): the scheduler that takes the dW, and
        # --fluid-grouped-gemm (auto|on|off; a bad value fails here, at build time).
        runtime = runtime_for(config)
        self.scheduler = runtime.scheduler
        self.grouped_gemm = runtime.config.grouped_gemm
        self.wgrad_accumulation = runtime.config.wgrad_accumulation  # --fluid-wgrad-accumulation
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.dp_group = pg_collection.expt_dp
        self.tp_group = pg_collection.expt_tp
        self.name = name or "experts"
        self.grouped_mm_fallbacks = GroupedMMFallbacks(self.name)
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        self.macs_per_row = hidden * fc1_out + ffn * hidden  # one row through one expert's MLP
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype
        self.weight1 = torch.nn.Parameter(
            torch.empty(num_local_experts, fc1_out, hidden, dtype=dtype, device=device)
        )
        self.weight2 = torch.nn.Parameter(
            torch.empty(num_local_experts, hidden, ffn, dtype=dtype, device=device)
        )
        if config.perform_initialization:
            with torch.no_grad():
                for g in range(num_local_experts):
                    config.init_method(self.weight1[g])
                    config.output_layer_init_method(self.weight2[g])
        # Expert parameters are reduced over the expert-DP group, not the full DP group: Megatron
        # DDP reads this attribute (as set by its linears for is_expert=True with EP > 1).
        expert_pgs = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size
        )
        for p in (self.weight1, self.weight2):
            p.allreduce = not expert_pgs  # type: ignore[attr-defined]  # Megatron DDP reads it
        if config.bias_activation_fusion and not (
            config.gated_linear_unit and config.activation_func in _fused_weighted_activations()
        ):
            raise ValueError(
                "FluidGroupedMLP: bias_activation_fusion with routing probs needs a gated SwiGLU "
                "or quick-GeGLU (as stock MLP); drop --bias-swiglu-fusion / bias_activation_fusion"
            )
        self._register_state_dict_hook(_to_sequential_layout)
        self._register_load_state_dict_pre_hook(_from_sequential_layout, with_module=True)

    # -- compute ------------------------------------------------------------------------------
    def _weighted_activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """`[T, F1]`, `[T]` -> `[T, F]`: act(h) scaled by each row's routing prob, in h's dtype."""
        cfg = self.config
        if cfg.bias_activation_fusion:  # stock MLP's fused path, same call and arguments
            from megatron.core.fusions.fused_bias_geglu import weighted_bias_quick_geglu_impl
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            if cfg.activation_func is torch.nn.functional.silu:
                return weighted_bias_swiglu_impl(
                    h, None, probs.unsqueeze(-1), cfg.activation_func_fp8_input_store
                )
            return weighted_bias_quick_geglu_impl(
                h,
                None,
                probs.unsqueeze(-1),
                cfg.activation_func_fp8_input_store,
                cfg.glu_linear_offset,
                cfg.activation_func_clamp_value,
            )
        # (a * probs).to(a.dtype) as stock MLP (probs may be fp32), in row blocks: one fp32 [T, F]
        # temporary for all local experts at once would cost G times stock's per-expert one.
        return scale_rows(self._activation(h), probs)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not cfg.gated_linear_unit:
            return cfg.activation_func(h)
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        if (val := cfg.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        return cfg.activation_func(x_glu) * (x_linear + cfg.glu_linear_offset)

    def forward(
        self,
        permuted_hidden: torch.Tensor,
        tokens_per_expert,
        permuted_probs: torch.Tensor,
        offs: Optional[torch.Tensor] = None,
        wgrad_merge: Optional[ChunkedWgrad] = None,
        chunk: int = 0,
    ):
        """Run every local expert on its rows.

        Args:
            permuted_hidden: `[T, H]`, rows of local expert g contiguous, g ascending.
            tokens_per_expert: G host ints (list, CPU tensor or the dispatcher's HostCounts)
                summing to T.
            permuted_probs: `[T]` routing probability of each row.
            offs: int32 `[G]` cumulative counts on the GPU for the grouped GEMM; computed
                from tokens_per_expert if None.
            wgrad_merge, chunk: forward pipelining: these rows are chunk `chunk` of the layer's
                forward, and fc1's and fc2's dW run once over every chunk's rows
                (fluid.moe.chunk_wgrad).

        Returns:
            `([T, H], None)` like Megatron's experts modules.
        """
        counts = _host_ints(tokens_per_expert)
        x = permuted_hidden
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1")
            x = (permuted_probs.unsqueeze(-1) * x).to(permuted_hidden.dtype)
            permuted_probs = torch.ones_like(permuted_probs)
        if not use_grouped_mm(x, counts, self.macs_per_row, self.grouped_gemm):
            inline = not self.scheduler.defers_dw()
            if inline and has_main_grad((self.weight1, self.weight2)) and wgrad_merge is None:
                # Per-expert GEMMs, dW inline anyway, and Megatron DDP's main_grad to add each
                # expert's dW into: run the experts one after another in backward too, as
                # SequentialMLP does, with stock's peak memory (see expert_loop). Not with
                # forward chunks, whose dW runs once over all of them (fluid.moe.chunk_wgrad)
                # whether the scheduler defers it or not, so on and off stay the same sums.
                out = sequential_experts(
                    x,
                    permuted_probs,
                    self.weight1,
                    self.weight2,
                    counts,
                    self._weighted_activation,
                    name=self.name,
                    scheduler=self.scheduler,
                    wgrad_accumulation=self.wgrad_accumulation,
                )
                return out, None
            offs = None  # grouped_linear's per-expert loop
        elif offs is None:
            offs = offsets_for(counts, permuted_hidden.device)
        kw = dict(
            fallbacks=self.grouped_mm_fallbacks,
            scheduler=self.scheduler,
            wgrad_accumulation=self.wgrad_accumulation,
        )
        merge1 = merge2 = None
        if wgrad_merge is not None:
            merge1, merge2 = wgrad_merge.part(chunk, "fc1"), wgrad_merge.part(chunk, "fc2")
        h = grouped_linear(
            x, self.weight1, counts, offs, name=f"{self.name}.fc1", merge=merge1, **kw
        )
        a = self._weighted_activation(h, permuted_probs)
        out = grouped_linear(
            a, self.weight2, counts, offs, name=f"{self.name}.fc2", merge=merge2, **kw
        )
        return out, None

    def backward_dw(self) -> None:
        """No-op: dW is deferred to the BackwardScheduler (fluid.schedule), not to this call."""

    # -- checkpoints ----------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """SequentialMLP's sharded layout: one `experts.` tensor set, sharded over global experts.

        Mirrors SequentialMLP.sharded_state_dict + MLP.sharded_state_dict for expert TP = 1:
        fc1 through `apply_swiglu_sharded_factory` when gated, replica id's DP entry from the
        expert-DP group. Each stacked weight is ONE ShardedTensorFactory whose `data` is the
        Parameter itself: Megatron's optimizers find a parameter's sharding by identity
        (`get_param_id_to_sharded_param_map`) and re-apply the factory to exp_avg etc., so
        optimizer state gets the same per-expert layout. Its build_fn yields expert g's
        ShardedTensors from `data[g]` (same keys, offsets and replica ids as SequentialMLP's);
        merge_fn stacks the loaded experts back, so a load returns `weight1`/`weight2`.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )
        from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        dp_cp_group = metadata["dp_cp_group"]
        singleton = metadata.get("singleton_local_shards", False)
        ep_size, ep_rank = self.ep_group.size(), self.ep_group.rank()
        num_global = ep_size * self.num_local_experts
        glu = self.config.gated_linear_unit

        def expert_offsets(g):
            """(global index, sharded offsets) of local expert g, as in SequentialMLP."""
            global_idx = ep_rank * self.num_local_experts + g
            if singleton:  # one key per expert, no expert axis
                return global_idx, sharded_offsets
            return global_idx, (*sharded_offsets, (len(sharded_offsets), global_idx, num_global))

        def factory(fc, weight, axis):
            suffix = f"{fc}.weight"

            @torch.no_grad()
            def build(key, t, replica_id, flattened_range):
                # key: f"{prefix}experts.{suffix}", optimizer-prefixed for optimizer state.
                if flattened_range is not None:
                    raise NotImplementedError("FluidGroupedMLP: flattened optimizer state")
                experts = []
                for g in range(self.num_local_experts):
                    global_idx, offsets = expert_offsets(g)
                    g_key = f"{key[: -len(suffix)]}{global_idx}.{suffix}" if singleton else key
                    sh_ten = make_tp_sharded_tensor_for_checkpoint(
                        t[g],
                        g_key,
                        axis,
                        replica_id=replica_id,
                        prepend_offsets=offsets,
                        tp_group=self.tp_group,
                        dp_cp_group=dp_cp_group,
                    )
                    if fc == "linear_fc1" and glu:  # [w, v]; built here, factories don't nest
                        sh_ten = apply_swiglu_sharded_factory(
                            sh_ten,
                            offsets,
                            singleton,
                            tp_group=self.tp_group,
                            dp_group=dp_cp_group,
                        ).build()
                    experts.append(sh_ten)
                return experts

            def merge(experts):
                return torch.stack([torch.cat(e) if isinstance(e, list) else e for e in experts])

            # Expert TP = 1: TP entry 0 as make_tp_sharded_tensor_for_checkpoint sets it.
            replica_id = (0, 0, self.dp_group.rank())
            return ShardedTensorFactory(
                f"{prefix}experts.{suffix}", weight, build, merge, replica_id
            )

        out = {
            f"{prefix}weight1": factory("linear_fc1", self.weight1, 0),
            f"{prefix}weight2": factory("linear_fc2", self.weight2, 1),
        }
        for g in range(self.num_local_experts):
            global_idx, offsets = expert_offsets(g)
            local_prefix = f"{prefix}local_experts.{g}."
            sharded_prefix = f"{prefix}experts.{global_idx}." if singleton else f"{prefix}experts."
            extra = {}
            for fc in _FC_NAMES:
                extra.update(
                    make_sharded_tensors_for_checkpoint(
                        {"_extra_state": None},
                        f"{local_prefix}{fc}.",
                        {},
                        offsets,
                        tp_group=self.tp_group,
                        dp_cp_group=dp_cp_group,
                    )
                )
            replace_prefix_for_sharding(extra, local_prefix, sharded_prefix)
            for sh_obj in extra.values():
                replica_id = sh_obj.replica_id
                assert len(replica_id) == 3, f"expected (PP, TP, DP) replica id, got {replica_id}"
                sh_obj.replica_id = (*replica_id[:2], self.dp_group.rank())
            out.update(extra)
        return out


def _fused_weighted_activations():
    from megatron.core.activations import quick_gelu

    return (torch.nn.functional.silu, quick_gelu)


def _host_ints(tokens_per_expert):
    """The counts as host ints; a HostCounts as it is (its values are read only where used)."""
    if isinstance(tokens_per_expert, HostCounts):
        return tokens_per_expert
    if isinstance(tokens_per_expert, torch.Tensor):
        return [int(c) for c in tokens_per_expert.tolist()]
    return [int(c) for c in tokens_per_expert]


def _to_sequential_layout(module: FluidGroupedMLP, state_dict, prefix: str, local_metadata):
    """state_dict hook: stacked `weight1/weight2` -> SequentialMLP per-expert keys."""
    w1 = state_dict.pop(f"{prefix}weight1")
    w2 = state_dict.pop(f"{prefix}weight2")
    for g in range(module.num_local_experts):
        for fc, w in zip(_FC_NAMES, (w1, w2), strict=True):
            state_dict[f"{prefix}local_experts.{g}.{fc}.weight"] = w[g]
            state_dict[f"{prefix}local_experts.{g}.{fc}._extra_state"] = None
    return state_dict


def _from_sequential_layout(module: FluidGroupedMLP, state_dict, prefix, *args):
    """load_state_dict pre-hook: SequentialMLP per-expert keys -> stacked `weight1/weight2`.

    A state dict that already has the stacked keys is left alone. Missing expert keys are left
    missing, so strict loading reports them by their stacked names.
    """
    for stacked, fc in (("weight1", "linear_fc1"), ("weight2", "linear_fc2")):
        keys = [f"{prefix}local_experts.{g}.{fc}.weight" for g in range(module.num_local_experts)]
        for g in range(module.num_local_experts):
            state_dict.pop(f"{prefix}local_experts.{g}.{fc}._extra_state", None)
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{stacked}"] = torch.stack([state_dict.pop(k) for k in keys])
