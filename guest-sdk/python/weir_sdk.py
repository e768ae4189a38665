"""weir_sdk: write Weir stream operators in Python.

A thin layer over the bindings `componentize-py` generates for the
`weir:operator` WIT package: typed keyed state (JSON-encoded exactly like
the Rust SDK, so state moves between languages across a savepoint), emits,
timers, errors, and the batch fast path. An operator is one class:

    import weir_sdk as weir

    class Count(weir.Operator):
        name, version = "count", "0.1.0"
        states = [weir.value_state("count", schema_version=1)]

        def open(self, config):
            self.count = weir.ValueState("count")

        def process(self, input, record):
            n = (self.count.get() or 0) + 1
            self.count.set(n)
            weir.emit(record.key, f"{record.key_str()} {n}")

    Operator, Metadata = weir.export(Count)

Build it with `componentize-py -d wit -w operator-plugin componentize
<module> -p . -p guest-sdk/python -o count.wasm`. Any exception raised by
the operator fails the call with its message; the host then applies the
job's restart strategy.
"""

import json
from typing import Any, Callable, List, Optional, Tuple, Type, Union

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log as _log
from wit_world.imports import output as _output
from wit_world.imports import state as _state
from wit_world.imports import timers as _timers
from wit_world.imports import types as _types

Bytes = Union[bytes, bytearray, str]

# ---------------------------------------------------------------- encoding


def encode(value: Any) -> bytes:
    """A value as the SDKs store it: compact UTF-8 JSON, as Rust's
    `serde_json::to_vec` writes it (map keys are compared as these bytes)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def decode(raw: bytes) -> Any:
    return json.loads(raw)


def _bytes(value: Optional[Bytes]) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


# ---------------------------------------------------------------- records


class Record:
    """One input record: `key` (bytes or None), `value` (bytes), `timestamp`
    (event time in ms, or None)."""

    __slots__ = ("key", "value", "timestamp")

    def __init__(self, key: Optional[bytes], value: bytes, timestamp: Optional[int]):
        self.key = key
        self.value = value
        self.timestamp = timestamp

    def key_str(self) -> str:
        """The key as text (the value if the record has no key)."""
        return (self.key if self.key is not None else self.value).decode()

    def value_str(self) -> str:
        return self.value.decode()


class _Emits:
    """Main-output records buffered during one host call, handed over as one
    `emit-batch` at its end."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.entries: List[_types.BatchEntry] = []

    def push(self, key: Optional[bytes], value: bytes, timestamp: Optional[int]) -> None:
        data = self.data
        key_offset = len(data)
        if key is not None:
            data += key
        value_offset = len(data)
        data += value
        self.entries.append(
            _types.BatchEntry(
                key_offset=key_offset,
                key_length=-1 if key is None else len(key),
                value_offset=value_offset,
                value_length=len(value),
                timestamp=timestamp if timestamp is not None else 0,
                has_timestamp=timestamp is not None,
            )
        )

    def flush(self) -> None:
        if self.entries:
            _output.emit_batch(_types.RecordBatch(data=bytes(self.data), entries=self.entries))
            self.data = bytearray()
            self.entries = []

    def discard(self) -> None:
        self.data = bytearray()
        self.entries = []


_emits = _Emits()


def emit(key: Optional[Bytes], value: Bytes, timestamp: Optional[int] = None) -> None:
    """Emits a record to the main output (str is encoded as UTF-8)."""
    _emits.push(_bytes(key), _bytes(value), timestamp)


def emit_to(side_output: str, key: Optional[Bytes], value: Bytes, timestamp: Optional[int] = None) -> None:
    """Emits a record to a named side output."""
    _output.emit_to(side_output, _types.Record(key=_bytes(key), value=_bytes(value), timestamp=timestamp))


# ---------------------------------------------------------------- state


class ValueState:
    """One value per key, any JSON-serialisable Python value."""

    def __init__(self, name: str):
        self.name = name

    def get(self, default: Any = None) -> Any:
        raw = _state.value_get(self.name)
        return default if raw is None else decode(raw)

    def set(self, value: Any) -> None:
        _state.value_set(self.name, encode(value))

    def clear(self) -> None:
        _state.value_clear(self.name)


class ListState:
    """A list of values per key."""

    def __init__(self, name: str):
        self.name = name

    def get(self) -> List[Any]:
        return [decode(item) for item in _state.list_get(self.name)]

    def add(self, value: Any) -> None:
        _state.list_add(self.name, encode(value))

    def update(self, values: List[Any]) -> None:
        _state.list_update(self.name, [encode(v) for v in values])

    def clear(self) -> None:
        _state.list_clear(self.name)


class MapState:
    """A map per key; keys and values any JSON-serialisable value (keys
    should be ints, strings, or lists of those)."""

    def __init__(self, name: str):
        self.name = name

    def get(self, key: Any, default: Any = None) -> Any:
        raw = _state.map_get(self.name, encode(key))
        return default if raw is None else decode(raw)

    def put(self, key: Any, value: Any) -> None:
        _state.map_put(self.name, encode(key), encode(value))

    def remove(self, key: Any) -> None:
        _state.map_remove(self.name, encode(key))

    def contains(self, key: Any) -> bool:
        return _state.map_contains(self.name, encode(key))

    def entries(self) -> List[Tuple[Any, Any]]:
        return [(decode(k), decode(v)) for k, v in _state.map_entries(self.name)]

    def keys(self) -> List[Any]:
        return [decode(k) for k in _state.map_keys(self.name)]

    def clear(self) -> None:
        _state.map_clear(self.name)


def value_state(name: str, schema_version: int = 1) -> _types.StateDescriptor:
    return _types.StateDescriptor(name=name, kind=_types.StateKind.VALUE, schema_version=schema_version)


def list_state(name: str, schema_version: int = 1) -> _types.StateDescriptor:
    return _types.StateDescriptor(name=name, kind=_types.StateKind.LIST, schema_version=schema_version)


def map_state(name: str, schema_version: int = 1) -> _types.StateDescriptor:
    return _types.StateDescriptor(name=name, kind=_types.StateKind.MAP, schema_version=schema_version)


class StateTtl:
    """A state's time-to-live: a cell (a key's value, its whole list or map)
    not updated for `millis` expires and reads as absent. See `ttl`."""

    def __init__(self, millis: int, refreshed_on_read: bool = False, event_time: bool = False):
        if millis <= 0:
            raise ValueError("a TTL must be longer than zero")
        self.millis = millis
        self.refreshed_on_read = refreshed_on_read
        self.event_time = event_time


def ttl(
    *,
    days: float = 0,
    hours: float = 0,
    minutes: float = 0,
    seconds: float = 0,
    refreshed_on_read: bool = False,
    event_time: bool = False,
) -> StateTtl:
    """A TTL for `Operator.ttls`, e.g. `{"count": weir.ttl(days=30)}`:
    refreshed by writes (and reads with `refreshed_on_read`), measured in
    processing time (the watermark with `event_time`). A job file's
    `state_ttl` overrides it."""
    millis = round((((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 1000)
    return StateTtl(millis, refreshed_on_read, event_time)


def _declare_ttls(ttls: "dict[str, StateTtl]") -> None:
    for name, t in ttls.items():
        update = _state.TtlUpdate.ON_READ_AND_WRITE if t.refreshed_on_read else _state.TtlUpdate.ON_CREATE_AND_WRITE
        domain = _types.TimeDomain.EVENT_TIME if t.event_time else _types.TimeDomain.PROCESSING_TIME
        _state.declare_ttl(name, t.millis, update, domain)


# ---------------------------------------------------------------- time


EVENT_TIME = _types.TimeDomain.EVENT_TIME
PROCESSING_TIME = _types.TimeDomain.PROCESSING_TIME


def register_event_time_timer(timestamp: int) -> None:
    _timers.register_event_time_timer(timestamp)


def delete_event_time_timer(timestamp: int) -> None:
    _timers.delete_event_time_timer(timestamp)


def register_processing_time_timer(timestamp: int) -> None:
    _timers.register_processing_time_timer(timestamp)


def delete_processing_time_timer(timestamp: int) -> None:
    _timers.delete_processing_time_timer(timestamp)


def current_watermark() -> int:
    return _timers.current_watermark()


def current_processing_time() -> int:
    return _timers.current_processing_time()


def log(message: str, level: str = "info") -> None:
    """Logs through the host (`trace`, `debug`, `info`, `warn`, `error`)."""
    _log.log(_log.Level[level.upper()], message)


# ---------------------------------------------------------------- operator


class Operator:
    """Subclass it: set `name`, `version`, `states` (and `ttls`); implement `open`,
    `process`, and optionally `on_timer` and `close`."""

    name: str = "operator"
    version: str = "0.0.0"
    states: List[_types.StateDescriptor] = []
    # Time-to-lives by state name, e.g. {"count": ttl(days=30)}.
    ttls: "dict[str, StateTtl]" = {}

    def open(self, config: dict) -> None:
        pass

    def process(self, input: int, record: Record) -> None:
        raise NotImplementedError("process")

    def on_timer(self, timer: _types.Timer) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def migrate(state: str, from_version: int, value: Any) -> Any:
        """Converts a stored value (decoded) of `state` written at schema
        version `from_version` to the current one; see `export_migration`."""
        raise ValueError(f"no migration for state `{state}` from schema version {from_version}")


def _guarded(call: Callable[[], None]) -> None:
    """Runs an operator call: flushes its emits on success; turns any
    exception into the call's error (its emits are dropped)."""
    try:
        call()
    except Err:
        _emits.discard()
        raise
    except Exception as error:  # noqa: BLE001 - every failure becomes the call's error
        _emits.discard()
        raise Err(f"{type(error).__name__}: {error}")
    _emits.flush()


def export(cls: Type[Operator]) -> Tuple[type, type]:
    """The `Operator` and `Metadata` export classes for `cls`; assign them
    at the top level of the module you componentize."""
    holder: List[Operator] = []

    def instance() -> Operator:
        if not holder:
            raise Err("weir_sdk: operator called before `open`")
        return holder[0]

    class _Operator(exports.Operator):
        def open(self, config: str) -> None:
            def run() -> None:
                op = cls()
                holder.append(op)
                op.open(json.loads(config) if config else {})

            _guarded(run)

        def process(self, input: int, record: _types.Record) -> None:
            op = instance()
            _guarded(lambda: op.process(input, Record(record.key, record.value, record.timestamp)))

        def process_batch(self, input: int, batch: _types.RecordBatch) -> None:
            op = instance()
            data = batch.data
            select = _state.select_record

            def run() -> None:
                for index, e in enumerate(batch.entries):
                    select(index)
                    key = None if e.key_length < 0 else data[e.key_offset : e.key_offset + e.key_length]
                    value = data[e.value_offset : e.value_offset + e.value_length]
                    op.process(input, Record(key, value, e.timestamp if e.has_timestamp else None))

            _guarded(run)

        def on_timer(self, timer: _types.Timer) -> None:
            op = instance()
            _guarded(lambda: op.on_timer(timer))

        def close(self) -> None:
            op = instance()
            _guarded(op.close)

    class _Metadata(exports.Metadata):
        def describe(self) -> _types.PluginInfo:
            _declare_ttls(cls.ttls)
            return _types.PluginInfo(
                name=cls.name, version=cls.version, states=list(cls.states), batch_input=True
            )

    return _Operator, _Metadata


def export_migration(cls: Type[Operator]) -> type:
    """The `Migration` export class for `cls` (build with
    `-w migrating-operator-plugin`): the host calls `cls.migrate` with each
    stored value, decoded, and stores what it returns, encoded."""

    class _Migration(exports.Migration):  # type: ignore[attr-defined]
        def migrate(self, state: str, from_version: int, value: bytes) -> bytes:
            try:
                return encode(cls.migrate(state, from_version, decode(value)))
            except Err:
                raise
            except Exception as error:  # noqa: BLE001
                raise Err(f"{type(error).__name__}: {error}")

    return _Migration
