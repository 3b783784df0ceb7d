"""A Griffe extension for the API reference: Sphinx roles in docstrings become code,
doctest examples become Python code blocks, and dunder methods that say nothing to a
user (``__post_init__``, ``__repr__``...) are left out.

etcdisco's docstrings are prose that names other objects the Sphinx way
(``:func:`server```, ``:class:`~etcdisco.ClientSettings```). mkdocstrings renders
docstrings as Markdown, where such a role would show up as ``:func:`` before the name;
this turns each into an inline code span of the name as a reader would write it
(``server()``, ``ClientSettings``). The docstrings themselves are left as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :role:`target`, :role:`~a.b.target`, :role:`text <target>`
_ROLE = re.compile(r":(?:py:)?(func|meth|class|mod|attr|data|exc|obj|const):`([^`]+)`")


def _as_code(match: re.Match[str]) -> str:
    role, target = match.group(1), match.group(2).strip()
    explicit = re.fullmatch(r"(.+?)\s*<[^>]+>", target)
    if explicit:  # :class:`the text <target>`: keep the text
        name = explicit.group(1)
    elif target.startswith("~"):  # :class:`~a.b.Name`: the last component only
        name = target[1:].rsplit(".", 1)[-1]
    else:
        name = target
    if role in ("func", "meth") and not name.endswith(")"):
        name += "()"
    return f"`{name}`"


def convert_roles(text: str) -> str:
    """The docstring text with every Sphinx cross-reference role made a code span."""
    return _ROLE.sub(_as_code, text)


_PROMPT = re.compile(r"\s*(>>>|\.\.\.)( |$)")
# A doctest's "# doctest: +SKIP" and similar directives mean nothing to a reader.
_DIRECTIVE = re.compile(r"\s*# doctest:.*$")


def fence_doctests(text: str) -> str:
    """Wrap each doctest example (``>>>`` lines, their ``...`` continuations and the
    output up to a blank line) in a ``pycon`` fence. Markdown would otherwise read the
    prompts as nested block quotes."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        block = []
        while i < len(lines) and lines[i].strip():
            line = lines[i]
            if _PROMPT.match(line):
                line = _DIRECTIVE.sub("", line)
            block.append(line[len(indent) :] if line.startswith(indent) else line.strip())
            i += 1
        if out and out[-1].strip():
            out.append("")
        out.extend([f"{indent}```pycon", *(f"{indent}{b}" for b in block), f"{indent}```"])
        if i < len(lines):
            out.append("")
    return "\n".join(out)


# Dunder methods a reader needs no entry for (the protocols that matter, such as
# __enter__ or __aiter__, stay).
_NOISE = frozenset({"__post_init__", "__repr__", "__str__", "__hash__", "__eq__"})


class ApiReference(griffe.Extension):
    """Applies both rules above to every object Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(convert_roles(obj.docstring.value))

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        for name in _NOISE & set(cls.members):
            del cls.members[name]
