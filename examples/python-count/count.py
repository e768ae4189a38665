"""The word count's `count` operator in Python: a running count per word
(key), emitted as `"<word> <count>"` on every update. Same state name, kind,
schema version and encoding as the Rust `count`, so a savepoint of either
restores into the other. Its count expires after 30 days without the word
(a TTL; a job file's `state_ttl` changes it)."""

import weir_sdk as weir


class Count(weir.Operator):
    name = "count"
    version = "0.1.0-python"
    states = [weir.value_state("count", schema_version=1)]
    ttls = {"count": weir.ttl(days=30)}

    def open(self, config):
        emit = config.get("emit", "updates")
        if emit != "updates":
            raise ValueError(f'config key `emit`: unsupported value {emit!r} (the only mode is "updates")')
        self.count = weir.ValueState("count")

    def process(self, input, record):
        n = self.count.get(0) + 1
        self.count.set(n)
        weir.emit(record.key, f"{record.key_str()} {n}")


Operator, Metadata = weir.export(Count)
