"""Bounds of the job spec's raw inputs, declared once: each is what the code that later uses the value
accepts, so that a value past it is refused at submission (422, naming the field and the fix) rather
than admitted and then failing on the worker, or failing in the API with a 500.

- seeds: torch's ``Generator.manual_seed`` takes an unsigned 64-bit integer (0..2**64-1);
- text: a string from JSON may hold a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON), which no
  UTF-8 encoder accepts (the tokenizer, the database driver, the file system); a NUL character
  cannot be stored in a PostgreSQL text column nor be part of a file name (:func:`utf8` also checks
  the API's path and query parameters that reach the database);
- model ids that name files: a path component is at most 255 bytes (``NAME_MAX`` of Linux file
  systems; the whole id is at most 512 characters, far below ``PATH_MAX``); a Hugging Face hub
  owner and repository name are at most 96 characters each (as ``huggingface_hub`` validates them).
"""

from __future__ import annotations

from pydantic import BeforeValidator

MAX_SEED = 2**64 - 1
NAME_MAX_BYTES = 255
HUB_NAME_MAX_CHARS = 96
_PKG = "pkg:"


def _shown(part: str, width: int = 24) -> str:
    return repr(part if len(part) <= width else part[:width] + "…")


def utf8_text(text: str, what: str, *, nul: bool = True) -> str:
    """``text`` if UTF-8 can encode it (and, with ``nul=False``, it holds no NUL character); else
    ValueError naming ``what``, the character and its position (0-based, in characters)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode: a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at "
            f"character {exc.start}, which UTF-8 cannot encode; send the text as UTF-8, with the "
            "surrogate paired with its other half or removed"
        ) from None
    if not nul and "\x00" in text:
        raise ValueError(
            f"{what} has a NUL character (U+0000) at character {text.index(chr(0))}, which neither a "
            "PostgreSQL text column nor a file name can hold; remove it"
        )
    return text


def utf8(what: str, *, nul: bool = True) -> BeforeValidator:
    """The pydantic validator of a text field: ``Annotated[str, utf8("label")]`` (:func:`utf8_text`).
    It runs before the field's own checks: a length constraint refuses a lone surrogate too, but
    only as "unable to parse raw data as a unicode string"."""

    def check(value: object) -> object:
        return utf8_text(value, what, nul=nul) if isinstance(value, str) else value

    return BeforeValidator(check)


def _check_components(path: str, what: str) -> None:
    for part in path.split("/"):
        size = len(part.encode("utf-8"))
        if size > NAME_MAX_BYTES:
            raise ValueError(
                f"{what} has a path component of {size} bytes ({_shown(part)}); a file or folder name "
                f"is at most {NAME_MAX_BYTES} bytes (NAME_MAX): rename it, or link it under a shorter name"
            )


def path_like(value: str, what: str) -> str:
    """``value`` (a file name, or a relative path inside a folder) if every component fits a file system."""
    _check_components(value, what)
    return value


def model_id(ident: str, what: str = "model.id") -> str:
    """``ident`` if the file system or the hub can take it: components of an absolute path or of a
    ``pkg:`` file at most 255 bytes, the owner and name of a hub id at most 96 characters."""
    if ident.startswith(_PKG) or ident.startswith("/"):
        _check_components(ident.removeprefix(_PKG), what)
        return ident
    for part in ident.split("/"):
        if len(part) > HUB_NAME_MAX_CHARS:
            raise ValueError(
                f"{what} {_shown(ident, 48)} has a part of {len(part)} characters; a Hugging Face hub owner "
                f"or repository name is at most {HUB_NAME_MAX_CHARS} characters: check the id (owner/name)"
            )
    return ident
