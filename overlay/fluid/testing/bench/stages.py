"""Host-time hooks around FluidMoELayer's forward stages (no profiler needed)."""

from __future__ import annotations

import contextlib

# FluidMoELayer forward stages: (attribute path from the layer, method name).
FLUID_STAGES = [
    ("", "route"),
    ("token_dispatcher", "dispatch_preprocess"),
    ("token_dispatcher", "dispatch_chunks"),
    ("token_dispatcher", "launch_dispatch_part"),
    ("token_dispatcher", "dispatch_postprocess"),
    ("experts", "forward"),
    ("token_dispatcher", "combine_preprocess"),
    ("token_dispatcher", "launch_combine"),
    ("token_dispatcher", "combine_postprocess"),
]

_MISSING = object()


@contextlib.contextmanager
def stage_hooks(layer, enter_exit):
    """Wrap each FLUID_STAGES method of a FluidMoELayer (instance attributes, removed on exit):
    `enter_exit(name)` is a context manager entered around every call. On exit each object gets
    back exactly what it had (its own attribute, or none). A stock layer (no
    token_dispatcher.dispatch_chunks) is left alone."""
    wrapped = []
    if hasattr(getattr(layer, "token_dispatcher", None), "dispatch_chunks"):
        for path, meth in FLUID_STAGES:
            obj = getattr(layer, path) if path else layer
            fn = getattr(obj, meth)
            name = f"stage:{path + '.' if path else ''}{meth}"

            def call(*a, _fn=fn, _name=name, **k):
                with enter_exit(_name):
                    return _fn(*a, **k)

            wrapped.append((obj, meth, vars(obj).get(meth, _MISSING)))
            setattr(obj, meth, call)
    try:
        yield
    finally:
        for obj, meth, own in reversed(wrapped):
            if own is _MISSING:
                delattr(obj, meth)  # the class's method shows through again
            else:
                setattr(obj, meth, own)  # an instance attribute it had before
