"""Versioned prompt templates kept in files: one file, or a directory of them, local or any fsspec URL.

File format: the template text (a ``str.format`` template over column names, as ``prompt_template``), with
an optional front-matter header between two ``---`` lines holding ``key: value`` pairs::

    ---
    name: book-summary
    version: 3
    description: One-line summary for the catalogue (optional)
    ---
    Summarize "{title}" by {author} in one sentence.

``name`` and ``version`` identify the template: both are recorded in every result's metadata
(``metadata["prompt_template"] = {"name": ..., "version": ...}``), in the batch summary artifact, and in
each item's persisted-result cache key, so a new version re-runs the rows and the same version replays
them. ``version`` is any string (``3``, ``2026-11-30``, ``1.2.0``); versions compare naturally (``10`` after
``9``). Without a header the name is the file name without its extension and the version is ``sha-`` plus
the first 12 hex digits of the text's sha256, so any edit is a new version. The body starts after the
closing ``---`` line (one blank line after it is dropped); surrounding whitespace is trimmed.

A directory holds any number of template files (``*.md``, ``*.txt``, ``*.prompt``, ``*.tmpl``, ``*.jinja``
are read; others ignored), e.g. ``summary.v1.md`` and ``summary.v2.md`` both with ``name: summary``.
:func:`load_prompt_template` picks one by ``name`` (needed when the directory holds several names) and
``version`` (default: the highest).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TEMPLATE_SUFFIXES",
    "PromptTemplate",
    "TemplateRef",
    "load_prompt_template",
    "load_prompt_templates",
    "parse_prompt_template",
]

#: File suffixes read from a template directory.
TEMPLATE_SUFFIXES: tuple[str, ...] = (".md", ".txt", ".prompt", ".tmpl", ".jinja")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KNOWN_KEYS = frozenset({"name", "version", "description"})


@dataclass(frozen=True)
class TemplateRef:
    """Which template (and version) produced an item's prompt; part of its cache key and metadata."""

    name: str
    version: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class PromptTemplate:
    """A named, versioned ``str.format`` template (see the module doc for the file format)."""

    name: str
    version: str
    text: str
    description: str | None = None
    source: str | None = None  # where it was loaded from
    extra: dict[str, str] = field(default_factory=dict, compare=False)  # other header keys, kept as given

    def __post_init__(self) -> None:
        where = f" ({self.source})" if self.source else ""
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"prompt template{where}: name must be letters, digits, '.', '_' or '-', got {self.name!r}"
            )
        if not isinstance(self.version, str) or not self.version.strip():
            raise ValueError(f"prompt template {self.name!r}{where}: version must be a non-empty string")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"prompt template {self.name!r}{where}: the template text is empty")

    @property
    def ref(self) -> TemplateRef:
        return TemplateRef(self.name, self.version)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def format(self, **values: Any) -> str:
        return self.text.format(**values)

    def __str__(self) -> str:
        return self.text


def _natural_key(version: str) -> tuple[Any, ...]:
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.findall(r"\d+|\D+", version)
    )


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_prompt_template(
    content: str, *, default_name: str | None = None, source: str | None = None
) -> PromptTemplate:
    """A :class:`PromptTemplate` from a file's content (front matter optional; see the module doc)."""
    where = f" in {source}" if source else ""
    lines = content.lstrip("\ufeff").splitlines()
    header: dict[str, str] = {}
    body = content.lstrip("\ufeff")
    if lines and lines[0].strip() == "---":
        try:
            end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
        except StopIteration:
            raise ValueError(f"prompt template front matter{where} has no closing '---' line") from None
        for number, line in enumerate(lines[1:end], start=2):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            key, sep, value = stripped.partition(":")
            if not sep or not key.strip():
                raise ValueError(f"prompt template front matter{where}, line {number}: expected 'key: value'")
            header[key.strip().lower()] = _unquote(value.split(" #", 1)[0])
        rest = lines[end + 1 :]
        if rest and not rest[0].strip():
            rest = rest[1:]
        body = "\n".join(rest)
    text = body.strip()
    name = header.get("name") or default_name
    if not name:
        raise ValueError(f"prompt template{where} has no name: add 'name: ...' to its front matter")
    version = header.get("version") or f"sha-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return PromptTemplate(
        name=name,
        version=version,
        text=text,
        description=header.get("description"),
        source=source,
        extra={k: v for k, v in header.items() if k not in _KNOWN_KEYS},
    )


def _stem(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TEMPLATE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base.rsplit(".", 1)[0] if "." in base else base


def load_prompt_templates(path: str | os.PathLike[str]) -> list[PromptTemplate]:
    """Every template in a file or directory (local path or fsspec URL), sorted by name then version."""
    import fsspec

    url = os.fspath(path)
    fs, target = fsspec.core.url_to_fs(url)
    if not fs.exists(target):
        raise FileNotFoundError(f"prompt template path {url!r} does not exist")
    if fs.isdir(target):
        files = sorted(
            p for p in fs.find(target) if p.lower().endswith(TEMPLATE_SUFFIXES) and not _hidden(p, target)
        )
        if not files:
            raise ValueError(
                f"prompt template directory {url!r} holds no template files ({', '.join(TEMPLATE_SUFFIXES)})"
            )
    else:
        files = [target]
    templates = []
    for file in files:
        with fs.open(file, "rb") as handle:
            content = handle.read().decode("utf-8")
        templates.append(parse_prompt_template(content, default_name=_stem(file), source=file))
    seen: dict[tuple[str, str], str] = {}
    for template in templates:
        key = (template.name, template.version)
        if key in seen:
            raise ValueError(
                f"prompt template {template.name!r} version {template.version!r} is defined twice: "
                f"{seen[key]} and {template.source}; give each file its own version"
            )
        seen[key] = template.source or ""
    return sorted(templates, key=lambda t: (t.name, _natural_key(t.version)))


def _hidden(path: str, root: str) -> bool:
    relative = path[len(root.rstrip("/")) :].lstrip("/")
    return any(part.startswith(".") for part in relative.split("/"))


def load_prompt_template(
    path: str | os.PathLike[str], *, name: str | None = None, version: str | int | None = None
) -> PromptTemplate:
    """One template from a file or a directory of templates (local path or fsspec URL).

    ``name`` picks among the names in a directory (required when it holds more than one); ``version``
    picks a version (default: the highest, compared naturally). A clear error names what is available.
    """
    templates = load_prompt_templates(path)
    names = sorted({t.name for t in templates})
    if name is None:
        if len(names) > 1:
            raise ValueError(f"{os.fspath(path)!r} holds templates {names}; pass name= to pick one")
        name = names[0]
    candidates = [t for t in templates if t.name == name]
    if not candidates:
        raise ValueError(f"no prompt template named {name!r} in {os.fspath(path)!r}; found {names}")
    if version is None:
        return candidates[-1]
    wanted = str(version)
    for template in candidates:
        if template.version == wanted:
            return template
    raise ValueError(
        f"prompt template {name!r} has no version {wanted!r}; versions: {[t.version for t in candidates]}"
    )
