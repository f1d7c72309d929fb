"""Probes for the patches that fix an upstream bug (as opposed to adding a seam).

A patch names its probe in its header, `Probe: tools/probes.py:<function>`. A probe reads the
files of a tree (a directory holding `megatron/`; only files the patch touches) and returns the
instances of the bug it finds as {key: description}, keyed by something that survives upstream
moving lines (a field name, say): non-empty while the bug is there, empty once it is fixed, None
when the file it reads is absent (a core-only tree without megatron/training). With it:

- `make check-patches` proves the patch is needed: the probe must find the bug in the pristine
  pin and nothing once the series is applied;
- `make diff-report` and `make rebase-upstream` see upstream fix the bug its own way: when none
  of the instances the patch fixes at the pin is found in upstream's files (before the patch is
  applied), the patch is "fixed upstream: drop it", even where upstream's fix conflicts
  textually with ours. Instances upstream added meanwhile are reported beside it.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

TRANSFORMER_CONFIG = "megatron/core/transformer/transformer_config.py"


class _HelpParams(dict):
    """What argparse %-formats a help string with: the action's fields; any name will do."""

    def __missing__(self, key):
        return ""


def field_docstrings(source: str, class_name: str) -> dict[str, tuple[int, str]]:
    """{field: (line, docstring)} for the `field: T = ...` / `\"\"\"doc\"\"\"` pairs of a class,
    the pairs Megatron's ArgumentGroupFactory turns into `--field` help strings."""
    tree = ast.parse(source)
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for a, b in itertools.pairwise(node.body):
                if (
                    isinstance(a, ast.AnnAssign)
                    and isinstance(a.target, ast.Name)
                    and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)
                ):
                    out[a.target.id] = (b.lineno, " ".join(b.value.value.split()))
    return out


def percent_safe_config_help(tree: Path) -> dict[str, str] | None:
    """TransformerConfig fields whose docstring argparse cannot %-format (patch 0004's bug).

    Megatron makes each TransformerConfig field a flag whose help is the field's docstring, and
    argparse expands help as `help % params` when it prints `--help`: a lone `%` (as in
    "10%)") raises ValueError and `pretrain_gpt.py --help` dies before listing any flag.
    `%%` and `%(default)s` are fine.
    """
    path = Path(tree) / TRANSFORMER_CONFIG
    if not path.is_file():
        return None
    bad = {}
    for name, (line, doc) in field_docstrings(path.read_text(), "TransformerConfig").items():
        try:
            doc % _HelpParams()
        except (ValueError, TypeError, KeyError) as e:
            bad[name] = f"{TRANSFORMER_CONFIG}:{line}: the docstring of {name}: {e}"
    return bad
