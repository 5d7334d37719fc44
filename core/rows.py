"""Model instances from plain SQL rows, for the few requests where the ORM costs more than the
database: every API call's token lookup and a rater's next-task and submit calls
(benchmarks/grading_load.py). Compiling a three-table ``select_related`` query takes ~1.3 ms of
Python here; PostgreSQL answers it in ~0.1 ms.

Values go through the same converters the ORM applies (JSON decoding, SQLite's datetimes), so
an instance loaded here is the instance the ORM would have built.
"""

from collections.abc import Iterator
from functools import lru_cache

from django.db import DEFAULT_DB_ALIAS, connection, connections


def columns(model, alias: str) -> str:
    """``alias.column, …`` for every concrete field of ``model``, in field order."""
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(f.column)}" for f in model._meta.concrete_fields)


def instance(model, values: Iterator):
    """The ``model`` instance for the next ``len(concrete_fields)`` values of a row."""
    conn = connections[DEFAULT_DB_ALIAS]  # `connection` costs a thread-local lookup per use
    attnames, converters = _plan(model, conn)
    loaded = []
    for convert in converters:
        value = next(values)
        for fn, col in convert:
            value = fn(value, col, conn)
        loaded.append(value)
    return model.from_db(conn.alias, attnames, loaded)


@lru_cache(maxsize=64)
def _plan(model, conn):
    fields = model._meta.concrete_fields
    converters = []
    for field in fields:
        col = field.get_col(model._meta.db_table)
        fns = conn.ops.get_db_converters(col) + field.get_db_converters(conn)
        converters.append([(fn, col) for fn in fns])
    return [f.attname for f in fields], converters


def prefetched(obj, related_name: str, related: list) -> None:
    """Leave ``related`` as ``obj.<related_name>.all()``, as ``prefetch_related`` would, for
    rows that came with ``obj`` in one query."""
    queryset = getattr(obj, related_name).all()
    queryset._result_cache, queryset._prefetch_done = list(related), True
    obj._prefetched_objects_cache = {
        **getattr(obj, "_prefetched_objects_cache", {}),
        related_name: queryset,
    }
