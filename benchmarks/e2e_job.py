"""End-to-end recipes: stock `pretrain_gpt.py` with the recipe's model, one torchrun per variant
and link, mock data, fixed seed; the log is parsed for per-iteration time, loss, TFLOP/s and
memory. A variant's fields become `pretrain_gpt.py` flags (`fluid_scheduler=False` ->
`--no-fluid-scheduler`). The dry run builds every command line and checks every flag name against
the TransformerConfig fields and TRAINING_FLAGS (and, where megatron.training is importable,
Megatron's own parse_args + validate_args and FluidMoE's build-time validation)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

from benchmarks import recipes as R
from benchmarks.tree import with_tree_path

ROOT = Path(__file__).resolve().parent.parent

# pretrain_gpt.py flags that are not TransformerConfig fields (training, data, optimizer, model
# structure that Megatron maps onto fields under other names). tests/cpu/test_recipes.py checks
# them against Megatron's parser where the full tree is present.
TRAINING_FLAGS = {
    "max-position-embeddings",
    "seq-length",
    "micro-batch-size",
    "global-batch-size",
    "num-experts",
    "swiglu",
    "position-embedding-type",
    "no-rope-fusion",
    "disable-bias-linear",
    "untie-embeddings-and-output-weights",
    "group-query-attention",
    "no-persist-layer-norm",
    "no-gradient-accumulation-fusion",
    "no-masked-softmax-fusion",
    "no-bias-dropout-fusion",
    "no-bias-swiglu-fusion",
    "mock-data",
    "tokenizer-type",
    "vocab-size",
    "split",
    "optimizer",
    "lr",
    "min-lr",
    "lr-decay-style",
    "lr-warmup-iters",
    "weight-decay",
    "adam-beta1",
    "adam-beta2",
    "adam-eps",
    "clip-grad",
    "seed",
    "train-iters",
    "log-interval",
    "eval-iters",
    "eval-interval",
    "log-throughput",
    "distributed-timeout-minutes",
    "attention-dropout",
    "hidden-dropout",
    "transformer-impl",
    "moe-router-load-balancing-type",
    "bf16",
}


def model_args(recipe: R.E2ERecipe, iters: int) -> list:
    """The pretrain_gpt.py arguments of the recipe's model (no Fluid flags)."""
    m = recipe.model_spec
    a = (
        f"--num-layers {m.layers} --hidden-size {m.hidden} --ffn-hidden-size {m.ffn} "
        f"--num-attention-heads {m.heads} --group-query-attention --num-query-groups {m.groups} "
        f"--kv-channels {m.head_dim} --max-position-embeddings {m.seq} --seq-length {m.seq} "
        f"--micro-batch-size {m.micro_batch} --global-batch-size {m.global_batch(recipe.dp)} "
        f"--num-experts {m.experts} --moe-router-topk {m.topk} --moe-ffn-hidden-size {m.ffn} "
    )
    if m.shared_ffn:
        a += f"--moe-shared-expert-intermediate-size {m.shared_ffn} "
    a += (
        f"--moe-token-dispatcher-type alltoall --moe-aux-loss-coeff {m.aux_loss_coeff} "
        "--moe-router-load-balancing-type aux_loss "
        f"--swiglu --normalization {m.normalization} --position-embedding-type {m.position_embedding} "
        "--no-rope-fusion --disable-bias-linear --untie-embeddings-and-output-weights "
        "--attention-dropout 0.0 --hidden-dropout 0.0 "
        "--bf16 --transformer-impl local --no-persist-layer-norm --no-gradient-accumulation-fusion "
        "--no-masked-softmax-fusion --no-bias-dropout-fusion --no-bias-swiglu-fusion "
        f"--mock-data --tokenizer-type NullTokenizer --vocab-size {m.vocab} --split 99,1,0 "
        f"--optimizer adam --lr {m.lr} --min-lr {m.lr / 10} --lr-decay-style cosine "
        f"--lr-warmup-iters {min(5, iters - 1)} --weight-decay {m.weight_decay} "
        f"--adam-beta1 {m.adam_beta1} --adam-beta2 {m.adam_beta2} --adam-eps {m.adam_eps} "
        f"--clip-grad {m.clip_grad} --init-method-std 0.02 --seed 1234 "
        f"--train-iters {iters} --log-interval 1 --eval-iters 0 --eval-interval 100000 "
        f"--log-throughput --distributed-timeout-minutes 5 "
        f"--expert-model-parallel-size {recipe.ep}"
    )
    if recipe.cp > 1:
        a += f" --context-parallel-size {recipe.cp}"
    return a.split()


def field_flags(fields: dict) -> list:
    """TransformerConfig fields as pretrain_gpt.py flags: True -> `--name`, False -> `--no-name`,
    anything else `--name value`."""
    try:
        from megatron.core.transformer.transformer_config import TransformerConfig

        defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    except ImportError:
        defaults = {}
    out = []
    for k, v in fields.items():
        if k in defaults and defaults[k] == v and type(defaults[k]) is type(v):
            continue  # the default: Megatron renders a True-default bool only as --no-<name>
        flag = k.replace("_", "-")
        if v is True:
            out.append(f"--{flag}")
        elif v is False:
            out.append(f"--no-{flag}")
        else:
            out += [f"--{flag}", str(v)]
    return out


# TransformerConfig fields whose pretrain_gpt.py flag only turns them off (`--no-...`, on by
# default in Megatron), which model_args passes: a variant that sets the field True drops the flag.
JIT_FUSIONS = {
    "bias_activation_fusion": "--no-bias-swiglu-fusion",
    "bias_dropout_fusion": "--no-bias-dropout-fusion",
}


def variant_argv(recipe: R.E2ERecipe, variant: str, iters: int, link: str = "nvlink") -> list:
    """pretrain_gpt.py's arguments of one variant: the recipe's model, the variant's fields and,
    for Fluid's variants, the link's (an emulated link's flag, recipes.LINK_FIELDS; stock's
    layers have nothing to emulate, as in benchmarks.layer_job)."""
    fields = R.variant_fields(variant)
    if fields.get("use_fluid_moe"):
        fields.update(R.LINK_FIELDS.get(link, {}))
    drop = {JIT_FUSIONS[k] for k, v in fields.items() if k in JIT_FUSIONS and v is True}
    fields = {k: v for k, v in fields.items() if k not in JIT_FUSIONS}
    return [a for a in model_args(recipe, iters) if a not in drop] + field_flags(fields)


def check_flag_names(argv: list) -> list:
    """Flag names of `argv` that are neither TransformerConfig fields (also as `no-<field>`) nor
    TRAINING_FLAGS; [] when all are known."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name.replace("_", "-") for f in dataclasses.fields(TransformerConfig)}
    bad = []
    for a in argv:
        if not a.startswith("--"):
            continue
        name = a[2:]
        if name in fields or name in TRAINING_FLAGS:
            continue
        if name.startswith("no-") and name[3:] in fields:
            continue
        bad.append(a)
    return bad


def megatron_validate(argv: list, world: int) -> str:
    """Megatron's parse_args + validate_args for `world` ranks, and FluidMoE's build-time
    validation of the resulting config; 'skipped: ...' without megatron.training."""
    try:
        from megatron.training.arguments import (
            core_transformer_config_from_args,
            parse_args,
            validate_args,
        )
    except ImportError as e:
        return f"skipped: megatron.training not importable ({e.name})"
    env = {"WORLD_SIZE": str(world), "RANK": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    with (
        mock.patch.dict(os.environ, env),
        mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]),
        contextlib.redirect_stdout(io.StringIO()),
    ):  # validate_args prints every argument
        args = parse_args()
        with mock.patch("megatron.training.arguments.get_device_arch_version", return_value=9):
            validate_args(args, {})
    if getattr(args, "use_fluid_moe", False):
        from fluid.megatron.validate import validate_config

        validate_config(core_transformer_config_from_args(args))
    return "ok"


def dry_run(recipe: R.E2ERecipe) -> dict:
    """Every variant's command line, checked (see the module docstring). Raises on a bad flag."""
    out = {}
    for v in recipe.variants:
        if "#" in v:
            continue
        argv = variant_argv(recipe, v, recipe.iters)
        bad = check_flag_names(argv)
        if bad:
            raise SystemExit(
                f"{recipe.name} {v}: unknown flag(s) {bad}: not a TransformerConfig "
                "field nor in benchmarks/e2e_job.py TRAINING_FLAGS"
            )
        out[v] = {"argv": argv, "megatron_parse": megatron_validate(argv, recipe.nproc)}
    return out


def pretrain_script() -> Path:
    for p in (ROOT / ".megatron" / "pretrain_gpt.py", ROOT / "Megatron-LM" / "pretrain_gpt.py"):
        if p.exists():
            return p
    raise SystemExit(
        "pretrain_gpt.py not found: end-to-end recipes need the full Megatron tree "
        "(tools/stage_gpu.sh, then `source benchmarks/gpu_env.sh` on the GPU host)"
    )


def _peak_gb(log_text: str):
    import re

    v = [float(x) for x in re.findall(r"max allocated: ([\d.]+)", log_text)]
    return max(v) / 1024 if v else None


def run_variant(
    recipe: R.E2ERecipe, variant: str, link: str, logs: Path, iters: int, timeout: float
) -> dict:
    """One torchrun of pretrain_gpt.py; the parsed iterations and medians after the warm-up."""
    from fluid.testing.bench.launch import parse_megatron_log, run_logged, steady_median

    extra = {**R.BASE_ENV, **R.LINKS[link], **R.variant_env(variant)}
    env = with_tree_path({**os.environ, **extra})
    argv = variant_argv(recipe, variant, iters, link)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={recipe.nproc}",
        str(pretrain_script().relative_to(ROOT)),
        *argv,
    ]
    log = logs / f"{recipe.name}_{link}_{variant.replace('#', '_')}.log"
    r = run_logged(cmd, env, log, cwd=ROOT, timeout=timeout)
    text = log.read_text()
    its = parse_megatron_log(text)
    ms = [rec["ms"] for i, rec in sorted(its.items()) if i > recipe.warmup and "ms" in rec]
    return {
        **r,
        "argv": argv,
        "env": {k: env[k] for k in sorted(extra)},
        "ms": statistics.median(ms) if ms else None,
        "iters_ms": ms,
        "tflops": steady_median(its, "tflops", recipe.warmup),
        "loss": {str(i): rec.get("loss") for i, rec in sorted(its.items())},
        "peak_gb": _peak_gb(text),
        "log": log.name,
    }


def main(argv=None) -> int:
    """`python -m benchmarks.e2e_job [RECIPE...]`: every end-to-end recipe's variants' arguments,
    checked (dry_run), as JSON {recipe: {variant: {argv, megatron_parse}}}."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("recipes", nargs="*")
    args = ap.parse_args(argv)
    names = args.recipes or [n for n, r in R.RECIPES.items() if r.kind == "e2e"]
    print(json.dumps({r.name: dry_run(r) for r in R.select(names)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
