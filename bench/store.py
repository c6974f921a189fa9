"""Sharded journal on S3: ship N items' records from S shards to a moto server, then merge.

    .venv/bin/python bench/store.py                     # 20,000 items, 4 shards
    .venv/bin/python bench/store.py --items 2000 --shards 2

Runs a moto S3 server in-process on 127.0.0.1 (ephemeral port, dummy credentials set here only),
so it measures batcher's side plus loopback HTTP, not a real bucket's latency.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import uuid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--records-per-segment", type=int, default=500)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                          AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        logging.disable(logging.CRITICAL)  # werkzeug logs every request
        from batcher._store import FlushPolicy, ObjectStore, SegmentWriter, merge

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        store = ObjectStore(f"s3://{bucket}/out",
                            storage_options={"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}})
        store.fs.mkdir(bucket)
        with tempfile.TemporaryDirectory() as buffers:
            policy = FlushPolicy(records=args.records_per_segment)
            started = time.perf_counter()
            writers = [SegmentWriter.open(store, i, args.shards, policy=policy, buffer_root=buffers)
                       for i in range(args.shards)]
            for n in range(args.items):
                w = writers[n % args.shards]
                w.append({"t": "attempt", "id": f"i{n}", "rhash": "h", "attempt": 1, "at": "x"})
                w.append({"t": "item", "id": f"i{n}", "rhash": "h", "status": "done",
                          "request": {"prompt": "p" * 80}, "created": 1,
                          "images": [{"file": f"images/i{n}.png", "sha256": "a" * 64, "bytes": 1000,
                                      "width": 1, "height": 1}],
                          "attempts": 1, "error": None, "finished": "x"})
            for w in writers:
                w.close()
            shipped = time.perf_counter()
            summary = merge(store)
            merged = time.perf_counter()
        segments = len(store.list_segments())
        print("| items | shards | records | segments | append+ship s | merge s | summary |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {args.items} | {args.shards} | {2 * args.items} | {segments} | {shipped - started:.2f} "
              f"| {merged - shipped:.2f} | {summary} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
