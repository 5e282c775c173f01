"""One length rule for every VARCHAR column on both databases.

SQLite stores a string of any length in a VARCHAR(200); PostgreSQL raises
StringDataRightTruncation. Checking every new or changed ORM row before the flush makes
both refuse the same value with the same one-line error, naming the field, before
anything is written."""

from __future__ import annotations

from sqlalchemy import String, event, inspect
from sqlalchemy.orm import Session

from ..limits import InputError


def _check(session: Session, _context: object, _instances: object) -> None:
    for obj in list(session.new) + list(session.dirty):
        mapper = inspect(obj).mapper
        for column in mapper.columns:
            length = getattr(column.type, "length", None)
            if not isinstance(column.type, String) or not length:
                continue
            value = getattr(obj, mapper.get_property_by_column(column).key, None)
            if isinstance(value, str) and len(value) > length:
                raise InputError(
                    f"{column.table.name}.{column.name} is {len(value)} characters long; the limit is {length}"
                )


event.listen(Session, "before_flush", _check)
