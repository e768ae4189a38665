"""The example's streams, through the nats-py client.

    python3 streams.py URL create           # (re)create wordcount-in and wordcount-out
    python3 streams.py URL publish FILE N   # FILE's lines onto N partitions
    python3 streams.py URL show             # the newest count of each word in wordcount-out
"""

import asyncio
import sys

import nats
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError


async def main(url, command, args):
    client = await nats.connect(url)
    js = client.jetstream()
    if command == "create":
        for name, subjects in (
            ("wordcount-in", ["wordcount.in.>"]),
            ("wordcount-out", ["wordcount.out"]),
        ):
            try:
                await js.delete_stream(name)
            except NotFoundError:
                pass
            # Message ids are remembered for 2 minutes: longer than a
            # restart takes (the sink's exactly-once relies on it).
            await js.add_stream(StreamConfig(name=name, subjects=subjects, duplicate_window=120))
    elif command == "publish":
        path, partitions = args[0], int(args[1])
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            await js.publish(f"wordcount.in.{i % partitions}.{i}", line.encode())
        print(f"published {len(lines)} lines onto {partitions} partitions")
    elif command == "show":
        info = await js.stream_info("wordcount-out")
        newest = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            word, count = (await js.get_msg("wordcount-out", seq)).data.decode().rsplit(" ", 1)
            newest[word] = int(count)
        print(f"{info.state.messages} updates in wordcount-out; the most frequent words:")
        for word, count in sorted(newest.items(), key=lambda wc: (-wc[1], wc[0]))[:10]:
            print(f"  {word} {count}")
    else:
        sys.exit(f"unknown command {command!r}")
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
