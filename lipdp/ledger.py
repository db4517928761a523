"""The privacy ledger: dp-accounting events to JSON and back (what ``privacy.json`` stores)."""

import collections

from dp_accounting import dp_event

from lipdp.errors import PrivacyParameterError


def _named_tuple_to_json(value):
    if isinstance(value, dp_event.DpEventNamedTuple):
        return {key: _named_tuple_to_json(item) for key, item in value._asdict().items() if key != "module_name"}
    if isinstance(value, (list, tuple)):
        return [_named_tuple_to_json(item) for item in value]
    return value


def _json_to_named_tuple(value):
    if isinstance(value, dict):
        name = value.get("class_name")
        cls = getattr(dp_event, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
            raise PrivacyParameterError(f"ledger entry is not a dp_accounting event: {value!r}")
        fields = {key: _json_to_named_tuple(item) for key, item in value.items() if key != "class_name"}
        event_tuple = collections.namedtuple(name, ["module_name", "class_name", *fields])
        return event_tuple(module_name=dp_event.__name__, class_name=name, **fields)
    if isinstance(value, list):
        return [_json_to_named_tuple(item) for item in value]
    return value


def ledger_to_json(event):
    """Converts a ``DpEvent`` into a JSON-compatible dict.

    Uses ``DpEvent.to_named_tuple``, dp_accounting's serialisation format;
    each event becomes a dict with its ``class_name`` and fields.
    """
    return _named_tuple_to_json(event.to_named_tuple())


def ledger_from_json(data):
    """Inverse of :func:`ledger_to_json` (via ``DpEvent.from_named_tuple``).

    Only event classes of ``dp_accounting.dp_event`` are accepted.

    Raises:
        PrivacyParameterError: ``data`` names something else than an event.
    """
    return dp_event.DpEvent.from_named_tuple(_json_to_named_tuple(data))
