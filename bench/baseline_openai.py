"""The hand-written baseline: what people write with the official SDK when they need N images.

    python bench/baseline_openai.py --job JOB.jsonl --out DIR --base-url URL --concurrency 64 [--timeout 3]

`openai.AsyncOpenAI` with its default retries (max_retries=2), an asyncio.Semaphore for the
concurrency, `client.images.generate(..., response_format="b64_json")`, each image decoded and
written to a file, exceptions caught per item and counted. No rate limiting, no resume, no
stop on quota: it just keeps going. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import time
from collections import Counter
from pathlib import Path

import openai


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True, help="JSONL: one {id, prompt, model, size, n} per line")
    ap.add_argument("--out", required=True)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=None, help="openai client timeout (default: the SDK's)")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = [json.loads(line) for line in open(args.job, encoding="utf-8") if line.strip()]

    kwargs = {"base_url": args.base_url, "api_key": os.environ.get("OPENAI_API_KEY", "sk-bench")}
    if args.timeout is not None:
        kwargs["timeout"] = args.timeout
    client = openai.AsyncOpenAI(**kwargs)  # default max_retries
    sem = asyncio.Semaphore(args.concurrency)
    done = failed = images = 0
    errors: Counter[str] = Counter()

    async def one(item: dict) -> None:
        nonlocal done, failed, images
        async with sem:
            try:
                resp = await client.images.generate(
                    model=item.get("model", "grok-imagine"), prompt=item["prompt"],
                    size=item.get("size", "1024x1024"), n=item.get("n", 1), response_format="b64_json",
                )
                for k, image in enumerate(resp.data or []):
                    with open(out / f"{item['id']}_{k}.png", "wb") as fh:
                        fh.write(base64.b64decode(image.b64_json))
                    images += 1
                done += 1
            except Exception as exc:  # noqa: BLE001 — count it and move on, as hand-written code does
                failed += 1
                code = getattr(exc, "code", None)
                errors[f"{type(exc).__name__}:{code}" if code else type(exc).__name__] += 1

    started = time.monotonic()
    await asyncio.gather(*(one(item) for item in items))
    elapsed = time.monotonic() - started
    await client.close()
    print(json.dumps({"done": done, "failed": failed, "items": len(items), "images": images,
                      "elapsed": elapsed, "errors": dict(errors)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
