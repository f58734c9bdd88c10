"""What the database cannot store never reaches it: refused at the boundary, by class.

PostgreSQL refuses a NUL in any text and an integer beyond a column's range (``int4``: 2^31 -
1); SQLite overflows past 2^63. Either would surface as a 500 after part of a request had run.
So, before any route runs:

* a path, query value or header holding a control character is refused (404 for a path, 422
  for a query value, 400 for a header), by ``app.inputs.ControlCharacters``;
* a request body's strings may hold tabs and line breaks but no other control character
  (``Input``, the base of every JSON body, and ``Text`` for form fields);
* every integer that names a stored row or lands in an integer column is at most ``INT4_MAX``
  (``VersionNumber`` and the fields of the bodies).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, model_validator

INT4_MAX = 2**31 - 1  # the largest value of a PostgreSQL integer column
ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tabs and line breaks pass
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a header may hold a tab

VersionNumber = Annotated[int, Field(ge=1, le=INT4_MAX)]


def _refuse_control(value: str) -> str:
    if TEXT_CONTROL.search(value):
        raise ValueError("control characters (such as NUL) are not allowed")
    return value


Text = Annotated[str, AfterValidator(_refuse_control)]  # a form field's string


def control_character_at(data: Any, where: str = "") -> str | None:
    """The path (``a.b[2]``) of the first string in ``data`` that holds a control character
    other than a tab or a line break, in its values or keys; None when there is none."""
    if isinstance(data, str):
        return where or "value" if TEXT_CONTROL.search(data) else None
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and TEXT_CONTROL.search(key):
                return here
            if found := control_character_at(value, here):
                return found
    if isinstance(data, list | tuple):
        for i, value in enumerate(data):
            if found := control_character_at(value, f"{where}[{i}]"):
                return found
    return None


class Input(BaseModel):
    """The base of every request body: no string in it may hold a control character other
    than a tab or a line break."""

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        if found := control_character_at(data):
            raise ValueError(f"{found}: control characters (such as NUL) are not allowed")
        return data
