"""What prunekit reads from a file is parsed once, at the edge, against a typed schema.

Recipes, report.json, the metadata of safetensors and ONNX files and the parts of a Hugging
Face config.json that prunekit uses are each described by a pydantic model (strict: no
``true`` for a number, no ``10.7`` for an integer, no unknown keys where the file is ours). A
failure becomes one line naming the file, the key and what it must be.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from prunekit.errors import InputFileError, did_you_mean

T = TypeVar("T")

MAX_JSON_BYTES = 16 << 20  # metadata and recipes are small; more can only be a mistake


class Strict(BaseModel):
    """A schema for a document prunekit writes: exact types, no unknown keys, frozen."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class Lenient(BaseModel):
    """A schema for the keys prunekit reads from another tool's document (others ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)


# how pydantic tags the members of a union in an error's location
UNION_MEMBERS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean"}


def one_line(exc: ValidationError, schema: Any = None, limit: int = 40) -> str:
    """The first problem of a validation error as 'key.sub: what it must be (got VALUE)'; an
    unknown key names the known ones closest to it."""
    errors = exc.errors(include_url=False)
    error, loc = errors[0], tuple(errors[0]["loc"])
    message = error["msg"][0].lower() + error["msg"][1:]
    # one value that matched no member of a union: pydantic reports each member, its
    # location ending in the member's tag
    members = [e for e in errors if tuple(e["loc"][:-1]) == loc[:-1]
               and str(e["loc"][-1:][0] if e["loc"] else "") in UNION_MEMBERS]  # fmt: skip
    union = error["type"] != "extra_forbidden" and len(members) >= 2 and error in members
    if union:
        loc = loc[:-1]
        kinds = [UNION_MEMBERS[str(e["loc"][-1])] for e in members]
        message = f"input should be {' or '.join(kinds)}"
    where = ".".join(str(part) for part in loc) or "the document"
    more = len(errors) - (len(members) if union else 1)
    extra = f"; {more} more problem(s)" if more > 0 else ""
    if error["type"] == "extra_forbidden":
        known = _keys_at(schema, loc[:-1])
        hint = did_you_mean(str(loc[-1]), known) if known else ""
        return f"{where}: unknown option ({hint}known: {', '.join(known)}){extra}"
    if error["type"] == "json_invalid":  # the text itself is not echoed back
        return f"{where}: {message}{extra}"
    got = repr(error.get("input"))
    got = got if len(got) <= limit else got[: limit - 3] + "..."
    return f"{where}: {message} (got {got}){extra}"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (directly, in Optional, in Json[...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for inner in get_args(annotation):
        found = _model_in(inner)
        if found is not None:
            return found
    return None


def _keys_at(schema: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys the (nested) pydantic model at ``loc`` of ``schema`` accepts."""
    model = _model_in(schema)
    for part in loc:
        if model is None:
            return []
        fields = model.model_fields.items()
        field = next((f for n, f in fields if (f.alias or n) == part), None)
        model = _model_in(field.annotation) if field is not None else None
    return sorted(f.alias or n for n, f in model.model_fields.items()) if model else []


def parsed(schema: type[T], document: str | bytes | Any, source: str, fix: str) -> T:
    """``document`` (JSON text, or already-parsed JSON-like data) checked against ``schema``;
    an InputFileError naming ``source``, the key and ``fix`` otherwise."""
    adapter: TypeAdapter[T] = TypeAdapter(schema)
    try:
        if isinstance(document, str | bytes):
            if len(document) > MAX_JSON_BYTES:
                raise InputFileError(f"{source}: {len(document):,} bytes of JSON; {fix}")
            return adapter.validate_json(document)
        # data from TOML or json.loads: JSON's types checked the way JSON text is (NaN and
        # infinity pass through, for the schema to refuse by name)
        return adapter.validate_json(json.dumps(document, default=_plain))
    except ValidationError as exc:
        raise InputFileError(f"{source}: {one_line(exc, schema)}; {fix}") from None
    except TypeError as exc:  # not JSON-like (a TOML date, an object)
        raise InputFileError(f"{source}: {exc}; {fix}") from None
    except RecursionError:
        raise InputFileError(f"{source}: nested too deeply; {fix}") from None
    except ValueError as exc:  # an integer of thousands of digits, a circular reference
        raise InputFileError(f"{source}: {str(exc)[:100]}; {fix}") from None


def _plain(value: object) -> object:
    """A numpy scalar as the Python number it holds; anything else not JSON is refused."""
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item) and getattr(value, "ndim", 1) == 0:
        return item()
    raise TypeError(
        f"a value of type {type(value).__name__} ({str(value)[:30]!r}) is not a number, "
        "string, boolean, list or table"
    )
