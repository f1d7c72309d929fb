"""Imported once per pytest session by the dist tier's forkserver (tests/_dist.py), so that every
gloo worker starts as a fork of a process that already has torch, Megatron core and fluid loaded
instead of importing them again: that import is about 6 s of CPU per worker, and the dist tier
starts about 40 workers. Nothing here runs a computation (a forked OpenMP pool would hang).

An import error is left for the worker to raise, with its traceback, when it imports the module
itself: the forkserver must start even when the code under test is broken.
"""

import contextlib

import torch  # noqa: F401
import torch.distributed  # noqa: F401

with contextlib.suppress(Exception):
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt.gpt_model  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.parallel_state  # noqa: F401
    import megatron.core.transformer.moe.moe_layer  # noqa: F401
with contextlib.suppress(Exception):
    import fluid  # noqa: F401
    import fluid.attention  # noqa: F401
    import fluid.moe  # noqa: F401
with contextlib.suppress(Exception):
    import pytest  # noqa: F401
