"""Typed access to one mapping of a YAML document, with errors that say where and what.

Why a helper instead of a schema library: the cluster document is small, and every rejection must
name the file, the path inside it (``nodes[0].pods[1].annotations``) and what is allowed. Reading
each mapping through ``Fields`` gives that for free and refuses unknown keys in one place, so a
typo such as ``serviceAcount`` fails loudly instead of silently meaning "default".
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import re
from collections.abc import Iterator
from typing import Any, NoReturn

import yaml

# Used with ``fullmatch`` only: ``match`` with ``$`` also accepts a trailing newline ("web\n"),
# a name the kernel, the API server and the other readers of the document would all refuse.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_LABEL_NAME = re.compile(
    r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)


class DocumentError(ValueError):
    """A cluster document is invalid; the message names the file, the path and what is allowed."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {problem}")


def type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


class Fields:
    """One YAML mapping at ``path`` in ``source``; each accessor validates and consumes a key."""

    def __init__(self, value: object, *, source: str, path: str, allowed: tuple[str, ...]) -> None:
        self.source = source
        self.path = path
        if not isinstance(value, dict):
            self.fail(
                "", f"expected a mapping with keys {', '.join(allowed)}, got {type_name(value)}"
            )
        unknown = [k for k in value if k not in allowed]
        if unknown:
            self.fail(
                str(unknown[0]),
                f"unknown key {unknown[0]!r}; allowed keys here: {', '.join(allowed)}",
            )
        self._value: dict[str, object] = value

    def at(self, key: str) -> str:
        """The document path of ``key`` inside this mapping."""
        if not key:
            return self.path
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise DocumentError(self.source, self.at(key), problem)

    def has(self, key: str) -> bool:
        return self._value.get(key) is not None

    def raw(self, key: str) -> object:
        return self._value.get(key)

    def string(self, key: str, *, default: str | None = None) -> str:
        value = self._value.get(key, default)
        if value is None:
            self.fail(key, "is required (a string)")
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {type_name(value)}")
        return value

    def name(self, key: str, *, default: str | None = None) -> str:
        """A Kubernetes object name (DNS-1123 label): lowercase letters, digits and '-'."""
        value = self.string(key, default=default)
        if not _DNS_LABEL.fullmatch(value):
            self.fail(
                key,
                f"{value!r} is not a valid name: use at most 63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit",
            )
        return value

    def subdomain(self, key: str) -> str:
        value = self.string(key)
        if not _DNS_SUBDOMAIN.fullmatch(value):
            self.fail(
                key, f"{value!r} is not a valid DNS name (lowercase letters, digits, '-', '.')"
            )
        return value

    def ipv4(self, key: str) -> str | None:
        value = self._value.get(key)
        if value is None:
            return None
        try:
            return str(ipaddress.IPv4Address(str(value)))
        except ValueError as e:
            self.fail(key, f"{value!r} is not an IPv4 address (write it like 10.244.1.2): {e}")

    def ipv4_network(self, key: str) -> str | None:
        value = self._value.get(key)
        if value is None:
            return None
        try:
            return str(ipaddress.IPv4Network(str(value)))
        except ValueError as e:
            self.fail(key, f"{value!r} is not an IPv4 CIDR (write it like 10.244.1.0/24): {e}")

    def port(self, key: str, *, default: int | None = None) -> int:
        value = self._value.get(key, default)
        if value is None:
            self.fail(key, "is required (a port number 1-65535)")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.fail(key, f"expected a port number 1-65535, got {value!r}")
        return value

    def string_map(self, key: str, *, keys: str = "label") -> dict[str, str]:
        """A mapping of label/annotation names to string values (as Kubernetes stores them)."""
        value = self._value.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping of {keys} names to strings, got {type_name(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not _LABEL_NAME.fullmatch(k):
                self.fail(key, f"{k!r} is not a valid {keys} name (like app or nodemesh.io/mesh)")
            if not isinstance(v, str):
                self.fail(
                    f"{key}.{k}",
                    f'expected a string value, got {type_name(v)} (quote it: {k}: "{v}")',
                )
            out[k] = v
        return out

    def items(self, key: str) -> list[tuple[str, object]]:
        """The entries of a list, each with its document path (``key[i]``)."""
        value = self._value.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, f"expected a list, got {type_name(value)}")
        return [(f"{self.at(key)}[{i}]", item) for i, item in enumerate(value)]


def check_unique(source: str, what: str, entries: list[tuple[str, object]]) -> None:
    """Reject the second occurrence of a key; ``entries`` are (path, key) pairs in file order."""
    seen: dict[object, str] = {}
    for path, key in entries:
        if key in seen:
            raise DocumentError(
                source, path, f"duplicate {what} {key!r}: already defined at {seen[key]}"
            )
        seen[key] = path


# Deeper than any document or policy nests (about 12 levels); PyYAML composes recursively, so
# without a limit a line of 5000 '[' ends in RecursionError instead of a document error.
MAX_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error, not a
    silent overwrite (``name: a`` then ``name: b`` would otherwise lose ``a`` unnoticed), and
    that nesting deeper than ``MAX_DEPTH`` is refused."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            repeated = key in seen
        except TypeError:
            continue  # a list or mapping as a key: construct_mapping refuses it below
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_yaml(text: str, *, source: str) -> Any:
    """Parse YAML safely and strictly (no repeated keys); an empty file is an empty mapping."""
    with _readable(source):
        data = yaml.load(_named(text, source), Loader=_StrictLoader)  # safe: a SafeLoader subclass
    return {} if data is None else data


def load_yaml_documents(text: str, *, source: str) -> list[Any]:
    """The documents of a multi-document stream (``---``, as ``kubectl apply -f`` takes them),
    each parsed as ``load_yaml`` parses one; empty documents are left out."""
    with _readable(source):
        documents = yaml.load_all(_named(text, source), Loader=_StrictLoader)  # safe, as above
        return [d for d in documents if d is not None]


def _named(text: str, source: str) -> io.StringIO:
    """``text`` as a stream named ``source``, so that an error's marks name the file and line
    (``in "deny.yaml", line 7, column 11``), not PyYAML's ``"<unicode string>"``."""
    stream = io.StringIO(text)
    stream.name = source
    return stream


@contextlib.contextmanager
def _readable(source: str) -> Iterator[None]:
    """Whatever PyYAML raises for ``source`` as one ``DocumentError``."""
    try:
        yield
    except yaml.YAMLError as e:
        raise DocumentError(source, "", f"not valid YAML: {e}") from e
    except (ValueError, LookupError, TypeError, AttributeError) as e:
        # PyYAML's constructors raise these, not YAMLError, for a value that looks like its type
        # (or is tagged as one) but is not: a date such as 2001-13-45, a UTC offset beyond 24
        # hours, '!!int abc' (ValueError), '!!int ' (IndexError), '!!bool x' (KeyError),
        # '!!timestamp x' (AttributeError), '!!map [a]' (TypeError).
        reason = f"{type(e).__name__}: {e}"
        raise DocumentError(source, "", f"not valid YAML: a value cannot be read ({reason})") from e
