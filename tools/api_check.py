#!/usr/bin/env python3
"""API check: the upstream (megatron.*) surface the overlay depends on, compared between two refs.

Discovery reads the overlay's code (AST of overlay/fluid/**/*.py; no hand-kept list):
  - every `from megatron.X import Y` / `import megatron.X as m` binding, wherever it sits;
  - classes whose bases resolve to upstream classes (also through overlay classes): the class is
    "subclassed", each method the overlay class defines that upstream defines is "overridden";
  - `super().m(...)` and `self.m(...)` calls in such classes (m inherited from upstream);
  - calls of upstream classes (constructors) and functions, `mod.func(...)` on imported modules,
    and method calls on attributes/locals built from an upstream class (`self.d = D(...)`,
    `self.d.dispatch(...)`: the "wrapped" classes);
  - any other reference to an upstream name (isinstance, ModuleSpec(module=X), ...): existence only.

Each item is resolved in both upstream trees by AST (module file, re-exports followed, class
bases followed for inherited methods) and the signatures compared: parameters added, removed,
renamed (same position, new name), reordered, made keyword-only, defaults changed, *args/**kwargs
dropped, and the return arity where `return a, b` makes it visible. Verdicts:
  unchanged   same signature (the "body" column still says whether the code changed)
  compatible  only additions a caller or override survives (new optional parameter, new default)
  breaking    removed item/parameter, rename, new required parameter, reorder, return arity
  unresolved  not in upstream at either ref (e.g. added by one of our patches)

Usage:
  api_check.py --from REF --to REF [--tree DIR]            refs of a git repo (default Megatron-LM)
  api_check.py --from A --to B --from-dir DIR --to-dir DIR  two plain trees (A, B are labels)
  [--overlay DIR] [--json]
Exit status: 0 no breaking item, 2 some item is breaking, 1 error.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_HINTS = (
    "route",
    "preprocess",
    "dispatch",
    "routed_experts_compute",
    "combine",
    "postprocess",
)


# ----------------------------------------------------------------------------- upstream sources
class DirSource:
    """Upstream files from a directory holding megatron/."""

    def __init__(self, root: Path, label: str):
        self.root, self.label = Path(root), label

    def read(self, rel: str) -> str | None:
        f = self.root / rel
        return f.read_text() if f.is_file() else None


class GitSource:
    """Upstream files at a git ref (`git show REF:path`), cached."""

    def __init__(self, repo: Path, ref: str, label: str | None = None):
        self.repo, self.ref, self.label = Path(repo), ref, label or ref
        self._cache: dict[str, str | None] = {}

    def read(self, rel: str) -> str | None:
        if rel not in self._cache:
            res = subprocess.run(
                ["git", "-C", str(self.repo), "show", f"{self.ref}:{rel}"], capture_output=True
            )
            self._cache[rel] = res.stdout.decode() if res.returncode == 0 else None
        return self._cache[rel]


# ----------------------------------------------------------------------------- discovery
@dataclass
class Item:
    module: str  # megatron.core.transformer.moe.moe_layer
    qualname: str  # MoELayer | MoELayer.forward | get_gpt_layer_spec
    uses: set[str] = field(default_factory=set)  # subclassed / overridden / super-call / ...
    sites: set[str] = field(default_factory=set)  # overlay file:line
    member: bool = False  # True: a method that must exist upstream to count (else drop)
    max_positional: int = 0  # most positional arguments an overlay call passes (self excluded)
    keywords: set[str] = field(default_factory=set)  # keyword names the overlay's calls pass

    @property
    def key(self) -> str:
        return f"{self.module}.{self.qualname}"


class _Bindings:
    """Names an overlay module binds to upstream objects (`Y -> (megatron.X, Y)`) or modules."""

    def __init__(self, tree: ast.AST):
        self.names: dict[str, tuple[str, str]] = {}
        self.modules: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "megatron" or node.module.startswith("megatron."):
                    for a in node.names:
                        self.names[a.asname or a.name] = (node.module, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "megatron" or a.name.startswith("megatron."):
                        if a.asname:
                            self.modules[a.asname] = a.name
                        else:
                            self.modules["megatron"] = "megatron"

    def resolve(self, node: ast.AST) -> tuple[str, str] | None:
        """(module, name) for a Name or dotted Attribute that refers to an upstream object."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or not parts:
            return None
        parts.reverse()
        if node.id in self.modules:
            mod = ".".join([self.modules[node.id], *parts[:-1]])
            return mod, parts[-1]
        if node.id in self.names and len(parts) == 1:  # imported submodule or class attribute
            mod, name = self.names[node.id]
            return f"{mod}.{name}", parts[0]
        return None


def _super_call(call: ast.Call) -> str | None:
    f = call.func
    if (
        isinstance(f, ast.Attribute)
        and isinstance(f.value, ast.Call)
        and isinstance(f.value.func, ast.Name)
        and f.value.func.id == "super"
    ):
        return f.attr
    return None


class Discovery:
    def __init__(self):
        self.items: dict[str, Item] = {}
        self._class_bases: dict[str, list[tuple[str, str]]] = {}  # overlay class -> upstream bases

    def add(self, module, qualname, use, site, member=False, call: ast.Call | None = None) -> None:
        it = self.items.setdefault(f"{module}.{qualname}", Item(module, qualname, member=member))
        it.uses.add(use)
        it.sites.add(site)
        it.member = it.member and member
        if call is not None:
            starred = any(isinstance(a, ast.Starred) for a in call.args)
            it.max_positional = max(it.max_positional, 10**6 if starred else len(call.args))
            it.keywords.update(k.arg for k in call.keywords if k.arg)

    def run(self, overlay: Path) -> list[Item]:
        files = sorted(p for p in overlay.rglob("*.py") if "__pycache__" not in p.parts)
        parsed = []
        for f in files:
            try:
                parsed.append((f, ast.parse(f.read_text(), str(f))))
            except SyntaxError as e:  # an engineer's half-written file must not stop the check
                print(f"api_check: skipping {f}: {e}", file=sys.stderr)
        # Pass 1: upstream bases of overlay classes, transitively through overlay classes.
        local_bases: dict[str, list[str]] = {}
        for _, tree in parsed:
            b = _Bindings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    ups = [r for r in map(b.resolve, node.bases) if r]
                    self._class_bases.setdefault(node.name, []).extend(ups)
                    local_bases[node.name] = [x.id for x in node.bases if isinstance(x, ast.Name)]
        for _ in range(5):
            for name, bases in local_bases.items():
                for base in bases:
                    for up in self._class_bases.get(base, []):
                        if up not in self._class_bases[name]:
                            self._class_bases[name].append(up)
        # Pass 2: uses.
        for f, tree in parsed:
            rel = f.relative_to(overlay.parent) if overlay.parent in f.parents else f
            self._scan_module(tree, _Bindings(tree), str(rel))
        return sorted((i for i in self.items.values()), key=lambda i: i.key)

    def _scan_module(self, tree: ast.Module, b: _Bindings, fname: str) -> None:
        handled: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                self._scan_class(node, b, fname, handled)
        for node in ast.walk(tree):  # parents come before children: longest dotted chain wins
            if id(node) in handled:
                continue
            site = f"{fname}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                r = b.resolve(node.func)
                if r:
                    self.add(*r, "called", site, call=node)
                    # A class call is its constructor: compare __init__ too (dropped for functions).
                    self.add(r[0], f"{r[1]}.__init__", "constructed", site, member=True, call=node)
                    handled.update(id(n) for n in ast.walk(node.func))
            elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
                r = b.resolve(node)
                if r:
                    self.add(*r, "referenced", site)
                    handled.update(id(n) for n in ast.walk(node))

    def _scan_class(self, cls: ast.ClassDef, b: _Bindings, fname: str, handled: set[int]) -> None:
        ups = self._class_bases.get(cls.name, [])
        for up in ups:
            self.add(*up, f"subclassed by {cls.name}", f"{fname}:{cls.lineno}")
        methods = {
            n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        wrapped: dict[str, tuple[str, str]] = {}  # self.attr -> upstream class
        for node in ast.walk(cls):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                r = b.resolve(node.value.func)
                for t in node.targets:
                    if r and isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                        wrapped[f"{t.value.id}.{t.attr}"] = r
                    elif r and isinstance(t, ast.Name):
                        wrapped[t.id] = r
        for fn in cls.body:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            site = f"{fname}:{fn.lineno}"
            for mod, name in ups:
                self.add(mod, f"{name}.{fn.name}", f"overridden by {cls.name}", site, member=True)
        for node in ast.walk(cls):
            if not isinstance(node, ast.Call):
                continue
            site = f"{fname}:{node.lineno}"
            sup = _super_call(node)
            f = node.func
            if sup:
                for mod, name in ups:
                    self.add(
                        mod, f"{name}.{sup}", "called via super()", site, member=True, call=node
                    )
                handled.add(id(node))
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                if f.value.id == "self" and f.attr not in methods:
                    for mod, name in ups:
                        self.add(
                            mod,
                            f"{name}.{f.attr}",
                            "inherited, called",
                            site,
                            member=True,
                            call=node,
                        )
                elif f.value.id in wrapped:
                    mod, name = wrapped[f.value.id]
                    self.add(
                        mod,
                        f"{name}.{f.attr}",
                        "called on a wrapped instance",
                        site,
                        member=True,
                        call=node,
                    )
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute):
                v = f.value
                if isinstance(v.value, ast.Name) and f"{v.value.id}.{v.attr}" in wrapped:
                    mod, name = wrapped[f"{v.value.id}.{v.attr}"]
                    self.add(
                        mod,
                        f"{name}.{f.attr}",
                        "called on a wrapped instance",
                        site,
                        member=True,
                        call=node,
                    )


def discover(overlay: Path) -> list[Item]:
    return Discovery().run(overlay)


# ----------------------------------------------------------------------------- upstream lookup
@dataclass
class Found:
    node: ast.AST  # ClassDef | FunctionDef | other
    module: str
    file: str
    text: str  # the node's source (for "body changed")


def _module_file(src, module: str) -> tuple[str, str] | None:
    base = module.replace(".", "/")
    for rel in (f"{base}.py", f"{base}/__init__.py"):
        text = src.read(rel)
        if text is not None:
            return rel, text
    return None


def _parse(src, module: str):
    cache = src.__dict__.setdefault("_ast_cache", {})
    if module not in cache:
        found = _module_file(src, module)
        cache[module] = None
        if found:
            try:
                cache[module] = (found[0], found[1], ast.parse(found[1]))
            except SyntaxError:
                pass
    return cache[module]


def _abs_module(module: str, rel_file: str, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    pkg = module.split(".") if rel_file.endswith("__init__.py") else module.split(".")[:-1]
    pkg = pkg[: len(pkg) - (level - 1)]
    return ".".join(pkg + ([name] if name else []))


def _top_level(body: list[ast.stmt]):
    """Module-level statements, including those inside `if`/`try` blocks (HAVE_TE = True)."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            handlers, final = getattr(node, "handlers", []), getattr(node, "finalbody", [])
            for sub in (node.body, node.orelse, handlers, final):
                for x in sub:
                    yield from _top_level(x.body if isinstance(x, ast.ExceptHandler) else [x])


def lookup(src, module: str, name: str, depth: int = 0) -> Found | None:
    """A top-level definition `name` of `module`, following re-exports (`from .x import name`)."""
    if depth > 6:
        return None
    parsed = _parse(src, module)
    if parsed is None:
        # `module` may itself be a class path (megatron.x.Class, attribute name)
        head, _, cls = module.rpartition(".")
        if head and depth < 6:
            owner = lookup(src, head, cls, depth + 1)
            if owner is not None and isinstance(owner.node, ast.ClassDef):
                return find_member(src, owner, name)
        return None
    rel, text, tree = parsed
    hit: ast.stmt | None = None
    for node in _top_level(tree.body):
        if (
            isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name == name
        ):
            hit = node  # last definition wins, as at import time
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                hit = node
    if hit is not None:
        return Found(hit, module, rel, ast.get_source_segment(text, hit) or "")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if (a.asname or a.name) == name:
                    target = _abs_module(module, rel, node.level, node.module)
                    return lookup(src, target, a.name, depth + 1)
    # a submodule (megatron.core.transformer + "moe")
    if _parse(src, f"{module}.{name}") is not None:
        r, t, tr = _parse(src, f"{module}.{name}")
        return Found(tr, f"{module}.{name}", r, "")
    return None


def _resolve_in_module(src, found: Found, expr: ast.AST) -> Found | None:
    """Resolve a base-class expression as seen from the module that defines `found`."""
    if isinstance(expr, ast.Name):
        return lookup(src, found.module, expr.id)
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        mod = lookup(src, found.module, expr.value.id)
        if mod is not None and isinstance(mod.node, ast.Module):
            return lookup(src, mod.module, expr.attr)
    return None


def find_member(src, cls: Found, name: str, depth: int = 0) -> Found | None:
    """Method/attribute `name` of class `cls` (a ClassDef), following upstream base classes."""
    assert isinstance(cls.node, ast.ClassDef), cls.node
    hit: ast.stmt | None = None
    for node in cls.node.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            hit = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):  # class attribute or enum member
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                hit = node
    if hit is not None:
        text = src.read(cls.file) or ""
        return Found(hit, cls.module, cls.file, ast.get_source_segment(text, hit) or "")
    if depth > 8:
        return None
    for base in cls.node.bases:
        b = _resolve_in_module(src, cls, base)
        if b is not None and isinstance(b.node, ast.ClassDef):
            found = find_member(src, b, name, depth + 1)
            if found is not None:
                return found
    return None


def resolve(src, item: Item) -> Found | None:
    cls, _, member = item.qualname.partition(".")
    top = lookup(src, item.module, cls)
    if not member or top is None:
        return top
    if not isinstance(top.node, ast.ClassDef):
        return None
    return find_member(src, top, member)


# ----------------------------------------------------------------------------- signatures
@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # pos | kwonly | vararg | kwarg
    default: str | None  # source text, None when required


def signature(found: Found | None) -> list[Param] | None:
    """Parameters of a function, a class's constructor (__init__ through bases, or dataclass
    fields), or None for anything else."""
    if found is None:
        return None
    node = found.node
    if isinstance(node, ast.ClassDef):
        return None  # the constructor is its own item (Class.__init__) or compared via fields
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    a = node.args
    out = []
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    for p, d in zip(pos, defaults, strict=True):
        out.append(Param(p.arg, "pos", ast.unparse(d) if d is not None else None))
    if a.vararg:
        out.append(Param(a.vararg.arg, "vararg", None))
    for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        out.append(Param(p.arg, "kwonly", ast.unparse(d) if d is not None else None))
    if a.kwarg:
        out.append(Param(a.kwarg.arg, "kwarg", None))
    return out


def dataclass_fields(found: Found) -> list[Param] | None:
    node = found.node
    if not isinstance(node, ast.ClassDef) or not any(
        "dataclass" in ast.unparse(d) for d in node.decorator_list
    ):
        return None
    return [
        Param(s.target.id, "kwonly", ast.unparse(s.value) if s.value is not None else None)
        for s in node.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    ]


def return_arities(found: Found | None) -> set[int]:
    """Tuple lengths of `return (a, b, ...)` statements of a function (1 for a non-tuple value);
    nested functions excluded. Empty when nothing is visible."""
    if found is None or not isinstance(found.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return set()
    out: set[int] = set()

    def visit(n):
        for child in ast.iter_child_nodes(n):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(child, ast.Return) and child.value is not None:
                v = child.value
                out.add(len(v.elts) if isinstance(v, ast.Tuple) else 1)
            visit(child)

    visit(found.node)
    return out


def compare_params(
    old: list[Param],
    new: list[Param],
    max_positional: int = 0,
    fields: bool = False,
    used_names: frozenset[str] | set[str] | None = None,
) -> tuple[str, list[str]]:
    """(verdict, notes) for a signature change, from a caller's and an override's view.

    max_positional: the most positional arguments an overlay call passes; an optional parameter
    inserted before that position shifts the overlay's arguments (breaking), after it it does not.
    fields: the parameters are dataclass fields (TransformerConfig); a removed field is breaking
    only when its name occurs in the overlay (`used_names`: attribute and keyword names).
    """
    notes: list[str] = []
    breaking = compatible = False
    skip = {"self", "cls"}
    o = {p.name: p for p in old if p.name not in skip}
    n = {p.name: p for p in new if p.name not in skip}
    opos = [p.name for p in old if p.kind == "pos" and p.name not in skip]
    npos = [p.name for p in new if p.kind == "pos" and p.name not in skip]
    removed = [k for k in o if k not in n and o[k].kind in ("pos", "kwonly")]
    added = [k for k in n if k not in o and n[k].kind in ("pos", "kwonly")]
    for i, name in enumerate(opos):
        if name in removed and i < len(npos) and npos[i] in added:
            notes.append(f"parameter renamed: {name} -> {npos[i]}")
            removed.remove(name)
            added.remove(npos[i])
            breaking = True
    for name in removed:
        if fields and name not in (used_names or set()):
            notes.append(f"field removed (the overlay never names it): {name}")
            compatible = True
            continue
        notes.append(f"parameter removed: {name}")
        breaking = True
    new_optional = []
    for name in added:
        p = n[name]
        if p.default is None:
            notes.append(f"new required parameter: {name}")
            breaking = True
            continue
        compatible = True
        if p.kind == "pos" and npos.index(name) < len(npos) - 1:
            shifted = npos.index(name) < max_positional
            breaking |= shifted
            notes.append(
                f"new optional parameter: {name}={p.default} inserted before other positionals"
                + (
                    " and the overlay passes arguments past it positionally"
                    if shifted
                    else f" (the overlay passes at most {max_positional} positionally: safe)"
                )
            )
        else:
            new_optional.append(f"{name}={p.default}")
    if new_optional:
        more = f" (+{len(new_optional) - 6} more)" if len(new_optional) > 6 else ""
        notes.append(f"new optional parameter: {', '.join(new_optional[:6])}{more}")
    common_old = [x for x in opos if x in npos]
    common_new = [x for x in npos if x in opos]
    if common_old != common_new:
        notes.append(f"positional order changed: {common_old} -> {common_new}")
        breaking = True
    for name in set(o) & set(n):
        po, pn = o[name], n[name]
        if po.kind == "pos" and pn.kind == "kwonly":
            notes.append(f"{name} became keyword-only")
            breaking = True
        if po.default != pn.default:
            if pn.default is None:
                notes.append(f"{name} lost its default ({po.default}): now required")
                breaking = True
            else:
                notes.append(f"default of {name}: {po.default} -> {pn.default}")
                compatible = True
    for kind, label in (("vararg", "*args"), ("kwarg", "**kwargs")):
        had = any(p.kind == kind for p in old)
        has = any(p.kind == kind for p in new)
        if had and not has:
            notes.append(f"{label} removed")
            breaking = True
        elif has and not had:
            notes.append(f"{label} added")
            compatible = True
    return ("breaking" if breaking else "compatible" if compatible else "unchanged"), notes


@dataclass
class Verdict:
    item: str
    uses: list[str]
    sites: list[str]
    verdict: str
    notes: list[str]
    body_changed: bool
    where_from: str
    where_to: str


def compare_item(
    item: Item, old_src, new_src, used_names: frozenset[str] | set[str] = frozenset()
) -> Verdict | None:
    fo, fn = resolve(old_src, item), resolve(new_src, item)
    uses, sites = sorted(item.uses), sorted(item.sites)
    loc = lambda f: f"{f.file}:{getattr(f.node, 'lineno', 1)}" if f else "-"  # noqa: E731
    if fo is None and fn is None:
        if item.member:  # a method the overlay defines that upstream never had: not an override
            return None
        return Verdict(
            item.key,
            uses,
            sites,
            "unresolved",
            ["not in upstream at either ref (added by a patch, or not a plain name)"],
            False,
            "-",
            "-",
        )
    if fn is None:
        return Verdict(
            item.key, uses, sites, "breaking", [f"removed at {new_src.label}"], True, loc(fo), "-"
        )
    if fo is None:
        return Verdict(
            item.key, uses, sites, "compatible", [f"new at {new_src.label}"], True, "-", loc(fn)
        )
    so, sn = signature(fo), signature(fn)
    fields = so is None and sn is None
    if fields:
        so, sn = dataclass_fields(fo), dataclass_fields(fn)
    if so is not None and sn is not None:
        verdict, notes = compare_params(so, sn, item.max_positional, fields, used_names)
    elif (so is None) != (sn is None):
        verdict, notes = "breaking", ["kind of object changed (function vs class/value)"]
    else:
        verdict, notes = "unchanged", []
    if isinstance(fo.node, ast.ClassDef) and isinstance(fn.node, ast.ClassDef):
        bo = [ast.unparse(b) for b in fo.node.bases]
        bn = [ast.unparse(b) for b in fn.node.bases]
        if bo != bn:
            notes.append(f"bases changed: {bo} -> {bn}")
            verdict = "compatible" if verdict == "unchanged" else verdict
    ro, rn = return_arities(fo), return_arities(fn)
    if ro and rn and ro != rn:
        notes.append(f"return arity changed: {sorted(ro)} -> {sorted(rn)}")
        verdict = "breaking"
    if verdict == "compatible" and any(u.startswith("overridden") for u in uses):
        added = [x for x in notes if x.startswith("new optional")]
        if added:
            notes.append(
                "overridden: check that the override accepts the new parameter(s), "
                "upstream callers may pass them"
            )
    return Verdict(item.key, uses, sites, verdict, notes, fo.text != fn.text, loc(fo), loc(fn))


def overlay_names(overlay: Path) -> set[str]:
    """Every attribute and keyword name the overlay's code mentions (config.moe_x, f(moe_x=...))."""
    names: set[str] = set()
    for f in overlay.rglob("*.py"):
        try:
            tree = ast.parse(f.read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # getattr(config, "moe_x", ...)
    return names


def check(overlay: Path, old_src, new_src) -> list[Verdict]:
    used = overlay_names(overlay)
    items = discover(overlay)
    return [v for v in (compare_item(i, old_src, new_src, used) for i in items) if v]


def to_markdown(verdicts: list[Verdict], old_label: str, new_label: str) -> str:
    counts = {
        k: sum(v.verdict == k for v in verdicts)
        for k in ("breaking", "compatible", "unchanged", "unresolved")
    }
    lines = [
        f"API check {old_label} -> {new_label}: {len(verdicts)} upstream items the overlay uses; "
        + ", ".join(f"{n} {k}" for k, n in counts.items()),
        "",
        "| verdict | upstream item | how the overlay uses it | body changed | notes |",
        "|---|---|---|---|---|",
    ]
    order = {"breaking": 0, "compatible": 1, "unresolved": 2, "unchanged": 3}
    for v in sorted(verdicts, key=lambda v: (order[v.verdict], v.item)):
        lines.append(
            f"| {v.verdict} | `{v.item}` | {'; '.join(v.uses)} | {'yes' if v.body_changed else 'no'}"
            f" | {'; '.join(v.notes)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--from", dest="old", help="old ref (default: the pin in patches/upstream.lock)"
    )
    ap.add_argument("--to", dest="new", required=True, help="new ref")
    ap.add_argument("--tree", type=Path, default=ROOT / "Megatron-LM", help="git repository")
    ap.add_argument("--from-dir", type=Path, help="old upstream tree (directory holding megatron/)")
    ap.add_argument("--to-dir", type=Path, help="new upstream tree")
    ap.add_argument("--overlay", type=Path, default=ROOT / "overlay" / "fluid")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    old = args.old
    if old is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import patches

        old = patches.read_lock(ROOT / "patches")["commit"]
    if bool(args.from_dir) != bool(args.to_dir):
        ap.error("--from-dir and --to-dir go together")
    if args.from_dir:
        old_src: DirSource | GitSource = DirSource(args.from_dir, old)
        new_src: DirSource | GitSource = DirSource(args.to_dir, args.new)
    else:
        if not (args.tree / ".git").exists():
            print(
                f"api_check: {args.tree} is not a git checkout; use --from-dir/--to-dir",
                file=sys.stderr,
            )
            return 1
        for ref in (old, args.new):
            if subprocess.run(
                ["git", "-C", str(args.tree), "rev-parse", "--verify", "-q", f"{ref}^{{commit}}"],
                capture_output=True,
            ).returncode:
                print(f"api_check: unknown ref {ref} in {args.tree}", file=sys.stderr)
                return 1
        old_src, new_src = GitSource(args.tree, old), GitSource(args.tree, args.new)
    verdicts = check(args.overlay, old_src, new_src)
    if args.json:
        print(json.dumps([asdict(v) for v in verdicts], indent=1))
    else:
        print(to_markdown(verdicts, old_src.label, new_src.label), end="")
    return 2 if any(v.verdict == "breaking" for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
