"""The signatures the docs print are the real ones.

docs/api.md is the contract a user relies on, and the README's API table is
the first thing they read. Every call written in a heading of docs/api.md,
or in the first column of a table there or in the README, is parsed and
compared with ``inspect.signature`` of the object it names: parameter names,
their order, their kinds (positional, ``*``-keyword-only, ``*args``,
``**kwargs``) and their defaults. ``...`` in a printed parameter list
stands for parameters left out, in order. A bare member (``.wr_seq``) must
exist. So a renamed option, a dropped ``*`` or a changed default fails CI
instead of drifting.
"""

from __future__ import annotations

import builtins
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import qsbr

ROOT = Path(__file__).resolve().parents[1]

#: What a one-letter name in the docs stands for (``h.quiescent()``, ``a.view()``).
PREFIXES = {"h": qsbr.ThreadHandle, "a": qsbr.SharedArray, "d": qsbr.Domain, "domain": qsbr.Domain}
#: Calls the docs write that are not members: builtins applied to an object.
NOT_MEMBERS = {"len", "iter"}


@dataclass
class Printed:
    """One signature as printed: where, in which class's section, and the text."""

    where: str
    context: Any
    text: str


def _spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def printed_signatures() -> list[Printed]:
    out: list[Printed] = []
    # docs/api.md: headings set the class a section is about.
    context: Any = None
    for n, line in enumerate((ROOT / "docs/api.md").read_text().splitlines(), 1):
        where = f"docs/api.md:{n}"
        if line.startswith("#"):
            spans = _spans(line)
            if spans:
                m = re.match(r"qsbr\.(\w+)", spans[0])
                if m:
                    context = getattr(qsbr, m.group(1))
                    out.append(Printed(where, None, spans[0]))
            elif line.startswith("## "):
                context = None
        elif line.startswith("| ") and not line.startswith("|---"):
            first = line.split("|")[1]
            out.extend(Printed(where, context, s) for s in _spans(first))
    # The README's API table: a row about the domain starts with "."; the
    # first row names the class.
    context = None
    for n, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if line.startswith("| ") and not line.startswith("|---"):
            first = re.split(r"(?<!\\)\|", line)[1]
            for s in _spans(first):
                m = re.match(r"qsbr\.(\w+)", s)
                if m and m.group(1) == "Domain":
                    context = qsbr.Domain
                out.append(Printed(f"README.md:{n}", context, s))
    return out


def _split_params(text: str) -> list[str]:
    """Top-level comma split (defaults may hold parentheses and strings)."""
    parts, depth, cur, quote = [], 0, "", ""
    for ch in text:
        if quote:
            cur += ch
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


_KIND_NAMES = {
    inspect.Parameter.POSITIONAL_ONLY: "positional-only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword-only",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}

_NO_DEFAULT: Any = object()


def parse_params(text: str) -> tuple[list[tuple[str, str, Any]], bool]:
    """[(name, kind, default or _NO_DEFAULT or Ellipsis)], and whether the
    list has "..." (parameters left out)."""
    params: list[tuple[str, str, Any]] = []
    partial = False
    kind = "positional"
    for p in _split_params(text):
        if p == "...":
            partial = True
        elif p == "/":
            params = [(n, "positional-only", d) for n, _, d in params]
        elif p == "*":
            kind = "keyword-only"
        elif p.startswith("**"):
            params.append((p[2:], "**kwargs", _NO_DEFAULT))
        elif p.startswith("*"):
            params.append((p[1:], "*args", _NO_DEFAULT))
            kind = "keyword-only"
        else:
            name, eq, default = p.partition("=")
            value = _NO_DEFAULT
            if eq:
                value = ... if default.strip() == "..." else eval(default, {"__builtins__": {}})  # noqa: S307 - our own docs
            params.append((name.strip(), kind, value))
    return params, partial


def real_params(obj: Any) -> list[tuple[str, str, Any]]:
    sig = inspect.signature(obj)
    return [
        (p.name, _KIND_NAMES[p.kind], _NO_DEFAULT if p.default is inspect.Parameter.empty else p.default)
        for p in sig.parameters.values()
    ]


def resolve(printed: Printed) -> tuple[Any, str, str | None]:
    """(the object, its dotted name, the printed parameter text or None for
    a bare member)."""
    text = printed.text.strip()
    text = re.sub(r"^with\s+|:$|^\w+\s*=\s*", "", text).strip()  # "with .registered():", "h = .register()"
    m = re.fullmatch(r"([\w.]*?)(\w+)(?:\((.*)\))?(?:\s*->\s*.+)?", text, flags=re.S)
    if m is None:
        raise AssertionError(f"{printed.where}: cannot read `{printed.text}`")
    owner_text, name, params = m.group(1), m.group(2), m.group(3)
    owner = printed.context
    if owner_text in ("qsbr.", ""):
        if owner_text == "qsbr." or (owner is None and hasattr(qsbr, name)) or name == "Domain":
            return getattr(qsbr, name), f"qsbr.{name}", params
    elif owner_text.rstrip(".") in PREFIXES:
        owner = PREFIXES[owner_text.rstrip(".")]
    elif owner_text != ".":
        raise AssertionError(f"{printed.where}: `{printed.text}`: what is {owner_text!r}?")
    if owner is None:
        raise AssertionError(f"{printed.where}: `{printed.text}` is outside any class's section")
    fields = getattr(owner, "__dataclass_fields__", {})
    assert hasattr(owner, name) or name in fields, (
        f"{printed.where}: `{printed.text}`: {owner.__name__} has no member {name!r}"
    )
    return getattr(owner, name, None), f"{owner.__name__}.{name}", params


def _cases() -> list[Printed]:
    return [p for p in printed_signatures() if not re.match(r"^(\w+\()?a\[|^(len|iter)\(", p.text)]


@pytest.mark.parametrize("printed", _cases(), ids=lambda p: f"{p.where} {p.text[:40]}")
def test_printed_signature_is_the_real_one(printed: Printed) -> None:
    obj, name, text = resolve(printed)
    if text is None or isinstance(obj, property) or not callable(obj):
        return  # a bare member: it exists (resolve checked)
    if isinstance(obj, type) and issubclass(obj, BaseException):
        for base in (b.strip() for b in text.split(",") if b.strip()):
            assert issubclass(obj, getattr(builtins, base)), f"{printed.where}: {name} is not a {base}"
        return
    doc, partial = parse_params(text)
    real = real_params(obj)
    if not isinstance(obj, type) and real and real[0][0] == "self":  # an unbound method
        real = real[1:]
    where = f"{printed.where}: `{printed.text}` against {name}{inspect.signature(obj)}"
    if partial:
        names = [n for n, _, _ in real]
        positions = [names.index(n) if n in names else -1 for n, _, _ in doc]
        assert -1 not in positions, f"{where}: no parameter {doc[positions.index(-1)][0]!r}"
        assert positions == sorted(positions), f"{where}: parameters out of order"
        pairs = [(d, real[i]) for d, i in zip(doc, positions, strict=True)]
    else:
        assert [n for n, _, _ in doc] == [n for n, _, _ in real], f"{where}: parameter names differ"
        pairs = list(zip(doc, real, strict=True))
    for (dname, dkind, ddefault), (_, rkind, rdefault) in pairs:
        assert dkind == rkind, f"{where}: {dname} is {rkind}, printed as {dkind}"
        if ddefault is ...:
            continue  # "name=...": the default is not printed
        assert (ddefault is _NO_DEFAULT) == (rdefault is _NO_DEFAULT), (
            f"{where}: {dname} {'has no' if rdefault is _NO_DEFAULT else 'has a'} default"
        )
        assert ddefault is _NO_DEFAULT or ddefault == rdefault, (
            f"{where}: {dname} defaults to {rdefault!r}, printed as {ddefault!r}"
        )


def test_the_docs_print_signatures_at_all() -> None:
    """The parser found the tables (a reformatted table must not silently
    turn the test above into no test)."""
    found = printed_signatures()
    assert sum(p.where.startswith("README") for p in found) >= 15
    assert sum(p.where.startswith("docs/api.md") for p in found) >= 40
