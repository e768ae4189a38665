"""`count`, version 2, in Python: the state is now an object
`{"count": n, "last_seen": ms}` (schema version 2) where v1 (`count.py`,
and the Rust `count`) kept a bare integer. `migrate` converts v1 values
when a job restores a v1 savepoint, so the counts carry on. Built with
`-w migrating-operator-plugin` (`build.sh OUT count_v2`)."""

import weir_sdk as weir


class Count(weir.Operator):
    name = "count"
    version = "0.2.0-python"
    states = [weir.value_state("count", schema_version=2)]

    def open(self, config):
        self.count = weir.ValueState("count")

    def process(self, input, record):
        counted = self.count.get({"count": 0, "last_seen": None})
        counted["count"] += 1
        if record.timestamp is not None:
            counted["last_seen"] = record.timestamp
        self.count.set(counted)
        weir.emit(record.key, f"{record.key_str()} {counted['count']}")

    @staticmethod
    def migrate(state, from_version, value):
        if state == "count" and from_version == 1:
            return {"count": value, "last_seen": None}
        raise ValueError(f"no migration for state `{state}` from schema version {from_version}")


Operator, Metadata = weir.export(Count)
Migration = weir.export_migration(Count)
