"""Settings dataclasses as the one declaration of a verb's parameters (issue #18).

A task's settings are a dataclass whose fields are the workflow's YAML keys (``tasks.<task>.<key>``).
From that one declaration come:

- the verb's flags (:func:`add_config_args`: ``--max-steps`` for field ``max_steps``, the type, the
  default, the choices and the help text; bools as ``--x`` / ``--no-x``);
- the settings back from the parsed flags (:func:`config_from_args`), checked against the bounds the
  fields declare (:func:`check_config`: a :class:`~epiflow.errors.ConfigError` naming the field);
- the workflow's command line for a config section (:func:`to_argv`, used by ``common.smk``'s one
  argv builder), so that a YAML key and its flag cannot drift apart;
- the JSON-schema properties of the section (:func:`schema_properties`, merged into the workflow's
  config schema), so that the types and bounds are not declared twice.

Declare a field with :func:`setting`::

    @dataclass
    class AnnotationConfig:
        epochs: int = setting(20, "fine-tuning epochs", min=1)

This module imports nothing heavy (the workflow imports it while planning).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError

_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, help: str = "", *, choices: Iterable | None = None,
            min: float | None = None, exclusive_min: float | None = None, max: float | None = None,
            aliases: Iterable[str] = (), repeat: bool = False, cli: bool = True, metavar: str | None = None,
            pattern: str | None = None, default_factory: Any = _MISSING) -> Any:
    """A dataclass field with what its flag and schema need: ``help`` (shown by ``--help``; the default
    is appended), ``choices``, bounds (``min``, ``exclusive_min``, ``max``), ``aliases`` (former flag
    names, still accepted), ``repeat`` (a list given by repeating the flag instead of commas),
    ``cli=False`` (a setting of the Python API only), ``pattern`` (a regular expression a text must match)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min,
            "exclusive_min": exclusive_min, "max": max, "aliases": tuple(aliases), "repeat": repeat,
            "cli": cli, "metavar": metavar, "pattern": pattern}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- field types
@dataclasses.dataclass(frozen=True)
class _Kind:
    base: type          # int, float, str, bool
    optional: bool      # None allowed
    is_list: bool       # list / tuple of base


def _kind(tp) -> _Kind:
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported settings type {tp!r}")
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        base = inner[0] if inner else str
        return _Kind(base, optional, True)
    if tp not in (int, float, str, bool):
        raise TypeError(f"unsupported settings type {tp!r}")
    return _Kind(tp, optional, False)


def fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """The dataclass's fields with their kinds (resolved type hints; None for a ``cli=False`` field,
    which may have any type)."""
    hints = typing.get_type_hints(cls)
    return [(f, _kind(hints[f.name]) if f.metadata.get("cli", True) else None) for f in dataclasses.fields(cls)]


def flag(name: str) -> str:
    """The flag of field ``name``: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field):
    """A dataclass field's default (its factory called), or ``dataclasses.MISSING``."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def default_of(cls, name: str):
    """The default of field ``name`` of settings ``cls`` (KeyError when it has no such field)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return field_default(f)
    raise KeyError(f"{cls.__name__}.{name}")


def _convert(value: str, base: type, name: str):
    if base is str:
        return value
    try:
        return base(value)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(base, base.__name__)
        raise argparse.ArgumentTypeError(f"{flag(name)}: {value!r} is not {kind}") from None


def _parser_type(kind: _Kind, name: str):
    def parse(text: str):
        if kind.optional and text.strip().lower() in ("none", "null"):
            return None
        if kind.is_list:
            return [_convert(t.strip(), kind.base, name) for t in text.split(",") if t.strip()]
        return _convert(text, kind.base, name)

    parse.__name__ = kind.base.__name__
    return parse


# ----------------------------------------------------------------------------- argparse
def add_config_args(parser, cls, *, exclude: Iterable[str] = (), defaults: Mapping[str, Any] | None = None,
                    group: str | None = None) -> None:
    """Add one flag per field of ``cls`` (except ``exclude`` and fields declared ``cli=False``) to
    ``parser`` (an argument group titled ``group`` when given). ``defaults`` overrides field defaults
    for this verb only (e.g. a task with more epochs)."""
    target = parser.add_argument_group(group) if group else parser
    skip = set(exclude)
    for f, kind in fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        default = (defaults or {}).get(f.name, field_default(f))
        names = [flag(f.name), *meta.get("aliases", ())]
        help_text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
        if kind.base is bool and not kind.is_list:
            target.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text + (" (default: yes)" if default else " (default: no)"))
            continue
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        shown = str(shown).replace("%", "%%")
        suffix = f" (default: {shown})" if default not in (None, _MISSING, [], ()) else ""
        kw: dict[str, Any] = dict(dest=f.name, help=(help_text + suffix).strip() or None)
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"]) + ([None] if kind.optional else [])
            kw["metavar"] = kw.get("metavar") or "{" + ",".join(map(str, meta["choices"])) + "}"
        if kind.is_list and meta.get("repeat"):
            kw.update(action="append", type=_parser_type(_Kind(kind.base, False, False), f.name))
            kw["default"] = None if default is _MISSING else default
        else:
            kw["type"] = _parser_type(kind, f.name)
            if default is _MISSING:
                kw["required"] = True
            else:
                kw["default"] = default
        target.add_argument(*names, **kw)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """The settings ``cls`` from parsed flags (fields not on the command line keep their defaults),
    checked with :func:`check_config`."""
    values = {}
    for f, _ in fields(cls):
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    cfg = cls(**values)
    check_config(cfg)
    return cfg


def check_config(cfg) -> None:
    """Bounds and choices the fields declare; a ConfigError naming the field (and its flag)."""
    for f, kind in fields(type(cfg)):
        if kind is None:
            continue
        value = getattr(cfg, f.name)
        meta = f.metadata
        where = f"{f.name} ({flag(f.name)})"
        if value is None:
            if not kind.optional:
                raise ConfigError(f"{where} must be set", field=f.name)
            continue
        items = list(value) if kind.is_list else [value]
        for v in items:
            if meta.get("pattern") and isinstance(v, str) and not re.fullmatch(meta["pattern"], v):
                raise ConfigError(f"{where} is {v!r}, which does not match {meta['pattern']}", field=f.name)
            if meta.get("choices") and v not in meta["choices"]:
                raise ConfigError(f"{where} is {v!r}", field=f.name,
                                  fix=f"use one of {', '.join(map(str, meta['choices']))}")
            if kind.base in (int, float) and not isinstance(v, bool):
                lo, xlo, hi = meta.get("min"), meta.get("exclusive_min"), meta.get("max")
                if lo is not None and v < lo:
                    raise ConfigError(f"{where} must be >= {lo:g}, got {v}", field=f.name)
                if xlo is not None and not v > xlo:
                    raise ConfigError(f"{where} must be > {xlo:g}, got {v}", field=f.name)
                if hi is not None and v > hi:
                    raise ConfigError(f"{where} must be <= {hi:g}, got {v}", field=f.name)


# ----------------------------------------------------------------------------- workflow side
def to_argv(cls, values: Mapping[str, Any], *, exclude: Iterable[str] = ()) -> list[str]:
    """The command-line words giving ``values`` (YAML keys = field names; keys that are not fields of
    ``cls``, and None values, are left out) to a verb whose flags :func:`add_config_args` made."""
    out: list[str] = []
    skip = set(exclude)
    for f, kind in fields(cls):
        if f.name in skip or f.name not in values or not f.metadata.get("cli", True):
            continue
        v = values[f.name]
        if v is None:
            continue
        if kind.base is bool and not kind.is_list:
            out.append(flag(f.name) if v else "--no-" + f.name.replace("_", "-"))
        elif kind.is_list:
            items = [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
            if not items:
                from .errors import ConfigError

                raise ConfigError(f"'{f.name}' is an empty list", field=f.name,
                                  fix="give at least one value, or null (or leave the key out) for the default")
            if f.metadata.get("repeat"):
                for x in items:
                    out += [flag(f.name), x]
            else:
                out += [flag(f.name), ",".join(items)]
        else:
            out += [flag(f.name), str(v)]
    return out


def argv_string(cls, values: Mapping[str, Any], **kw) -> str:
    """:func:`to_argv` as one shell-quoted string."""
    return " ".join(shlex.quote(w) for w in to_argv(cls, values, **kw))


def legacy_keys(cls) -> dict[str, str]:
    """Former YAML keys (from the former flag names, ``aliases``) -> the field they now name."""
    out = {}
    for f, _ in fields(cls):
        for a in f.metadata.get("aliases", ()):
            out[a.lstrip("-").replace("-", "_")] = f.name
    return out


def schema_properties(cls, *, exclude: Iterable[str] = ()) -> dict[str, dict]:
    """JSON-schema properties of the fields (type, null, enum, bounds, description)."""
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    props = {}
    skip = set(exclude)
    for f, kind in fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        meta = f.metadata
        item: dict[str, Any] = {"type": names[kind.base]}
        if kind.base is float:
            item["type"] = "number"
        if meta.get("choices"):
            item["enum"] = list(meta["choices"])
        if meta.get("pattern"):
            item["pattern"] = f"^(?:{meta['pattern']})$"
        for key, schema_key in (("min", "minimum"), ("exclusive_min", "exclusiveMinimum"), ("max", "maximum")):
            if meta.get(key) is not None:
                item[schema_key] = meta[key]
        if kind.is_list:  # an empty list would mean the verb's default: null says that
            item = {"type": "array", "items": item, "minItems": 1}
        if kind.optional:
            item = {"anyOf": [item, {"type": "null"}]}
        if meta.get("help"):
            item["description"] = meta["help"]
        props[f.name] = item
    return props


# ----------------------------------------------------------------------------- I/O flags
CELLS_HELP = ("cells: a corpus folder (epiflow build-corpus / tokenize-downstream), a shard .h5, or an "
              ".h5ad of raw counts over the model's cCREs (with --df or var['df'])")


SEVERAL_HELP = ("; several paths (one vocabulary, e.g. the corpus folder and downstream folders tokenized onto it) "
                "are read together, in order")


class OneOrSeveral(argparse.Action):
    """``nargs="+"`` that stores one path as a string and several as a list."""

    def __call__(self, parser, namespace, values, option_string=None):
        values = list(values)
        setattr(namespace, self.dest, values[0] if len(values) == 1 else values)


#: the metavar that declares what an output flag names (``--out DIR``: a folder, ``--out FILE``: a file); the
#: CLI checks every verb's --out (and --report) against it before any work (:func:`out_kind`)
OUT_KINDS = {"DIR": "folder", "FILE": "file"}


def out_kind(parser: argparse.ArgumentParser, dest: str) -> str | None:
    """"folder" or "file": what the flag stored in ``dest`` names, as its metavar declares (DIR / FILE);
    None when the flag does not say (or the verb has no such flag)."""
    for action in parser._actions:
        if action.dest == dest and isinstance(action.metavar, str):
            return OUT_KINDS.get(action.metavar)
    return None


def add_io_args(parser, *, cells: str | None = "required", checkpoint: str | None = "required",
                out: str = "folder", df: bool = True, dataset: bool = True, cells_help: str = CELLS_HELP,
                several: bool = False,
                checkpoint_help: str = "pretrained model: checkpoint.pth of epiflow pretrain (with its .json "
                                       "side file) or the authors' file") -> None:
    """The I/O flags, named the same on every verb: ``--corpus`` (the cells; ``--input`` is its former
    name on some verbs), ``--df``, ``--dataset``, ``--checkpoint`` and ``--out`` (``--out-dir`` is its
    former name). ``cells`` / ``checkpoint``: "required", "optional" or None (no such flag). ``several``:
    ``--corpus`` takes one or more paths (a list when several: :func:`epiflow.tasks.common.load_cells`)."""
    g = parser.add_argument_group("input and output")
    if cells:
        multi = {"nargs": "+", "action": OneOrSeveral} if several else {}
        g.add_argument("--corpus", "--input", dest="corpus", required=cells == "required", metavar="PATH",
                       help=cells_help + (SEVERAL_HELP if several else ""), **multi)
    if df and cells:
        g.add_argument("--df", metavar="NPY", help="document frequencies (df.npy of the model's corpus) for "
                                                   "an .h5ad without var['df']")
    if dataset and cells:
        g.add_argument("--dataset", metavar="NAME[,NAME]",
                       help="use only the cells whose obs 'dataset' is NAME (several: comma-separated)")
    if checkpoint:
        g.add_argument("--checkpoint", required=checkpoint == "required", metavar="PTH", help=checkpoint_help)
    names = ("--out", "--out-dir") if out == "folder" else ("--out",)  # --out-dir: the former name of a folder
    g.add_argument(*names, dest="out", required=True, metavar="DIR" if out == "folder" else "FILE",
                   help="output folder" if out == "folder" else "output file")
