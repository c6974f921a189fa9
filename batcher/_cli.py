"""The `batcher` command line: a thin wrapper over `batcher.run` and friends."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from . import __version__
from ._dialect import DIALECTS
from ._exceptions import BatcherError, JobError, JobValidationError, LockedError, ManifestError, OutputError
from ._job import MAX_CONCURRENCY, Job, Selection, load_job
from ._report import Reporter
from ._runner import (
    EXIT_ABORTED,
    EXIT_INVALID,
    EXIT_LOCKED,
    EXIT_OK,
    RunOptions,
    run,
)

DEFAULTS = RunOptions()  # the one place run defaults live; the options below show them

EPILOG = """exit codes:
  0   every item done
  1   finished, some items failed (see the manifest's error objects)
  2   invalid job file or usage; nothing was sent
  3   another batcher run holds the output folder
  4   aborted by a fatal error (auth, quota, disk); untouched items stay pending
  5   batch mode with --no-wait: work is still at the provider; a later run collects it
  130 interrupted (SIGINT/SIGTERM); rerun to resume
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def _concurrency(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"at most {MAX_CONCURRENCY} requests in flight per endpoint")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be ≥ 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be a finite number > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be a finite number ≥ 0")
    return value


def _field(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError("expected FIELD=VALUE")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError("expected FIELD=VALUE with a field name")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


# the simulator's ANSWER_FAULTS, named here so the CLI starts without importing the simulator
_ANSWER_FAULTS = ("short", "policy-200", "echo-key", "prism-422", "fastapi-422")


def _add_simulator_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    g = p.add_argument_group("simulator" if not prefix else "simulator (with --simulate)")
    g.add_argument(f"--{prefix}latency-ms", type=float, default=None, help="mean generation latency (ms)")
    g.add_argument(f"--{prefix}jitter-ms", type=float, default=0.0, help="uniform ± latency jitter (ms)")
    if not prefix:
        g.add_argument("--rpm", type=float, default=None, help="requests-per-minute limit to enforce")
        g.add_argument("--ipm", type=float, default=None, help="images-per-minute limit to enforce")
    g.add_argument(f"--{prefix}fail-rate", type=float, default=0.0, help="fraction answered 5xx")
    g.add_argument(f"--{prefix}drop-rate", type=float, default=0.0, help="fraction of dropped connections")
    g.add_argument(f"--{prefix}malformed-rate", type=float, default=0.0, help="fraction of malformed 200 bodies")
    g.add_argument(f"--{prefix}hang-rate", type=float, default=0.0, help="fraction that never answer")
    g.add_argument(f"--{prefix}policy-word", default="forbidden",
                   help="prompts containing this word get 400 content_policy_violation")
    g.add_argument(f"--{prefix}quota-images", type=int, default=None,
                   help="answer 429 insufficient_quota after this many images")
    g.add_argument(f"--{prefix}image-bytes", type=int, default=0, help="pad each PNG to this many bytes")
    g.add_argument(f"--{prefix}hide-limits", action="store_true", help="don't send x-ratelimit-* headers")
    g.add_argument(f"--{prefix}limit-style", choices=("window", "bucket", "minute"), default="window",
                   help="how --rpm/--ipm are enforced and advertised: window (sliding, one second's share; "
                        "headers count it), bucket (a token bucket of one second's share; remaining 0..rpm/60, "
                        "reset until full), minute (enforced as window, headers count the minute like OpenAI's)")
    g.add_argument(f"--{prefix}lone-429-at", type=int, default=None, metavar="K",
                   help="answer the K-th generation request with a bare 429 (only Retry-After: 1), once")
    g.add_argument(f"--{prefix}gateway-quirks", action="store_true",
                   help="answer like a proxy: swapped formats, null keys, numeric error codes")
    g.add_argument(f"--{prefix}seed", type=int, default=None, help="random seed for faults and jitter")
    g.add_argument(f"--{prefix}dialect", choices=tuple(DIALECTS), default="openai-compatible",
                   help="speak and enforce this provider's variant of the API (default openai-compatible; "
                        "the client must use the same dialect)")
    g.add_argument(f"--{prefix}fail-all-after", type=float, default=None, metavar="SECONDS",
                   help="an outage: answer every generation request 500 from SECONDS after start")
    g.add_argument(f"--{prefix}batch-time-scale", type=float, default=2.0 / 86400.0, metavar="S",
                   help="batch APIs: real seconds per simulated second (default: a 24h batch runs in ~2 s)")
    g.add_argument(f"--{prefix}batch-validation-fail", action="store_true",
                   help="batch APIs: every batch fails validation (status failed, with errors)")
    g.add_argument(f"--{prefix}batch-expire-after", type=float, default=None, metavar="SIM_SECONDS",
                   help="batch APIs: batches expire this many simulated seconds after creation, keeping what "
                        "completed (the rest: batch_expired error lines)")
    g.add_argument(f"--{prefix}batch-upload-fault", choices=("5xx", "hang"), default=None,
                   help="batch APIs: the first upload(s) answer 500 or hang (the file is stored all the same)")
    g.add_argument(f"--{prefix}batch-create-fault", choices=("5xx", "hang"), default=None,
                   help="batch APIs: the first create(s) answer 500 or hang (the batch is created all the same)")
    g.add_argument(f"--{prefix}batch-fault-count", type=int, default=1, metavar="K",
                   help="batch APIs: how many uploads / creates get --batch-*-fault (default 1)")
    g.add_argument(f"--{prefix}batch-url-ttl", type=float, default=None, metavar="SECONDS",
                   help="batch APIs: result image URLs stop working SECONDS after they are made")
    g.add_argument(f"--{prefix}answer-fault", choices=_ANSWER_FAULTS, default=None,
                   help="answer wrong the way foreign servers do: short (half the images), policy-200 "
                        "(refusals in a 200), echo-key (errors quote the key), prism-422 / fastapi-422")


def _simulator_config(args: argparse.Namespace, prefix: str = "", **extra: Any) -> Any:
    from ._simulator import SimulatorConfig

    get = lambda name: getattr(args, prefix.replace("-", "_") + name)  # noqa: E731
    return SimulatorConfig(
        latency_ms=get("latency_ms") if get("latency_ms") is not None else (50.0 if prefix else 0.0),
        latency_jitter_ms=get("jitter_ms"),
        fail_rate=get("fail_rate"),
        drop_rate=get("drop_rate"),
        malformed_rate=get("malformed_rate"),
        hang_rate=get("hang_rate"),
        policy_word=get("policy_word"),
        quota_images=get("quota_images"),
        image_bytes=get("image_bytes"),
        advertise_limits=not get("hide_limits"),
        gateway_quirks=get("gateway_quirks"),
        seed=get("seed"),
        dialect=get("dialect"),
        fail_all_after_s=get("fail_all_after"),
        answer_fault=get("answer_fault"),
        limit_style=get("limit_style"),
        lone_429_at=get("lone_429_at"),
        batch_time_scale=get("batch_time_scale"),
        batch_validation_fail=get("batch_validation_fail"),
        batch_expire_after=get("batch_expire_after"),
        batch_upload_fault=get("batch_upload_fault"),
        batch_create_fault=get("batch_create_fault"),
        batch_fault_count=get("batch_fault_count"),
        batch_url_ttl=get("batch_url_ttl"),
        **extra,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batcher",
        description="Turn a job file of prompts into a folder of generated images, over the OpenAI Images API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"batcher {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="run a job (resumes where the last run stopped)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("job", help="job file: .yaml/.yml or .jsonl")
    r.add_argument("--out", help="output folder (default: the job's `output`, else output/<job name>)")
    r.add_argument("--base-url", help="API base URL (default: the job's, $BATCHER_BASE_URL, then the seed gateway)")
    r.add_argument("--api-key-env", metavar="NAME",
                   help="environment variable holding the key (default: BATCHER_API_KEY, then OPENAI_API_KEY for api.openai.com only)")
    r.add_argument("--concurrency", type=_concurrency,
                   help=f"requests in flight per endpoint, 1-{MAX_CONCURRENCY} (default: job's, else 16)")
    r.add_argument("--rpm", type=_positive_float, help="requests per minute to stay under (default: learn it)")
    r.add_argument("--ipm", type=_positive_float, help="images per minute to stay under (n images cost n)")
    r.add_argument("--timeout", type=_positive_float, default=DEFAULTS.timeout,
                   help="seconds one request may take before it is retried (default %(default)g)")
    r.add_argument("--connect-timeout", type=_positive_float, default=DEFAULTS.connect_timeout,
                   help="seconds to connect (default %(default)g)")
    r.add_argument("--max-attempts", type=_positive_int, default=DEFAULTS.max_attempts,
                   help="attempts per item for transient failures, per run (default %(default)s)")
    r.add_argument("--retry-failed", action="store_true", help="also retry items that failed permanently")
    r.add_argument("--max-policy-violations", type=_non_negative_int, default=DEFAULTS.max_policy_violations,
                   metavar="N", help="stop the run after N content-policy rejections (0: never; default %(default)s)")
    r.add_argument("--endpoint", action="append", default=[], metavar="NAME",
                   help="use only this of the job's endpoints; repeatable (default: all)")
    r.add_argument("--shard", metavar="I/N",
                   help="run shard I of N (0-based) of a planned output; default: the array launcher's index "
                        "variable (JOB_COMPLETION_INDEX, ...) when --shards N is given or OUT has a plan")
    r.add_argument("--shards", type=_positive_int, metavar="N", help="shard count, with a launcher's index variable")
    r.add_argument("--limiter", metavar="URL",
                   help="redis://HOST:PORT/DB: share each endpoint's limit, and claim items, across workers")
    r.add_argument("--work-dir", metavar="DIR", help="local work folder of a sharded or s3:// run")
    r.add_argument("--max-images", type=_positive_int, metavar="N",
                   help="start no work beyond N images in this run; then stop with exit 4, the rest pending")
    r.add_argument("--max-cost", type=_positive_float, metavar="X",
                   help="start no work beyond an estimated cost X in this run (needs the job's `pricing`)")
    r.add_argument("--batch", action="store_true",
                   help="send every endpoint's items through the provider's Batch API (about half the price, "
                        "results within the window, 24h by default); the job's `batch:` per endpoint does the same")
    r.add_argument("--no-wait", dest="wait", action="store_false",
                   help="batch mode: submit (and collect what has ended), then return: exit 5 while work is at "
                        "the provider; a later run collects it")
    r.add_argument("--force", action="store_true", help="use an OUT that holds another job's manifest")
    r.add_argument("--grace", type=_non_negative_float, default=DEFAULTS.grace_period,
                   help="seconds in-flight requests may finish after SIGINT/SIGTERM (default %(default)g)")
    r.add_argument("--model", help="request field override for every item")
    r.add_argument("--size", help="request field override, e.g. 1024x1024")
    r.add_argument("--quality", help="request field override")
    r.add_argument("--n", type=_positive_int, help="images per request, override")
    r.add_argument("--response-format", choices=("b64_json", "url"), help="override (default b64_json)")
    r.add_argument("--set", type=_field, action="append", default=[], metavar="FIELD=VALUE",
                   help="any request field override (VALUE parsed as JSON when it can be); repeatable")
    r.add_argument("--simulate", action="store_true",
                   help="run against the built-in simulator on 127.0.0.1 (no key, no cost)")
    _add_simulator_options(r, prefix="sim-")
    r.add_argument("--quiet", action="store_true", help="no progress; warnings, errors and the summary only")
    r.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    r.add_argument("--log-file", help="also append timestamped log lines to this file")

    v = sub.add_parser("validate", help="check a job file; list every problem as FILE:LINE: field: message")
    v.add_argument("job")

    pl = sub.add_parser("plan", help="what a run would send and cost, by model/size/quality; sends nothing")
    pl.add_argument("job")
    pl.add_argument("--out", help="count only what this output (folder or s3:// URL) does not have yet")
    pl.add_argument("--retry-failed", action="store_true", help="count permanently failed items as to send")
    pl.add_argument("--endpoint", action="append", default=[], metavar="NAME",
                    help="plan for only this of the job's endpoints; repeatable")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.add_argument("--batch", action="store_true", help="price every endpoint in batch mode (as run --batch)")
    pl.add_argument("--shards", type=_positive_int, metavar="N",
                    help="fix the split of the job into N shards: writes OUT/plan.json (needs --out)")
    for name in ("model", "size", "quality"):
        pl.add_argument(f"--{name}", help="request field override, as for run")
    pl.add_argument("--n", type=_positive_int, help="images per request, override")
    pl.add_argument("--response-format", choices=("b64_json", "url"), help="override")
    pl.add_argument("--set", type=_field, action="append", default=[], metavar="FIELD=VALUE",
                    help="any request field override; repeatable")

    st = sub.add_parser("status", help="what an output holds: totals, failures, files")
    st.add_argument("out", help="output folder or s3:// URL")
    st.add_argument("--json", action="store_true", help="print one JSON object")

    m = sub.add_parser("merge", help="write OUT/manifest.json from every shard's journal segments")
    m.add_argument("out", help="output folder or s3:// URL")
    m.add_argument("--job", help="the job file, for pending items and the job's order (default: what the journal knows)")

    ex = sub.add_parser("export", help="write an output as a dataset (imagefolder, webdataset, parquet, openai-batch)")
    ex.add_argument("out", help="output folder or s3:// URL of a run")
    ex.add_argument("--format", required=True, choices=("imagefolder", "webdataset", "parquet", "openai-batch"))
    ex.add_argument("--to", required=True, metavar="DIR",
                    help="destination: absent, empty, or an earlier export of the same format (replaced)")
    ex.add_argument("--include-failed", action="store_true", help="also export failed items with their error")
    ex.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N",
                    help="webdataset: samples per tar shard (default 1000)")

    c = sub.add_parser("cancel", help="cancel an output's batches at the provider (what they finished is kept)")
    c.add_argument("out", help="output folder of a `run --batch`")
    c.add_argument("--json", action="store_true", help="print one JSON object")

    rp = sub.add_parser("report", help="write OUT/report.html: a static gallery of the items")
    rp.add_argument("out", help="output folder or s3:// URL of a run")

    s = sub.add_parser("simulate", help="serve a local simulator of the OpenAI Images API")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    s.add_argument("--api-key", dest="sim_api_key", default=None,
                   help="require this Bearer key (for testing auth; never a real key)")
    _add_simulator_options(s)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("model", "size", "quality", "n", "response_format"):
        value = getattr(args, name)
        if value is not None:
            out[name] = value
    out.update(dict(args.set))
    return out


def _cmd_validate(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    count = job.validate()
    for warning in count.warnings:
        print(f"{warning.file}:{warning.line}: {warning.field}: warning: {warning.message}", file=sys.stderr)
    print(f"{args.job}: ok, {count} item(s)")
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    from ._plan import plan

    job = load_job(args.job, _overrides(args))
    if args.batch:
        job = job.batch_mode()
    selection = Selection.of(job, args.endpoint)
    if args.shards is not None:
        return _plan_shards(job, selection, args)
    info = plan(job, args.out, retry_failed=args.retry_failed, selection=selection)
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    send = info["send"]
    already = f" ({info['already']} already in {info['out']})" if info["out"] else ""
    if info.get("at_provider"):
        already += f" ({info['at_provider']} at the provider in batches, already charged)"
    print(f"{args.job}: {info['items']} item(s){already}; to send: {send['requests']} request(s), "
          f"{send['images']} image(s)")
    print(f"  {'model':<24} {'size':<10} {'quality':<10} {'requests':>9} {'images':>9} {'per image':>10} {'cost':>12}")
    for g in info["by"]:
        price = f"{g['per_image']:.4f}" if g["per_image"] is not None else "?"
        cost = f"{g['cost']:.2f}" if g["cost"] is not None else "unpriced"
        print(f"  {g['model']:<24} {g['size'] or '-':<10} {g['quality'] or '-':<10} {g['requests']:>9} "
              f"{g['images']:>9} {price:>10} {cost:>12}")
    total = f"{send['cost']:.2f}"
    if send["unpriced_requests"]:
        total += (f" + {send['unpriced_requests']} unpriced request(s) (add a `pricing` row; first at "
                  f"{info['first_unpriced']})")
    print(f"  estimated cost: {total}")
    return EXIT_OK


def _plan_shards(job: Job, selection: Selection, args: argparse.Namespace) -> int:
    from ._shard import make_plan
    from ._sharded import read_store_plan, write_store_plan
    from ._store import open_store

    if not args.out:
        raise BatcherError("plan --shards needs --out: the plan is written into the output it splits")
    selection.validate(job)
    new = make_plan(selection.all_items(job), args.shards)
    store = open_store(args.out)
    old = read_store_plan(store)
    if old is not None and (old.count, old.fingerprint) != (new.count, new.fingerprint):
        raise BatcherError(f"{store.url_of('plan.json')}: already planned for {old.count} shards of another job "
                           f"state ({old.created}); plan into a new output")
    if old is None:
        write_store_plan(store, new)
    plan = old or new
    if args.json:
        print(json.dumps(plan.as_record()))
    else:
        print(f"{store.url_of('plan.json')}: {plan.items} item(s) in {plan.count} shard(s): "
              f"{', '.join(map(str, plan.items_per_shard))}; fingerprint {plan.fingerprint[:23]}…")
        print(f"  run each with: batcher run {args.job} --out {args.out} --shard I/{plan.count}")
    return EXIT_OK


def _cmd_merge(args: argparse.Namespace) -> int:
    from ._store import merge, open_store

    local = Path(args.out)
    if "://" not in str(args.out) and (local / "manifest.d").is_dir() and not (local / "segments").is_dir():
        from ._segments import write_single  # a large local output: its segments as one manifest.json

        summary = write_single(local)
        print(f"{local / 'manifest.json'}: {summary['total']} items: {summary['done']} done, "
              f"{summary['failed']} failed, {summary['pending']} pending (the next run removes it: stale)")
        return EXIT_OK
    store = open_store(args.out)
    if args.job:
        job = load_job(args.job)
        job.validate()
        summary = merge(store, {"name": job.name, "file": str(job.path)}, job.all_items)
    else:
        summary = merge(store)
    print(f"{store.url_of('manifest.json')}: {summary['total']} items: {summary['done']} done, "
          f"{summary['failed']} failed, {summary['pending']} pending")
    return EXIT_OK


def _shard_for(args: argparse.Namespace) -> Any:
    """--shard I/N, else a launcher's index variable with --shards N or the output's plan."""
    from ._shard import parse_shard, shard_from_env

    if args.shard:
        return parse_shard(args.shard)
    count = args.shards
    if count is None and args.out:
        from ._sharded import is_remote, read_store_plan
        from ._store import open_store

        if is_remote(args.out) or os.path.isfile(os.path.join(args.out, "plan.json")):
            plan = read_store_plan(open_store(args.out))
            count = plan.count if plan is not None else None
    return shard_from_env(os.environ, count)


def _cmd_status(args: argparse.Namespace) -> int:
    from ._status import status

    info = status(args.out)
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    print(f"{info['out']}: {info['total']} items: {info['done']} done, {info['failed']} failed, "
          f"{info['pending']} pending")
    if info.get("cost") is not None:
        print(f"  {info['images']} image(s) made, estimated cost {info['cost']:.2f}")
    for name, counts in info.get("endpoints", {}).items():
        spent = f", estimated cost {counts['cost']:.2f}" if counts.get("cost") is not None else ""
        print(f"  endpoint {name}: {counts['done']} done, {counts['failed']} failed{spent}")
    if info.get("shards"):
        sh = info["shards"]
        print(f"  shards: {len(sh['committed'])} of {sh['planned']} committed")
    if info.get("batches"):
        print(f"  {'batch':<32} {'endpoint':<12} {'state':<24} {'completed':>9} {'failed':>7} {'total':>7}  "
              f"{'created':<20} expires")
        for b in info["batches"]:
            print(f"  {b['batch_id'] or '(' + b['key'] + ')':<32} {b['endpoint']:<12} {b['state']:<24} "
                  f"{b['completed']:>9} {b['failed']:>7} {b['total'] or b['requests']:>7}  "
                  f"{_when(b['created']):<20} {_when(b['expires'])}")
    print(f"  {info['images_on_disk']} image(s), {info['bytes_on_disk']:,} bytes on disk; "
          f"{info['runs']} run(s), first {info['first_run']}, last {info['last_run']}")
    for code, group in info["failures"].items():
        reasons = group.get("reasons") or {}
        if len(reasons) <= 1:
            print(f"  failed {code}: {group['count']} (e.g. {group['example']})")
            continue
        print(f"  failed {code}: {group['count']}")
        for reason, count in list(reasons.items())[:5]:
            print(f"    {count} × {reason}")
        if len(reasons) > 5:
            print(f"    … and {len(reasons) - 5} more reason(s)")
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    from ._batch import cancel

    rows = anyio.run(cancel, Path(args.out))
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    if not rows:
        print(f"{args.out}: no batch at the provider")
    for row in rows:
        print(f"  {row['batch_id']}: {row['state']}" + (f" ({row['error']})" if row.get("error") else ""))
    print("  what they finished is collected by the next `batcher run`")
    return EXIT_OK


def _when(epoch: Any) -> str:
    """A provider's Unix time as UTC text ('-' when unknown)."""
    from datetime import UTC, datetime

    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cmd_export(args: argparse.Namespace) -> int:
    from ._export import export

    c = export(args.out, args.format, args.to, include_failed=args.include_failed, shard_size=args.shard_size)
    shards = f", {c['shards']} shard(s)" if args.format == "webdataset" else ""
    print(f"exported {c['items']} item(s), {c['images']} image(s), {c['failed']} failed{shards} "
          f"as {args.format} -> {args.to}")
    if c["missing"]:
        print(f"batcher: warning: {c['missing']} image file(s) named in the manifest are missing; skipped",
              file=sys.stderr)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from ._gallery import report

    print(report(args.out))
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ._simulator import main_serve

    config = _simulator_config(args, rpm=args.rpm, ipm=args.ipm, api_key=args.sim_api_key)
    main_serve(config, args.host, args.port)
    return EXIT_OK


def _check_log_file(path: str, job: Any, out: str | None) -> None:
    """--log-file must be a file batcher may append to: its folder exists, and it is not the
    job, its prompts file, or an output's journal or manifest (appending would corrupt them)."""
    log = Path(path)
    if not log.parent.is_dir():
        raise BatcherError(f"--log-file {path}: the folder {log.parent} does not exist")
    if log.is_dir():
        raise BatcherError(f"--log-file {path}: is a folder")
    own = [job.path, getattr(job, "_prompts_file", None)]
    if out is not None and "://" not in out:
        own += [Path(out) / "manifest.jsonl", Path(out) / "manifest.json"]
    target = log.resolve()
    for other in own:
        if other is not None and (target == Path(other).resolve()
                                  or (log.exists() and Path(other).exists() and os.path.samefile(log, other))):
            raise BatcherError(f"--log-file {path}: is {other}; log lines would be appended to it. "
                               f"Choose another file")


def _cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job, _overrides(args))
    # what start-up made (modules, the job) lives for the whole run: out of the collector's way, so a
    # full collection walks only what the run makes (~2 % of a run's CPU went to collections)
    gc.freeze()
    if args.log_file:
        _check_log_file(args.log_file, job, args.out or job.output or str(Path("output") / job.name))
    try:
        reporter = Reporter(quiet=args.quiet or (args.json and not sys.stderr.isatty()), log_file=args.log_file)
    except OSError as exc:
        raise BatcherError(f"--log-file {args.log_file}: can't open it: {exc.strerror}") from None
    options = RunOptions(
        out=args.out, base_url=args.base_url, api_key_env=args.api_key_env, concurrency=args.concurrency,
        rpm=args.rpm, ipm=args.ipm, timeout=args.timeout, connect_timeout=args.connect_timeout,
        max_attempts=args.max_attempts, retry_failed=args.retry_failed, force=args.force,
        max_policy_violations=args.max_policy_violations, grace_period=args.grace, handle_signals=True,
        max_images=args.max_images, max_cost=args.max_cost, endpoints=tuple(args.endpoint),
        shard=_shard_for(args), limiter=args.limiter, work_dir=args.work_dir, batch=args.batch, wait=args.wait,
    )
    if args.simulate:
        from dataclasses import replace

        from ._simulator import start_in_thread

        job.validate()  # nothing starts, not even the simulator, for an invalid job
        with start_in_thread(_simulator_config(args, prefix="sim-")) as sim:
            reporter.log(f"simulating: the built-in simulator at {sim.base_url} answers instead of a real API")
            options = replace(options, base_url=sim.base_url, api_key="simulated-key")
            result = anyio.run(run, job, options, reporter)
    else:
        result = anyio.run(run, job, options, reporter)
    if args.json:
        print(json.dumps(result.as_dict()))
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"run": _cmd_run, "validate": _cmd_validate, "plan": _cmd_plan, "status": _cmd_status,
               "merge": _cmd_merge, "export": _cmd_export, "report": _cmd_report, "simulate": _cmd_simulate,
               "cancel": _cmd_cancel}
    try:
        return handler[args.command](args)
    except JobValidationError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        if exc.total > len(exc.problems):
            print(f"... and {exc.total - len(exc.problems)} more problem(s)", file=sys.stderr)
        print(f"invalid job: {exc.total} problem(s); nothing was sent", file=sys.stderr)
        return EXIT_INVALID
    except LockedError as exc:
        print(f"batcher: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (JobError, ManifestError, OutputError) as exc:
        print(f"batcher: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except BatcherError as exc:
        print(f"batcher: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"batcher: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return EXIT_ABORTED
