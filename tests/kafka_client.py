"""A second Kafka client for the tests (confluent-kafka, librdkafka inside
its wheel), so what the `kafka` connectors write is checked by a client that
is not theirs. Installed by scripts/kafka.sh; run by tests/src/kafka.rs.

  create BOOTSTRAP TOPIC PARTITIONS         create a topic (replacing one of that name)
  produce BOOTSTRAP TOPIC [txn]             produce stdin's lines (JSON: {"partition", "key", "value"}),
                                            in one committed transaction with `txn`
  abort BOOTSTRAP TOPIC                     as produce, in a transaction that is aborted
  read BOOTSTRAP TOPIC                      print every record a read_committed consumer
                                            sees, to the end (JSON lines)
"""

import json
import sys
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

TIMEOUT = 30


def create(bootstrap, topic, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic in admin.list_topics(timeout=TIMEOUT).topics:
        for future in admin.delete_topics([topic]).values():
            future.result()
    for future in admin.create_topics(
        [NewTopic(topic, num_partitions=int(partitions), replication_factor=1)]
    ).values():
        future.result()


def produce(bootstrap, topic, mode):
    config = {"bootstrap.servers": bootstrap, "linger.ms": 5}
    if mode:
        config["transactional.id"] = "weir-tests-" + uuid.uuid4().hex
    producer = Producer(config)
    errors = []

    def delivered(error, _message):
        if error is not None:
            errors.append(str(error))

    if mode:
        producer.init_transactions(TIMEOUT)
        producer.begin_transaction()
    for line in sys.stdin:
        record = json.loads(line)
        key = record.get("key")
        producer.produce(
            topic,
            value=record["value"].encode(),
            key=None if key is None else key.encode(),
            partition=record.get("partition", -1),
            on_delivery=delivered,
        )
        producer.poll(0)
    if mode == "txn":
        producer.commit_transaction(TIMEOUT)
    elif mode == "abort":
        producer.flush(TIMEOUT)
        producer.abort_transaction(TIMEOUT)
    else:
        producer.flush(TIMEOUT)
    if errors:
        raise SystemExit("delivery failed: " + "; ".join(errors[:5]))


def read(bootstrap, topic):
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "weir-tests-" + uuid.uuid4().hex,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    metadata = consumer.list_topics(topic, timeout=TIMEOUT)
    if metadata.topics[topic].error is not None:
        raise SystemExit(f"topic {topic}: {metadata.topics[topic].error}")
    partitions = sorted(metadata.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    pending = set(partitions)
    while pending:
        message = consumer.poll(TIMEOUT)
        if message is None:
            raise SystemExit(f"no end of partitions {sorted(pending)} of {topic} in {TIMEOUT} s")
        if message.error():
            if message.error().code() == -191:  # _PARTITION_EOF
                pending.discard(message.partition())
                continue
            raise KafkaException(message.error())
        key = message.key()
        print(
            json.dumps(
                {
                    "partition": message.partition(),
                    "offset": message.offset(),
                    "key": None if key is None else key.decode(),
                    "value": message.value().decode(),
                    "timestamp": message.timestamp()[1],
                }
            )
        )
    consumer.close()


def main():
    command, bootstrap, topic, *rest = sys.argv[1:]
    if command == "create":
        create(bootstrap, topic, rest[0])
    elif command == "produce":
        produce(bootstrap, topic, rest[0] if rest else None)
    elif command == "abort":
        produce(bootstrap, topic, "abort")
    elif command == "read":
        read(bootstrap, topic)
    else:
        raise SystemExit(f"unknown command {command}")


main()
