"""Typed pipeline configuration, loaded once from ``params.yaml``.

:class:`Config` holds one section per ``params.yaml`` key (the dataclasses of ``config_schema.py``, re-exported
here). :func:`load_config` reads the file, applies the ``--set`` overrides and the recipe (``recipes.py``: the keys
set to ``auto``), and :func:`build` turns the result into sections: pydantic checks every key against the fields
(unknown keys, wrong types, out-of-range values), then each section's ``validate`` the rest; the first problem
stops the run before any stage does work, as a :class:`ConfigError` that names the key (its full dotted path) and
the fix. Stages receive the resolved :class:`Config` and write it beside their outputs with
``outputs.save_resolved``. :func:`params_schema` is the JSON Schema of ``params.yaml``
(``picosam-pipeline params-schema`` writes it to ``params.schema.json``, which params.yaml names for editors).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic.json_schema import GenerateJsonSchema

from picosam_pipeline.config_schema import (
    SAM2_MODELS,
    TARGET_RULES,
    TEACHER_NAME,
    ConfigError,
    DatasetConfig,
    EvaluateConfig,
    ExportConfig,
    LvisEvalConfig,
    PackageConfig,
    PackConfig,
    PrepareConfig,
    QuantizeConfig,
    RecipeConfig,
    RuntimeConfig,
    SampleConfig,
    Section,
    SplitSource,
    TeacherConfig,
    TrainConfig,
    check_device,
)
from picosam_pipeline.recipes import RECIPE_KEYS, RecipeError, apply_recipe, check_pairing
from picosam_pipeline.untrusted import UntrustedInputError, read_bounded_bytes, safe_text

__all__ = [
    "SAM2_MODELS",
    "TARGET_RULES",
    "TEACHER_NAME",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "EvaluateConfig",
    "ExportConfig",
    "LvisEvalConfig",
    "PackConfig",
    "PackageConfig",
    "PrepareConfig",
    "QuantizeConfig",
    "RecipeConfig",
    "RuntimeConfig",
    "SampleConfig",
    "SplitSource",
    "TeacherConfig",
    "TrainConfig",
    "apply_override",
    "build",
    "check_device",
    "check_recipe",
    "load_config",
    "params_schema",
    "require_inputs",
]

PER_PIPELINE = ("name", "out", "stores_dir")  # teacher keys a pass of `teachers` cannot set


@dataclass
class Config(Section):
    """The whole pipeline configuration (one attribute per ``params.yaml`` section)."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The teacher passes DVC runs (stage teacher-logits@NAME, one store each): NAME -> the keys of teacher that
    differ for that pass (model, checkpoint, ...). Empty: `run-stage teacher-logits` runs teacher alone."""
    pack: PackConfig = field(default_factory=PackConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    package: PackageConfig = field(default_factory=PackageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, key: str) -> None:
        if self.prepare.splits == "auto":  # the one dataset switch: the splits follow dataset.name
            from picosam_pipeline.datasets import dataset_splits

            self.prepare.splits = [
                SplitSource(*split) for split in dataset_splits(self.dataset.name, self.dataset.folder)
            ]
            if self.dataset.name == "sample" and Path(self.sample.out_dir) != Path(self.dataset.folder):
                raise ConfigError(
                    f"sample.out_dir: with dataset.name sample the sample stage must write the dataset's "
                    f"folder {self.dataset.folder}, got {self.sample.out_dir!r}; set one to the other"
                )
        for name in self.teachers:
            self.teacher_pass(name)  # every pass must build a valid teacher section

    def teacher_pass(self, name: str) -> Config:
        """This config with ``teacher`` resolved for pass ``name``: ``teachers[name]`` over ``teacher``, the store at
        ``<teacher.stores_dir>/<name>.zarr``. Raises ConfigError for an unknown pass or an invalid override."""
        if name not in self.teachers:
            known = ", ".join(self.teachers) or "none: params.yaml has no teachers section"
            raise ConfigError(f"teachers.{name}: no such teacher pass; the passes are {known}")
        if not TEACHER_NAME.fullmatch(name) or name in TARGET_RULES:
            raise ConfigError(
                f"teachers.{name}: a pass name is lower-case letters, digits and _ (at most 32), not one "
                f"of {list(TARGET_RULES)}; rename it"
            )
        override = self.teachers[name] or {}
        if not isinstance(override, dict):
            raise ConfigError(
                f"teachers.{name}: expected a mapping of teacher keys (e.g. {{model: sam3}}), got {override!r}"
            )
        fixed = sorted(set(override) & set(PER_PIPELINE))
        if fixed:
            raise ConfigError(
                f"teachers.{name}.{fixed[0]}: set per pipeline, not per pass (the store of pass {name} is "
                f"<teacher.stores_dir>/{name}.zarr); remove it"
            )
        merged = {
            **dataclasses.asdict(self.teacher),
            **override,
            "name": name,
            "out": str(Path(self.teacher.stores_dir) / f"{name}.zarr"),
        }
        return dataclasses.replace(self, teacher=build(TeacherConfig, merged, f"teachers.{name}"))


# --------------------------------------------------------------------------------------------------
# loading

# Bounds on what a params file (or an override) may be. The project's params.yaml is a few KiB and a few hundred
# values; a YAML bomb is small on disk, so the node count bounds its expansion, aliases counted at every use.
MAX_PARAMS_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None), apply ``key.path=value`` overrides, validate.

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type or impossible value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"params file {str(path)!r} is a folder; pass the params.yaml file inside it with --params"
            )
        if not path.exists():
            raise ConfigError(
                f"params file {str(path)!r} does not exist; pass --params FILE or run from the repository root"
            )
        raw = _read_params(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"params file {str(path)!r}: expected a mapping of sections at the top level")
    for item in overrides:
        apply_override(raw, item)
    try:
        sources = apply_recipe(raw)  # keys left out or `auto` take the recipe's values
    except RecipeError as err:
        raise ConfigError(str(err)) from None
    cfg = build(Config, raw, "")
    check_recipe(cfg, sources)
    return cfg


def _read_params(path: Path) -> Any:
    """The parsed params file: a regular UTF-8 file of at most :data:`MAX_PARAMS_BYTES`, YAML within bounds."""
    what = f"params file {str(path)!r}"
    try:
        data = read_bounded_bytes(path, what, MAX_PARAMS_BYTES)
    except UntrustedInputError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"{what} cannot be read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{what} is not UTF-8 text (a binary file?); pass the pipeline's params.yaml with --params"
        ) from None
    try:
        return load_yaml_bounded(text, what)
    except _NotYAML as err:
        raise ConfigError(f"{what} is not valid YAML: {err}") from None


class _NotYAML(Exception):
    """Text that is not YAML (the parser's message); an override's value is then taken as a plain string."""


def load_yaml_bounded(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``, refusing documents that would expand past the bounds.

    Aliases are counted at every use, so a "billion laughs" document (anchors of anchors) is refused from its node
    graph, before anything is built from it; nesting deeper than :data:`MAX_YAML_DEPTH`, a recursive alias and an
    integer too long to convert are refused too.

    Raises:
        ConfigError: a bound exceeded, naming ``what``.
        _NotYAML: not YAML at all.
    """
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, what)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        raise _NotYAML(str(err)) from None
    except RecursionError:  # the composer recurses per level; deeper than Python's stack is not a params file
        raise ConfigError(f"{what} is nested deeper than the YAML parser allows; no params value is") from None
    except ValueError as err:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise ConfigError(f"{what} holds a value that cannot be read ({err}); it is not a params value") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expansion(root: yaml.Node, what: str) -> None:
    """Refuse a node graph whose expansion (aliases repeated) has over :data:`MAX_YAML_NODES` nodes or is deeper
    than :data:`MAX_YAML_DEPTH`, or that contains itself. Walked without recursion, each node measured once."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes in its expansion, its depth)
    opened: set[int] = set()  # nodes whose children are being measured: the current path
    stack = [root]
    while stack:
        node = stack[-1]
        if id(node) in measured:
            stack.pop()
            continue
        children = _yaml_children(node)
        if id(node) not in opened:
            opened.add(id(node))
            if any(id(child) in opened for child in children):
                raise ConfigError(f"{what}: an alias refers to a value that contains it (a loop); remove the alias")
            stack.extend(child for child in children if id(child) not in measured)
            continue
        stack.pop()
        opened.discard(id(node))
        nodes = 1 + sum(measured[id(child)][0] for child in children)
        depth = 1 + max((measured[id(child)][1] for child in children), default=0)
        if nodes > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
            raise ConfigError(
                f"{what} expands to more than {MAX_YAML_NODES:,} values or {MAX_YAML_DEPTH} levels of nesting once "
                "its aliases (*name) are repeated; a params file is far smaller. Write the values out instead of "
                "nesting anchors"
            )
        measured[id(node)] = (nodes, depth)


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_recipe(cfg: Config, sources: dict[str, str] | None = None) -> None:
    """Refuse a student and a crop convention its recipe does not pair, before any stage runs.

    The conventions checked are those of the teacher passes the shards take (``pack.teachers``), each named by
    the key that set it (``teachers.NAME.prompt`` or ``teacher.prompt``).
    """
    prompts = {}
    for name in cfg.pack.teachers:
        if name in cfg.teachers:
            key = f"teachers.{name}.prompt" if "prompt" in (cfg.teachers[name] or {}) else "teacher.prompt"
            prompts[key] = cfg.teacher_pass(name).teacher.prompt
    if not prompts:
        prompts["teacher.prompt"] = cfg.teacher.prompt
    try:
        check_pairing(cfg.recipe.name, cfg.train.student, prompts, sources or {})
    except RecipeError as err:
        raise ConfigError(str(err)) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; ``value`` is parsed as YAML (``1``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. train.steps=200")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = load_yaml_bounded(text, f"override '{safe_text(item, 80)}'")
    except _NotYAML:
        value = text
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------------
# building: pydantic checks, the sections' validate, errors in the project's words

T = TypeVar("T")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def build(cls: type[T], data: Any, key: str) -> T:
    """Build dataclass ``cls`` (:class:`Config` or a section) from plain ``data`` (parsed YAML, JSON).

    pydantic checks the types and refuses unknown keys; then each section's ``validate`` runs, the nested ones
    first. ``key`` is where ``data`` sits (``teachers.sam3``), the prefix of the keys that messages name.

    Raises:
        ConfigError: the first problem, naming the key, the value and what is expected.
    """
    try:
        obj = _adapter(cls).validate_python(data)
    except ValidationError as err:
        raise ConfigError(_explain(err.errors(), cls, key)) from None
    _validate(obj, key)
    return obj


def _validate(obj: Any, key: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if dataclasses.is_dataclass(item):
                _validate(item, _join(key, f.name) + ("" if i is None else f"[{i}]"))
    obj.validate(key or type(obj).__name__)


class _Spot(NamedTuple):
    """Where a pydantic error is, in params.yaml's terms."""

    key: str  # as params.yaml spells it: prepare.splits[0].images
    type: Any  # the key's type in the schema (None for an unknown key)
    owner: Any  # the dataclass the key is a field of
    union: str | None  # the key of the union whose members pydantic tried, if the error is in one
    union_type: Any  # that union
    member: bool  # the error is about a whole member of that union (the value is not of its kind)


def _explain(errors: list[dict[str, Any]], cls: type, prefix: str) -> str:
    """pydantic's first error as one line in the project's words: ``key: expected ..., got ...``."""
    spots = [_locate(cls, err["loc"], prefix) for err in errors]
    err, spot = errors[0], spots[0]
    if spot.member:  # the value is of no member's kind, or of one member's with a wrong part: report that part
        rivals = [(e, s) for e, s in zip(errors, spots) if s.union == spot.union]
        telling = [(e, s) for e, s in rivals if not (s.member and _is_mismatch(e["type"]))]
        if not telling:
            words = [word for member in typing.get_args(spot.union_type) for word in _describe(member)]
            return f"{spot.key}: expected {', '.join(words[:-1])} or {words[-1]}, got {err['input']!r}"
        err, spot = telling[0]
    kind, value, key = err["type"], err["input"], spot.key
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        where, _, name = key.rpartition(".")
        accepted = sorted(f.name for f in dataclasses.fields(spot.owner))
        close = difflib.get_close_matches(name, accepted, n=1)
        if close:  # the likely fix alone: the whole list would bury it
            return f"{key}: unknown key; did you mean {where + '.' if where else ''}{close[0]}?"
        return f"{key}: unknown key; {where or 'params'} accepts {accepted}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "finite_number" or (kind == "float_type" and type(value) is int):  # an int too big for a float
        return f"{key}: expected a finite number, got {value!r} (YAML reads .nan and .inf as numbers)"
    if kind == "literal_error":
        return f"{key}: expected one of {list(typing.get_args(spot.type))}, got {value!r}"
    if kind in ("dataclass_type", "dataclass_exact_type"):
        keys = sorted(f.name for f in dataclasses.fields(spot.type))
        return f"{key}: expected a mapping with keys {keys}, got {value!r}"
    if kind == "greater_than":  # the bounds of the types PositiveInt ... (config_schema.py)
        bound = err["ctx"]["gt"]
        return f"{key}: expected {'a positive number' if bound == 0 else f'a number > {bound:g}'}, got {value}"
    if kind == "greater_than_equal":
        return f"{key}: expected a number >= {err['ctx']['ge']:g}, got {value}"
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {value!r}"
    return f"{key}: {err['msg']}, got {value!r}"  # our own errors (int_64_bits) say what is expected


_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
}


def _is_mismatch(kind: str) -> bool:
    """The error says the value is of another kind than the type (not that a value of the kind is wrong)."""
    return kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "int_from_float")


def _locate(cls: type, loc: tuple[Any, ...], prefix: str) -> _Spot:
    """Follow a pydantic error location through the schema types."""
    key, tp, owner, union, union_type, member = prefix, cls, None, None, None, False
    for item in loc:
        tp, member = _bare(tp), False
        if item == "[key]":  # a mapping's key (not its value) is wrong
            continue
        if _is_union(tp):  # `item` names the member pydantic tried; below a member only a list or a section has keys
            union, union_type, member = key, tp, True
            tp = next((m for m in typing.get_args(tp) if _has_keys(m)), None)
        elif dataclasses.is_dataclass(tp):
            owner, tp, key = tp, _hints(tp).get(item), _join(key, item)
        elif typing.get_origin(tp) is list:
            tp, key = typing.get_args(tp)[0], f"{key}[{item}]"
        elif typing.get_origin(tp) is dict:
            tp, key = typing.get_args(tp)[1], _join(key, str(item))
    return _Spot(key or "params", _bare(tp), owner, union, union_type, member)


def _describe(tp: Any) -> list[str]:
    """A union member as the alternatives the messages name, e.g. ``["true", "false"]`` for bool."""
    tp = _bare(tp)
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    words = {bool: ["true", "false"], int: ["an integer"], float: ["a number"], str: ["a string"]}
    return words.get(tp) or ["a list" if typing.get_origin(tp) is list else "a mapping"]


def _bare(tp: Any) -> Any:
    """``tp`` without ``Annotated`` (pydantic's constraints) and without ``| None``."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif _is_union(tp) and type(None) in typing.get_args(tp):
            rest = tuple(a for a in typing.get_args(tp) if a is not type(None))
            tp = rest[0] if len(rest) == 1 else typing.Union[rest]  # noqa: UP007
        else:
            return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _has_keys(tp: Any) -> bool:
    tp = _bare(tp)
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (list, dict)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


# --------------------------------------------------------------------------------------------------
# the JSON Schema of params.yaml


def params_schema() -> dict[str, Any]:
    """The JSON Schema of ``params.yaml`` as written, before the recipe fills its ``auto`` keys.

    pydantic's schema of :class:`Config` (the docstrings of the sections and of their fields as descriptions),
    with ``auto`` allowed for the keys a recipe fills (``recipes.RECIPE_KEYS``) and the entries of ``teachers``
    checked as partial ``teacher`` sections. ``picosam-pipeline params-schema`` writes it to ``params.schema.json``.
    """
    schema = _adapter(Config).json_schema(schema_generator=_KeysUntitled)
    for section in Section.__subclasses__():  # pydantic leaves a plain dataclass's docstring out
        if section.__name__ in schema["$defs"]:
            schema["$defs"][section.__name__]["description"] = inspect.cleandoc(section.__doc__)
    keys = {
        name: schema["$defs"][section.__name__]["properties"]
        for name, section in _hints(Config).items()
        if dataclasses.is_dataclass(section)
    }  # section name -> its keys' schemas
    for dotted in RECIPE_KEYS:
        name, key = dotted.split(".")
        keys[name][key] = _or_auto(keys[name][key])
    schema["properties"]["teachers"]["additionalProperties"] = {
        "type": "object",
        "description": f"the teacher keys that differ for this pass (all but {', '.join(PER_PIPELINE)})",
        "properties": {key: value for key, value in keys["teacher"].items() if key not in PER_PIPELINE},
        "additionalProperties": False,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "picosam-pipeline params.yaml",
        "description": "One section per stage (picosam_pipeline/config_schema.py). Generated by "
        "`picosam-pipeline params-schema`; do not edit.",
    }


class _KeysUntitled(GenerateJsonSchema):
    """pydantic's schema without a title per key (``Store Size`` for store_size): the description says more."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _or_auto(prop: dict[str, Any]) -> dict[str, Any]:
    """A key's schema that also allows ``auto`` (the recipe's value)."""
    meta = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
    note = "auto: the value of recipe.name's paper (picosam_pipeline/recipes.py)"
    meta["description"] = f"{meta['description']}. {note}" if "description" in meta else note
    return {**meta, "anyOf": [*prop.pop("anyOf", [prop]), {"const": "auto", "type": "string"}]}


# --------------------------------------------------------------------------------------------------
# inputs


def require_inputs(paths: dict[str, str]) -> None:
    """Raise :class:`ConfigError` for the first ``{key: path}`` whose path does not exist."""
    for key, p in paths.items():
        if not Path(p).exists():
            raise ConfigError(
                f"{key}: path {p!r} does not exist; fix the path in params.yaml or with --set {key}=PATH "
                "(an earlier stage's output: run that stage, or `dvc pull` it from the team's remote)"
            )
