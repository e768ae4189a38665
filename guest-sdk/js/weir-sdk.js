// weir-sdk for JavaScript: write Weir stream operators in JavaScript,
// built into Wasm components with ComponentizeJS (StarlingMonkey).
//
// A thin layer over the `weir:operator` imports ComponentizeJS provides:
// typed keyed state (JSON-encoded exactly like the Rust SDK, so state moves
// between languages across a savepoint), emits, timers, errors, and the
// batch fast path. An operator is one class:
//
//   import { Operator, ValueState, valueState, emit, exportOperator } from './weir-sdk.js';
//
//   class Count extends Operator {
//     static pluginName = 'count';  static version = '0.1.0';
//     static states = [valueState('count', 1)];
//     open(config) { this.count = new ValueState('count'); }
//     process(input, record) {
//       const n = this.count.get(0) + 1;
//       this.count.set(n);
//       emit(record.key, `${record.keyString()} ${n}`);
//     }
//   }
//
//   export const { operator, metadata } = exportOperator(Count);
//
// Anything thrown fails the call with its message; the host then applies
// the job's restart strategy.

import * as state from 'weir:operator/state@0.1.0';
import * as output from 'weir:operator/output@0.1.0';
import * as timers from 'weir:operator/timers@0.1.0';
import { log as hostLog } from 'weir:operator/log@0.1.0';

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/** A value as the SDKs store it: compact UTF-8 JSON (map keys are compared as these bytes). */
export function encode(value) {
  return utf8.encode(JSON.stringify(value));
}

export function decode(bytes) {
  return JSON.parse(fromUtf8.decode(bytes));
}

function toBytes(value) {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'string') return utf8.encode(value);
  return value;
}

/** One input record: `key` (Uint8Array or undefined), `value`, `timestamp` (ms or undefined). */
export class Record {
  constructor(key, value, timestamp) {
    this.key = key;
    this.value = value;
    this.timestamp = timestamp;
  }
  /** The key as text (the value if the record has no key). */
  keyString() {
    return fromUtf8.decode(this.key ?? this.value);
  }
  valueString() {
    return fromUtf8.decode(this.value);
  }
}

// Main-output records buffered during one host call, handed over as one
// `emit-batch` at its end.
let chunks = [];
let entries = [];
let length = 0;

function push(bytes) {
  const offset = length;
  chunks.push(bytes);
  length += bytes.length;
  return offset;
}

function flushEmits() {
  if (entries.length === 0) return;
  const data = new Uint8Array(length);
  let at = 0;
  for (const chunk of chunks) {
    data.set(chunk, at);
    at += chunk.length;
  }
  output.emitBatch({ data, entries });
  discardEmits();
}

function discardEmits() {
  chunks = [];
  entries = [];
  length = 0;
}

/** Emits a record to the main output (strings are encoded as UTF-8). */
export function emit(key, value, timestamp) {
  const keyBytes = toBytes(key);
  const keyOffset = keyBytes === undefined ? length : push(keyBytes);
  const valueBytes = toBytes(value);
  const valueOffset = push(valueBytes);
  entries.push({
    keyOffset,
    keyLength: keyBytes === undefined ? -1 : keyBytes.length,
    valueOffset,
    valueLength: valueBytes.length,
    timestamp: BigInt(timestamp ?? 0),
    hasTimestamp: timestamp !== undefined && timestamp !== null,
  });
}

/** Emits a record to a named side output. */
export function emitTo(sideOutput, key, value, timestamp) {
  output.emitTo(sideOutput, {
    key: toBytes(key),
    value: toBytes(value),
    timestamp: timestamp === undefined || timestamp === null ? undefined : BigInt(timestamp),
  });
}

/** One value per key, any JSON value. */
export class ValueState {
  constructor(name) {
    this.name = name;
  }
  get(defaultValue) {
    const raw = state.valueGet(this.name);
    return raw === undefined ? defaultValue : decode(raw);
  }
  set(value) {
    state.valueSet(this.name, encode(value));
  }
  clear() {
    state.valueClear(this.name);
  }
}

/** A list of values per key. */
export class ListState {
  constructor(name) {
    this.name = name;
  }
  get() {
    return state.listGet(this.name).map(decode);
  }
  add(value) {
    state.listAdd(this.name, encode(value));
  }
  update(values) {
    state.listUpdate(this.name, values.map(encode));
  }
  clear() {
    state.listClear(this.name);
  }
}

/** A map per key; keys should be numbers, strings, or arrays of those. */
export class MapState {
  constructor(name) {
    this.name = name;
  }
  get(key, defaultValue) {
    const raw = state.mapGet(this.name, encode(key));
    return raw === undefined ? defaultValue : decode(raw);
  }
  put(key, value) {
    state.mapPut(this.name, encode(key), encode(value));
  }
  remove(key) {
    state.mapRemove(this.name, encode(key));
  }
  contains(key) {
    return state.mapContains(this.name, encode(key));
  }
  entries() {
    return state.mapEntries(this.name).map(([k, v]) => [decode(k), decode(v)]);
  }
  keys() {
    return state.mapKeys(this.name).map(decode);
  }
  clear() {
    state.mapClear(this.name);
  }
}

export const valueState = (name, schemaVersion = 1) => ({ name, kind: 'value', schemaVersion });
export const listState = (name, schemaVersion = 1) => ({ name, kind: 'list', schemaVersion });
export const mapState = (name, schemaVersion = 1) => ({ name, kind: 'map', schemaVersion });

/** A state's time-to-live for an operator's static `ttls`, e.g.
 *  `{ count: ttl({ days: 30 }) }`: a cell (a key's value, its whole list or
 *  map) not updated for that long expires and reads as absent; refreshed by
 *  writes (and reads with `refreshedOnRead`), in processing time (the
 *  watermark with `eventTime`). A job file's `state_ttl` overrides it. */
export function ttl({ days = 0, hours = 0, minutes = 0, seconds = 0, refreshedOnRead = false, eventTime = false }) {
  const millis = Math.round((((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 1000);
  if (!(millis > 0)) throw new Error('a TTL must be longer than zero');
  return { millis, refreshedOnRead, eventTime };
}

function declareTtls(ttls) {
  for (const [name, t] of Object.entries(ttls ?? {})) {
    state.declareTtl(
      name,
      BigInt(t.millis),
      t.refreshedOnRead ? 'on-read-and-write' : 'on-create-and-write',
      t.eventTime ? 'event-time' : 'processing-time',
    );
  }
}

export const registerEventTimeTimer = (ms) => timers.registerEventTimeTimer(BigInt(ms));
export const deleteEventTimeTimer = (ms) => timers.deleteEventTimeTimer(BigInt(ms));
export const registerProcessingTimeTimer = (ms) => timers.registerProcessingTimeTimer(BigInt(ms));
export const deleteProcessingTimeTimer = (ms) => timers.deleteProcessingTimeTimer(BigInt(ms));
export const currentWatermark = () => Number(timers.currentWatermark());
export const currentProcessingTime = () => Number(timers.currentProcessingTime());

/** Logs through the host (`trace`, `debug`, `info`, `warn`, `error`). */
export function log(message, level = 'info') {
  hostLog(level, message);
}

/** Subclass it: set static `name`, `version`, `states` (and `ttls`); implement `open`,
 *  `process`, and optionally `onTimer` and `close`. */
export class Operator {
  open(config) {}
  process(input, record) {
    throw new Error('process is not implemented');
  }
  onTimer(timer) {}
  close() {}
}

// Runs an operator call: flushes its emits on success; turns anything
// thrown into the call's error message (its emits are dropped).
function guarded(call) {
  try {
    call();
  } catch (error) {
    discardEmits();
    throw error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  }
  flushEmits();
}

/** The `operator` and `metadata` exports for an operator class. */
export function exportOperator(OperatorClass) {
  let instance;
  const current = () => {
    if (instance === undefined) throw 'weir-sdk: operator called before `open`';
    return instance;
  };
  const operator = {
    open(config) {
      guarded(() => {
        instance = new OperatorClass();
        instance.open(config ? JSON.parse(config) : {});
      });
    },
    process(input, record) {
      const op = current();
      const timestamp = record.timestamp === undefined ? undefined : Number(record.timestamp);
      guarded(() => op.process(input, new Record(record.key, record.value, timestamp)));
    },
    processBatch(input, batch) {
      const op = current();
      const data = batch.data;
      guarded(() => {
        batch.entries.forEach((e, index) => {
          state.selectRecord(index);
          const key = e.keyLength < 0 ? undefined : data.subarray(e.keyOffset, e.keyOffset + e.keyLength);
          const value = data.subarray(e.valueOffset, e.valueOffset + e.valueLength);
          op.process(input, new Record(key, value, e.hasTimestamp ? Number(e.timestamp) : undefined));
        });
      });
    },
    onTimer(timer) {
      const op = current();
      guarded(() => op.onTimer({ ...timer, timestamp: Number(timer.timestamp) }));
    },
    close() {
      const op = current();
      guarded(() => op.close());
    },
  };
  const metadata = {
    describe() {
      declareTtls(OperatorClass.ttls);
      return {
        name: OperatorClass.pluginName ?? 'operator',
        version: OperatorClass.version ?? '0.0.0',
        states: OperatorClass.states ?? [],
        batchInput: true,
      };
    },
  };
  return { operator, metadata };
}
