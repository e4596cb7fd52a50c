#!/usr/bin/env python
"""How much a resumed `data.type: webdataset` stream reads again: the shards back to the oldest
sample in its shuffle buffer, which it re-reads (without decoding) to refill the buffer. The
stream's own pick (data/tar_stream.py's hash) over many draws, for docs/DATA.md.

    python tools/stream_reread.py --buffer 5000 --shard-size 10000
"""
import argparse

from mmscale.seeds import seed_for


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buffer", type=int, default=5000, help="data.shuffle_buffer (default 5000)")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    p.add_argument("--draws", type=int, default=300_000, help="samples drawn after the buffer is full (default 300000)")
    a = p.parse_args(argv)
    buffer, read, back = list(range(a.buffer)), a.buffer, []
    for d in range(a.draws):
        buffer[seed_for("buffer_pick", 0, 0, d) % a.buffer] = read  # what the buffer holds: the number each sample was read as
        read += 1
        if d % 10_000 == 9_999:  # a checkpoint here: the resume re-reads from the oldest one's shard
            back.append((read - min(buffer)) / a.shard_size)
    print(f"shuffle buffer {a.buffer}, shards of {a.shard_size}: a resume re-reads {min(back):.1f} to {max(back):.1f} "
          f"shards per stream (mean {sum(back) / len(back):.1f}, {len(back)} checkpoints)")


if __name__ == "__main__":
    main()
