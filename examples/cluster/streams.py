"""The cluster example's streams (nats-py): `create` makes `cluster-in` and
`cluster-out` with three replicas, `publish N` publishes N generated lines
onto 4 partitions, `check N` reads `cluster-out` and checks that every
word's counts 1, 2, … came exactly once each, as the N lines make them."""

import asyncio
import collections
import random
import sys

import nats
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

WORDS = [f"w{i:03}" for i in range(300)]


def lines(n):
    choose = random.Random(7)
    return [" ".join(choose.choice(WORDS) for _ in range(5)) for _ in range(n)]


async def main(url, command, args):
    client = await nats.connect(url.split(","))
    js = client.jetstream()
    if command == "create":
        for name, subjects in (("cluster-in", ["cluster.in.>"]), ("cluster-out", ["cluster.out"])):
            try:
                await js.delete_stream(name)
            except NotFoundError:
                pass
            await js.add_stream(
                StreamConfig(name=name, subjects=subjects, duplicate_window=120, num_replicas=3)
            )
    elif command == "publish":
        for i, line in enumerate(lines(int(args[0]))):
            await js.publish(f"cluster.in.{i % 4}.{i}", line.encode())
        print(f"published {args[0]} lines onto 4 partitions (3 replicas)")
    elif command == "check":
        expected = collections.Counter(w for line in lines(int(args[0])) for w in line.split())
        info = await js.stream_info("cluster-out")
        seen = collections.defaultdict(list)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            word, count = (await js.get_msg("cluster-out", seq)).data.decode().rsplit(" ", 1)
            seen[word].append(int(count))
        wrong = [w for w, n in expected.items() if sorted(seen.get(w, [])) != list(range(1, n + 1))]
        print(f"{info.state.messages} updates in cluster-out for {len(expected)} words")
        if wrong:
            sys.exit(f"NOT exactly once: {len(wrong)} words wrong, e.g. {wrong[:5]}")
        print("every count published exactly once")
    else:
        sys.exit(f"unknown command {command!r}")
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
