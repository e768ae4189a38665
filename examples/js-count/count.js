// The word count's `count` operator in JavaScript: a running count per word
// (key), emitted as "<word> <count>" on every update. Same state name, kind,
// schema version and encoding as the Rust `count`, so a savepoint of either
// restores into the other. Its count expires after 30 days without the word
// (a TTL; a job file's `state_ttl` changes it).

import { Operator, ValueState, valueState, ttl, emit, exportOperator } from '../../guest-sdk/js/weir-sdk.js';

class Count extends Operator {
  static pluginName = 'count';
  static version = '0.1.0-javascript';
  static states = [valueState('count', 1)];
  static ttls = { count: ttl({ days: 30 }) };

  open(config) {
    const mode = config.emit ?? 'updates';
    if (mode !== 'updates') {
      throw new Error(`config key \`emit\`: unsupported value ${JSON.stringify(mode)} (the only mode is "updates")`);
    }
    this.count = new ValueState('count');
  }

  process(input, record) {
    const n = this.count.get(0) + 1;
    this.count.set(n);
    emit(record.key, `${record.keyString()} ${n}`);
  }
}

export const { operator, metadata } = exportOperator(Count);
