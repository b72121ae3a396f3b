"""JSON Schema checks for the quality rules, with compiled validators cached.

The same few schemas (a client's `response_format`, its tools' parameters) come with
request after request, and building a validator costs far more than using one (schema
checks, keyword lookups): validators are kept in a bounded LRU keyed by the schema's
canonical JSON. A schema that is not one (or that points at what cannot be resolved)
never fails scoring: the answer is simply not judged against it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

log = logging.getLogger("flywheel.rules")

CACHED_SCHEMAS = 512


def conforms(schema: Any, instance: Any) -> bool | None:
    """Whether `instance` is valid against `schema`; None when the schema is unusable."""
    if not isinstance(schema, dict | bool):
        return None
    try:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    validator = _validator(key)
    if validator is None:
        return None
    try:
        return bool(validator.is_valid(instance))
    except Exception:  # noqa: BLE001 - unresolvable $ref and the like: the schema's fault
        return None


# A memo of a pure function, bounded, shared by the process's requests (what a cache of
# compiled schemas is for): not state anyone configures or reads.
@functools.lru_cache(maxsize=CACHED_SCHEMAS)
def _validator(canonical: bytes) -> Validator | None:
    schema = orjson.loads(canonical)
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError:
        log.debug("a request's JSON schema is not valid; answers are not checked against it")
        return None
    validator: Validator = cls(schema)
    return validator
