"""_C.pyi against the bound module: every name, and each function's arity where pybind11's signature shows it,
so the stubs cannot drift from csrc/bindings.cpp again. Needs no GPU."""
import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import graphrunner
from graphrunner._native import _C

STUB = Path(graphrunner.__file__).with_name("_C.pyi")


def stub_names() -> Dict[str, Dict[str, List[int]]]:
    """Top-level stub name -> {member name -> the arities its stub definitions take}; {} for non-classes."""
    out: Dict[str, Dict[str, List[int]]] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef):
            members: Dict[str, List[int]] = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.setdefault(item.name, []).append(len(item.args.args) + len(item.args.kwonlyargs))
            out[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            out[node.name] = {"": [len(node.args.args)]}
        elif isinstance(node, ast.AnnAssign):
            out[node.target.id] = {}
    return out


def top_level_commas(text: str) -> int:
    depth, count = 0, 0
    for ch in text:
        depth += ch in "[(" and 1 or ch in "])" and -1 or 0
        count += ch == "," and depth == 0
    return count


def bound_arities(obj: object) -> Set[int]:
    """The arities pybind11's docstring signatures give (self counted), e.g. 'f(self: X, a: int) -> None'."""
    out = set()
    for sig in re.findall(r"^(?:\d+\. )?\w+\((.*)\) ->", obj.__doc__ or "", re.M):
        out.add(0 if not sig.strip() else top_level_commas(sig) + 1)
    return out


def public(obj: object) -> Set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_every_bound_name_has_a_stub_and_every_stub_a_binding():
    stubs = stub_names()
    assert set(stubs) == public(_C), f"stub-only: {set(stubs) - public(_C)}; bound-only: {public(_C) - set(stubs)}"


def test_class_members_match():
    for name, members in stub_names().items():
        bound = getattr(_C, name)
        if not isinstance(bound, type):
            continue
        exported = {m for m in members if not m.startswith("_")}
        inherited = set().union(*(public(base) for base in bound.__mro__[1:]))
        assert exported == public(bound) - inherited, f"{name}: stub {sorted(exported)}, bound {sorted(public(bound))}"


def test_arities_match_where_pybind11_shows_them():
    checked = 0
    for name, members in stub_names().items():
        bound = getattr(_C, name)
        for member, arities in members.items():
            target = bound if member == "" else getattr(bound, member, None)
            if isinstance(target, property) or target is None:
                continue
            shown = bound_arities(target)
            if shown:
                checked += 1
                assert set(arities) == shown, f"{name}.{member}: stub takes {sorted(arities)}, binding {sorted(shown)}"
    assert checked >= 10  # the pybind11 signatures were found: the test is not vacuous
