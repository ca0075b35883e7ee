"""The api-server's refusal of a trigger, explained in words for the ``gpu_training`` params.

Airflow validates a new dag run's conf against each param's JSON schema in the api-server
(``SerializedParamsDict.validate``) and answers 400 with ``str()`` of jsonschema's error: the regex
and the whole schema as a Python dict, naming the param's key. The trigger dialog shows that text as
it is. Airflow offers no hook for the message, so :func:`install` wraps that one method: when a
param of ours (its schema carries :data:`~gpu_training.params.PARAM_MARKER`) is refused, the
refusal names the field's title and says what it allows (``Project (project_id): '../../etc' is not
allowed: 1 to 64 letters, digits, '_', '.' or '-'``). Any other DAG's params, and anything the
wrapper does not recognise, keep Airflow's own message. ``tests/e2e/cluster/test_trigger_form.py``
reads this message in the real dialog, so an Airflow upgrade that moves the method fails a test
rather than silently losing the words.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


def explain(params: Any) -> str | None:
    """The first of our params that its schema refuses, in words (None: none of ours is refused)."""
    import jsonschema

    from gpu_training.params import PARAM_MARKER, PARAM_SPECS, refusal

    for key in params:
        param = params.get_param(key)
        name = param.schema.get(PARAM_MARKER)
        if name not in PARAM_SPECS:
            continue
        try:
            jsonschema.validate(param.value, param.schema)
        except jsonschema.ValidationError:
            return refusal(name, param.value)
    return None


def install() -> bool:
    """Wrap ``SerializedParamsDict.validate`` once (idempotent); False where Airflow has no such method."""
    try:
        from airflow.exceptions import ParamValidationError
        from airflow.serialization.definitions.param import SerializedParamsDict
    except ImportError:  # another Airflow version: its own messages stay
        log.warning("gpu_training: Airflow's SerializedParamsDict not found; trigger refusals keep Airflow's wording")
        return False
    original = SerializedParamsDict.validate
    if getattr(original, "_explains_gpu_training", False):
        return True

    @functools.wraps(original)
    def validate(self: Any) -> dict[str, Any]:
        try:
            return original(self)
        except ParamValidationError:
            try:
                words = explain(self)
            except Exception:  # never worse than Airflow's own message
                words = None
            if words is None:
                raise
            raise ParamValidationError(words) from None

    validate._explains_gpu_training = True  # type: ignore[attr-defined]
    SerializedParamsDict.validate = validate  # type: ignore[method-assign]
    return True
