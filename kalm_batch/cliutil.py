"""Flags from typed configs: one pydantic model gives the CLI subcommand and the jobs/ entrypoint the same options."""

from __future__ import annotations

import argparse
import json
import types
import typing

from pydantic import BaseModel


def _base_type(annotation):
    """The flag type of a field annotation (Optional[X] / X | None -> X; Literal -> choices)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, None)
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation))
    return annotation, None


def _parse_json(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected JSON, got {value!r}: {e}") from None


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """``--field-name`` for every field of ``model`` (required fields become required flags)."""
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        typ, choices = _base_type(field.annotation)
        kwargs: dict = {"dest": name, "help": field.description}
        if not field.is_required():
            kwargs["default"] = field.default
            kwargs["help"] = f"{field.description} (default: {field.default})"
        else:
            kwargs["required"] = True
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typ is dict or typing.get_origin(typ) is dict:
            kwargs["type"] = _parse_json
        elif typing.get_origin(typ) is list:  # --flag A B ... (the config's validator may split further)
            kwargs["type"], kwargs["nargs"] = str, "+"
        else:
            kwargs["type"] = typ if typ in (int, float, str) else str
            if choices:
                kwargs["choices"] = choices
        parser.add_argument(flag, **kwargs)


def model_from_args(model: type[BaseModel], ns: argparse.Namespace):
    """Build the config from parsed flags; pydantic's validation names the field on error."""
    return model(**{name: getattr(ns, name) for name in model.model_fields if hasattr(ns, name)})
