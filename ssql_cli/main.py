"""``ssql``: run the service (up, demo, migrate, keys) and use its HTTP API (submit, status, ...).

Server URL and key come from ``--url``/``--key`` or SSQL_URL / SSQL_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from persistence.settings import Settings
from ssql_cli.render import LiveProgress, progress_line, table
from ssql_client import ApiError, Client, ServerUnreachable

#: an option not given on the command line (``None`` means "back to the default" for quotas)
_UNSET: Any = object()

#: default file name endings of ``ssql download`` per format
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "torchvision": ".torchvision.safetensors", "torch": ".pt"}


def _client(args: argparse.Namespace) -> Client:
    settings = Settings()
    return Client(args.url or settings.url, args.key or settings.api_key)


def cmd_up(args: argparse.Namespace) -> int:
    from persistence.migrate import upgrade_head
    from ssql_cli.stack import PortInUse, Stack, check_port_free

    try:  # before anything starts: a second `ssql up` on a busy port must not start a worker
        check_port_free(args.host, args.port)
    except PortInUse as e:
        print(f"ssql up: {e}", file=sys.stderr)
        return 1
    settings = Settings()
    env = dict(os.environ, SSQL_HOME=str(settings.resolved_home()))
    upgrade_head(settings)
    stack = Stack(env, args.port, host=args.host)
    try:
        stack.start(timeout=120)
    except (PortInUse, RuntimeError, TimeoutError) as e:
        stack.stop()
        print(f"ssql up: {e}", file=sys.stderr)
        return 1
    print(f"ssql service on {stack.url} (docs: {stack.url}/docs); home {settings.resolved_home()}; Ctrl-C stops it")
    stop = {"flag": False}

    def _handler(_s: int, _f: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    try:
        while not stop["flag"]:
            for name, proc in (("api", stack.api), ("worker", stack.worker)):
                if proc is not None and proc.poll() is not None:
                    print(f"the {name} process exited with code {proc.returncode}", file=sys.stderr)
                    stop["flag"] = True
            time.sleep(0.5)
    finally:
        stack.stop()
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    from persistence.migrate import upgrade_head

    upgrade_head(Settings())
    print("database schema is at head")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from persistence.db import make_engine, make_sessionmaker
    from persistence.keys import create_key
    from persistence.migrate import upgrade_head

    settings = Settings()
    if settings.is_sqlite():
        upgrade_head(settings)
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        key = create_key(s, args.name)
    engine.dispose()
    print(key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key (by its first characters, the whole key, or all of a user's): refused by every
    API process within milliseconds on Postgres, within 5 seconds otherwise (docs/decisions/011)."""
    from persistence.db import make_engine, make_sessionmaker
    from persistence.keys import revoke_keys

    settings = Settings()
    engine = make_engine(settings)
    target = args.key_or_prefix
    try:
        with make_sessionmaker(engine)() as s:
            if args.user:
                revoked = revoke_keys(s, user_name=target)
            elif len(target) > 16:
                revoked = revoke_keys(s, key=target)
            else:
                revoked = revoke_keys(s, prefix=target)
    except ValueError as e:
        print(f"ssql keys revoke: {e}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if not revoked:
        print("no such active key", file=sys.stderr)
        return 1
    print(f"revoked {len(revoked)} key(s)")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from persistence.db import make_engine, make_sessionmaker
    from persistence.keys import list_keys

    engine = make_engine(Settings())
    with make_sessionmaker(engine)() as s:
        rows = list_keys(s, args.name)
    engine.dispose()
    for r in rows:
        print(f"{r['name']}\t{r['prefix']}\tcreated {r['created_at']}\t" + (f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"))
    return 0


def _quota_value(text: str) -> float | None:
    """``ssql owners set-quota`` values: a number, ``default`` (the server's SSQL_QUOTA_*) or
    ``unlimited`` (no limit for this owner whatever the default)."""
    low = text.strip().lower()
    if low == "default":
        return None
    if low in ("unlimited", "none"):
        return -1
    try:
        value = float(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number >= 0, 'default' or 'unlimited'") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number >= 0, 'default' or 'unlimited'")
    return value


def cmd_owners_set_quota(args: argparse.Namespace) -> int:
    """Set an owner's quotas (decision 014): the next submission and the next claim obey them."""
    from persistence import quotas
    from persistence.db import make_engine, make_sessionmaker

    values: dict[str, float | int | None] = {}
    for name in quotas.QUOTA_FIELDS:
        given = getattr(args, name)
        if given is not _UNSET:
            whole = name not in ("device_hours", "period_hours", "weight")
            if whole and given is not None and given != int(given):
                print(f"ssql owners set-quota: --{name.replace('_', '-')} is a whole number, got {given:g}", file=sys.stderr)
                return 2
            values[name] = int(given) if whole and given is not None else given
    if not values:
        print("ssql owners set-quota: give at least one quota, e.g. --max-active-jobs 10 (see --help)", file=sys.stderr)
        return 2
    settings = Settings()
    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s:
            row = quotas.set_quota(s, args.name, values)
    except (LookupError, ValueError) as e:
        print(f"ssql owners set-quota: {e.args[0]}", file=sys.stderr)
        return 1 if isinstance(e, LookupError) else 2
    finally:
        engine.dispose()
    shown = ", ".join(f"{k}={_quota_text(v)}" for k, v in row.items())
    print(f"quotas of {args.name}: {shown}")
    return 0


def _quota_text(value: Any) -> str:
    if value is None:
        return "default"
    return "unlimited" if value < 0 else f"{value:g}"


def cmd_owners_show(args: argparse.Namespace) -> int:
    """Every owner's (or one owner's) effective limits and usage now."""
    from persistence import quotas
    from persistence.db import make_engine, make_sessionmaker

    settings = Settings()
    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        rows = quotas.show(s, settings, args.name)
    engine.dispose()
    if args.name and not rows:
        print(f"ssql owners show: no user {args.name!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def limit(v: Any) -> str:
        return "-" if v is None else f"{v:g}"

    head = ["user", "active", "running", "devices", "device-hours", "period h", "weight"]
    body = []
    for r in rows:
        lim, use = r["limits"], r["usage"]
        cells = [r["user"], f"{use['active_jobs']}/{limit(lim['max_active_jobs'])}",
                 f"{use['running_jobs']}/{limit(lim['max_running_jobs'])}", f"{use['devices']}/{limit(lim['max_devices'])}",
                 f"{use['device_hours']:.3f}/{limit(lim['device_hours'])}", f"{lim['period_hours']:g}",
                 f"{lim.get('weight', 1):g}"]  # fmt: skip
        body.append(dict(zip(head, cells, strict=True)))
    print(table(body, head))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Your quotas and what you use of them now (``GET /v1/usage``)."""
    u = _client(args).usage()
    if args.json:
        print(json.dumps(u, indent=2))
        return 0
    lim, use = u["limits"], u["usage"]

    def of(v: Any) -> str:
        return "no limit" if v is None else f"{v:g}"

    print(f"queued + running jobs  {use['active_jobs']} of {of(lim['max_active_jobs'])}")
    print(f"running jobs           {use['running_jobs']} of {of(lim['max_running_jobs'])}")
    print(f"devices held           {use['devices']} of {of(lim['max_devices'])}")
    print(f"device-hours           {use['device_hours']:.3f} of {of(lim['device_hours'])} in the last {lim['period_hours']:g} h"
          + (f" (frees from {u['budget_frees_at']})" if u.get("budget_frees_at") else ""))
    print(f"fair-share weight      {lim.get('weight', 1):g} (when several owners wait, the one using the least, per weight, starts next)")
    if not u["can_submit"]:
        print(f"a submission now: HTTP {'429' if u['refusal']['code'] == 'quota_exceeded' else '403'}: {u['refusal']['detail']}")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    """The service itself (``GET /v1/status``): queues, workers, your running attempts and recent failures."""
    st = _client(args).service_status(args.failures_hours)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for q in st["queues"]:
        broker = "?" if q["broker_messages"] is None else q["broker_messages"]
        print(f"queue {q['name']}: {q['queued']} queued ({q['queued_yours']} yours), {q['running']} running, {broker} broker messages")
    if not st["workers"]:
        print("workers: none reported in the last 24 h (start one: ssql up, or the worker of docker-compose)")
    for w in st["workers"]:
        jobs = ", ".join(f"{j['id'][:8]} {j['kind']}" if j["yours"] else "another owner's job" for j in w["jobs"]) or "idle"
        print(f"worker {w['name']} [{w['state']}] on {w['host']} ({w['device'] or '?'}), queues {','.join(w['queues'])}: "
              f"{jobs}; last heartbeat {w['heartbeat_age_s']:g} s ago")
    for r in st["running"]:
        frac = (r.get("progress") or {}).get("fraction") or 0.0
        print(f"running {r['job_id']} {r['kind']} attempt {r['attempt']} on {r['worker']}: {100 * frac:.0f}%")
    if st["running_others"]:
        print(f"running: {st['running_others']} attempts of other owners")
    for f in st["failures"]:
        err = f["error"] or {}
        print(f"failed {f['job_id']} {f['kind']} attempt {f['attempt']} ({f['outcome']}, {f['ended_at']}): "
              f"{err.get('code', '')} {err.get('message', '')}".rstrip())
    print(f"failed attempts in the last {st['failures_window_hours']:g} h: {len(st['failures'])} yours, {st['failures_others']} of other owners")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a job: the kind's fields from --set / --json and the flags, or ``--from JOB``'s spec
    with --set changing fields by dotted name (``ssql_cli.reuse.submission``)."""
    from ssql_cli.reuse import UsageError, submission

    client = _client(args)
    try:
        kind, body = submission(args, client)
    except UsageError as e:
        print(f"ssql submit: {e}", file=sys.stderr)
        return 2
    body["kind"] = kind
    if args.source_job:
        body["source_job"] = args.source_job
    if args.bits:
        body["bits"] = args.bits if args.kind in ("distill", "finetune") else args.bits.split(",")
    if args.quantizer:
        body["quantizer"] = args.quantizer
    if args.export_bits is not None:
        body["export_bits"] = [b for b in args.export_bits.split(",") if b]
    if args.name is not None:
        body["name"] = args.name
    if args.tag:
        body["tags"] = args.tag
    if args.notes is not None:
        body["notes"] = args.notes
    if args.priority is not None:
        body["priority"] = args.priority
    if args.ptq:
        body["ptq"] = args.ptq
    if kind == "export":  # POST /v1/jobs/{source}/exports
        source = body.pop("source_job", None)
        body.pop("kind")
        if not source:
            print("ssql submit export: give --source-job (the pretrain, eval or finetune job to export)", file=sys.stderr)
            return 2
        if args.dry_run:
            print("ssql submit export: no dry run for exports; the request would be:\n" + json.dumps(body, indent=2))
            return 0
        return _print_and_wait(client, client.export(source, body, args.idempotency_key or str(uuid.uuid4())), args.wait)
    if args.dry_run:  # validate and estimate, queue nothing
        answer = client.estimate(body)
        est, quota = answer.get("estimate"), answer.get("quota")
        if est:
            print(f"estimate: {est['device_hours']:.4g} device-hours ({est['pflops']:.4g} PFLOP at {est['device_tflops']:g} "
                  f"TFLOP/s per device, {est['device_kind']}), peak memory {est['peak_memory_gb']:.3g} GB per device")
        else:
            print("estimate: none (the image count is unknown: give max_samples)")
        print("would be accepted" if quota is None else f"would be refused now: {quota['detail']}")
        return 0
    job = client.submit(body, args.idempotency_key or str(uuid.uuid4()))
    return _print_and_wait(client, job, args.wait)


def _print_and_wait(client: Client, job: dict[str, Any], wait: bool) -> int:
    print(job["id"], flush=True)
    if wait:
        return _wait(client, job["id"], sys.stderr)
    return 0


def _wait(client: Client, job_id: str, out: Any) -> int:
    """Live progress until the job ends (a lost connection is retried, and said so); the
    error, if any, on stderr; exit status 0 only when the job succeeded."""
    progress = LiveProgress(out)
    job = client.wait(job_id, progress, on_retry=progress.retrying)
    if job.get("error"):
        print(f"error: {job['error'].get('message')}", file=sys.stderr)
    return 0 if job["status"] == "succeeded" else 1


def cmd_export(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"bits": args.bits.split(","), "formats": args.formats.split(",")}
    for name in ("ptq", "ptq_images", "ptq_iters", "onnx_form"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    client = _client(args)
    job = client.export(args.job_id, body, args.idempotency_key or str(uuid.uuid4()))
    return _print_and_wait(client, job, args.wait)


def cmd_checkpoints(args: argparse.Namespace) -> int:
    rows = _client(args).checkpoints(args.job_id)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, ["bits", "format", "bytes", "sha256", "produced_by"]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    if not args.watch:
        job = client.job(args.job_id)
        if args.json:  # only the JSON on stdout (the error is in it)
            print(json.dumps(job, indent=2))
            return 0
        print(progress_line(job))
        if job.get("error"):
            print(f"error: {job['error'].get('message')}")
        return 0
    return _wait(client, args.job_id, sys.stdout)


def cmd_list(args: argparse.Namespace) -> int:
    page = _client(args).jobs(args.status, args.kind, args.limit, args.offset, method=args.method,
                              dataset=args.dataset, tags=args.tag, q=args.search, sort=args.sort)
    rows = [
        {
            "id": j["id"],
            "name": j.get("name") or "",
            "kind": j["kind"],
            "status": j["status"],
            "progress": f"{(j['progress'] or {}).get('fraction', 0) * 100:.0f}%",
            "attempts": j["attempts"],
            "tags": ",".join(j.get("tags") or []),
            "created": j["created_at"][:19],
        }
        for j in page["items"]
    ]
    print(table(rows, ["id", "name", "kind", "status", "progress", "attempts", "tags", "created"]))
    if page["next_offset"] is not None:
        print(f"(more: --offset {page['next_offset']})")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """Set a job's name, tags, notes or priority (``--tags ''`` clears the tags, ``--name ''`` the name)."""
    labels: dict[str, Any] = {}
    if args.name is not None:
        labels["name"] = args.name or None
    if args.tags is not None:
        labels["tags"] = [t for t in args.tags.split(",") if t]
    if args.notes is not None:
        labels["notes"] = args.notes or None
    if args.priority is not None:
        labels["priority"] = args.priority
    if not labels:
        print("ssql edit: give --name, --tags, --notes or --priority", file=sys.stderr)
        return 2
    job = _client(args).update(args.job_id, **labels)
    print(f"{job['id']}: name {job.get('name')!r}, tags {job.get('tags')}, notes {'set' if job.get('notes') else 'none'}, "
          f"priority {job.get('priority', 0)}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.job_id)
    print(f"{job['id']}: {job['status']}{' (stopping)' if job['status'] == 'running' else ''}")
    return 0


def print_results(rows: list[dict[str, Any]]) -> None:
    shown = [{**r, "top1": r.get("top1")} for r in rows]
    if any(r.get("protocol") == "sqakd" for r in rows):  # a distill job's row
        print(table(shown, ["bits", "protocol", "quantizer", "top1", "ptq_top1", "teacher_top1", "gain_over_ptq", "epochs"]))
        return
    if any(r.get("protocol") == "finetune" for r in rows):  # a finetune job's row
        print(table(shown, ["bits", "protocol", "quantizer", "dataset", "top1", "ptq_linear_top1", "gain_over_ptq_linear", "epochs"]))
        return
    ptq = ["ptq"] if any(r.get("ptq") not in (None, "calibrate") for r in rows) else []  # reconstruction PTQ named
    print(table(shown, ["bits", "protocol", *ptq, "top1", "calib_images", "epochs", "dataset"]))


def _reuse(name: str) -> Any:
    """A command of ssql_cli.reuse, called with a client."""

    def run(args: argparse.Namespace) -> int:
        from ssql_cli import reuse

        return int(getattr(reuse, name)(args, _client(args)))

    return run


def cmd_results(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.csv:
        from ssql_cli.reuse import cmd_results_csv

        return cmd_results_csv(args, client)
    answers = {job_id: client.results(job_id) for job_id in args.job_ids}
    empty = [job_id for job_id, res in answers.items() if not res["rows"]]
    if empty:  # a pretrain (or export) job, or one not finished: say where the numbers are
        for job_id in empty:
            print(f"ssql results: {_no_results(client, job_id)}", file=sys.stderr)
        return 1
    if args.plot:
        from ssql_client.plot import plot_results

        jobs = {_label(client, job_id): res["rows"] for job_id, res in answers.items()}
        plot_results(jobs, args.plot)
        print(f"wrote {args.plot} ({len(jobs)} job(s))", file=sys.stderr)
    if args.json:
        print(json.dumps(answers[args.job_ids[0]] if len(args.job_ids) == 1 else list(answers.values()), indent=2))
    elif not args.plot or len(args.job_ids) == 1:
        for i, (job_id, res) in enumerate(answers.items()):
            if len(answers) > 1:
                print(("\n" if i else "") + f"{job_id}:")
            print_results(res["rows"])
    return 0


def _no_results(client: Client, job_id: str) -> str:
    """Why a job has no result rows, and which jobs hold the numbers (a pretrain's evaluations)."""
    job = client.job(job_id)
    if job["kind"] in ("pretrain", "export"):
        pretrain = job_id if job["kind"] == "pretrain" else (job.get("spec") or {}).get("pretrain_job") or job.get("source_job")
        derived = _derived_jobs(client, pretrain, ("eval", "finetune")) if pretrain else []
        if not derived:
            return (f"{job_id} is a {job['kind']} job: top-1 comes from evaluating it; none yet. Run "
                    f"`ssql submit eval --source-job {pretrain or job_id} --bits fp,8w8a,4w4a,2w4a`")
        listed = ", ".join(f"{j['id']} ({j['kind']}, {j['status']})" for j in derived)
        ids = " ".join(j["id"] for j in derived if j["status"] == "succeeded")
        return (f"{job_id} is a {job['kind']} job: its top-1 numbers are in the jobs made from it: {listed}"
                + (f"; run `ssql results {ids}`" if ids else ""))
    return f"{job_id} ({job['kind']}) has no results (status {job['status']})" + (
        "; wait for it: `ssql status --watch " + job_id + "`" if job["status"] in ("queued", "running") else "")


def _derived_jobs(client: Client, source: str, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """The caller's jobs of ``kinds`` whose source job is ``source``, oldest first."""
    found: list[dict[str, Any]] = []
    for kind in kinds:
        offset: int | None = 0
        while offset is not None:
            page = client.jobs(kind=kind, limit=200, offset=offset)
            found += [j for j in page["items"] if j.get("source_job") == source]
            offset = page["next_offset"]
    return sorted(found, key=lambda j: j["created_at"])


def _label(client: Client, job_id: str) -> str:
    """A plot legend's name of an eval job: its pretraining method and the job id's start."""
    try:
        job = client.job(job_id)
        source = job.get("source_job") or (job.get("spec") or {}).get("source_job")
        method = (client.job(source).get("spec") or {}).get("config", {}).get("method") if source else None
    except ApiError:
        method = None
    return f"{method} ({job_id[:8]})" if method else job_id[:8]


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if not args.follow:
        sys.stdout.write(client.logs(args.job_id, args.tail))
        return 0
    for line in client.follow_logs(args.job_id, args.tail):
        print(line, flush=True)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    client = _client(args)
    fmt = args.format
    if fmt is None and not args.out:  # the file the server picks (its first format at these bits) names the suffix
        fmt = next((c["format"] for c in client.checkpoints(args.job_id) if c["bits"] == args.bits), None)
    dest = Path(args.out or f"{args.job_id}-{args.bits}{SUFFIXES.get(fmt or '', '.pt')}")
    path, sha = client.download(args.job_id, args.bits, dest, fmt)
    print(f"{path}  sha256 {sha} (verified)")
    return 0


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ssql_client.client import archive_content_type

    path = Path(args.path)
    if not path.exists():
        print(f"error: {path} does not exist; give an image folder (train/<class>/*, val/<class>/*) or an archive of one",
              file=sys.stderr)
        return 2
    if path.is_file():
        try:
            archive_content_type(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if path.is_dir():
        print(f"packing {path} into a .tar.gz ...", file=sys.stderr)
    bars: list[Any] = []  # made at the first part, once the size (of the packed folder) is known

    def progress(sent: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"upload {args.name}",
                             file=sys.stderr, disable=args.json, mininterval=0.2))  # tqdm's rate column: bytes/s
        bars[0].update(sent - bars[0].n)

    try:
        d = _client(args).upload_dataset(path, args.name, wait=not args.no_wait, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if not args.json and not args.no_wait and d["status"] != "validating":
        print(f"validated by the server: {d['status']}", file=sys.stderr)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0 if d["status"] != "invalid" else 1
    _print_dataset(d)
    if d["status"] == "invalid":
        return 1
    if d["status"] == "ready":
        print(f'use it as a job\'s dataset: "dataset": "{d["dataset"]}"  (e.g. ssql submit pretrain --set dataset={d["dataset"]})')
    return 0


def _print_dataset(d: dict) -> None:
    print(f"{d['id']}  {d['name']}  {d['status']}  {d['bytes']} bytes  sha256 {d['sha256']}")
    if d.get("classes") is not None:
        print(f"  {len(d['classes'])} classes ({', '.join(d['classes'][:10])}{', ...' if len(d['classes']) > 10 else ''}), "
              f"{d['train_images']} train / {d['val_images']} val images")
    if d.get("error"):
        print(f"  error: {d['error']}")


def cmd_datasets_list(args: argparse.Namespace) -> int:
    page = _client(args).datasets(args.status, args.limit, args.offset)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    rows = [{"id": d["id"], "name": d["name"], "status": d["status"], "bytes": d["bytes"],
             "classes": "" if d["classes"] is None else len(d["classes"]), "train": d["train_images"] or "",
             "val": d["val_images"] or "", "created": (d["created_at"] or "")[:19]} for d in page["items"]]
    print(table(rows, ["id", "name", "status", "bytes", "classes", "train", "val", "created"]))
    if page.get("next_offset") is not None:
        print(f"(more: --offset {page['next_offset']})")
    return 0


def cmd_datasets_show(args: argparse.Namespace) -> int:
    d = _client(args).dataset(args.dataset_id)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print_dataset(d)
    return 0


def cmd_datasets_rm(args: argparse.Namespace) -> int:
    _client(args).delete_dataset(args.dataset_id)
    print(f"deleted {args.dataset_id}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ssql_cli.demo import run_demo

    return run_demo(port=args.port, epochs=args.epochs, eval_epochs=args.eval_epochs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssql", description=(__doc__ or "").replace("``", ""))  # reST markup is for the source
    p.add_argument("--url", help="server URL (default SSQL_URL or http://127.0.0.1:8000)")
    p.add_argument("--key", help="API key (default SSQL_API_KEY)")
    sub = p.add_subparsers(dest="command", required=True)
    # the same options after the subcommand (`ssql list --key K`); SUPPRESS keeps a value given before it
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--url", default=argparse.SUPPRESS, help="server URL (default SSQL_URL or http://127.0.0.1:8000)")
    conn.add_argument("--key", default=argparse.SUPPRESS, help="API key (default SSQL_API_KEY)")

    up = sub.add_parser("up", help="start the API and a worker on this machine (embedded by default)")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--host", default="127.0.0.1")
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="end to end: pretrain SSQL on digits, evaluate at 6 bit-widths, download")
    demo.add_argument("--port", type=int, default=0, help="0: any free port")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--eval-epochs", type=int, default=50)
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("migrate", help="alembic upgrade head on SSQL_DATABASE_URL").set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create an API key for NAME and print it (shown once)")
    kc.add_argument("name")
    kc.set_defaults(func=cmd_keys_create)
    kr = keys.add_parser("revoke", help="revoke a key given by its first characters (as `ssql keys list` shows) or in full")
    kr.add_argument("key_or_prefix", help="the key, or its prefix (at least 9 characters), or with --user a user name")
    kr.add_argument("--user", action="store_true", help="revoke every key of the user named KEY_OR_PREFIX")
    kr.set_defaults(func=cmd_keys_revoke)
    kl = keys.add_parser("list", help="list keys (prefix, user, created, revoked); never the secrets")
    kl.add_argument("name", nargs="?", help="only this user's keys")
    kl.set_defaults(func=cmd_keys_list)

    owners = sub.add_parser("owners", help="owners' quotas (operators)").add_subparsers(dest="owners_command", required=True)
    oq = owners.add_parser("set-quota", help="set an owner's quotas; VALUE: a number, 'default' (SSQL_QUOTA_*) or 'unlimited'")
    oq.add_argument("name", help="the user (as in `ssql keys create NAME`)")
    for flag, what in (("--max-active-jobs", "queued + running jobs at once (over it a submit is 429)"),
                       ("--max-running-jobs", "running jobs at once (more wait in the queue)"),
                       ("--max-devices", "devices held at once by running jobs (more wait; a bigger job is 403)"),
                       ("--device-hours", "device-hours per period (used up: a submit is 403)"),
                       ("--period-hours", "the rolling period of --device-hours, in hours"),
                       ("--weight", "fair-share weight (default 1): weight 2 gets twice the devices of an owner of "
                        "weight 1 when both have jobs waiting")):  # fmt: skip
        oq.add_argument(flag, type=_quota_value, default=_UNSET, metavar="VALUE", help=what)
    oq.set_defaults(func=cmd_owners_set_quota)
    osh = owners.add_parser("show", help="owners' limits and usage (used/limit; '-': no limit)")
    osh.add_argument("name", nargs="?", help="only this user")
    osh.add_argument("--json", action="store_true", help="machine-readable: own values, effective limits, usage")
    osh.set_defaults(func=cmd_owners_show)

    sv = sub.add_parser("service", parents=[conn], help="the service itself: queues, workers, your running attempts and recent failures")
    sv.add_argument("--failures-hours", type=float, default=24.0, help="the window of recent failures (default 24)")
    sv.add_argument("--json", action="store_true")
    sv.set_defaults(func=cmd_service)

    us = sub.add_parser("usage", parents=[conn], help="your quotas and what you use of them now")
    us.add_argument("--json", action="store_true")
    us.set_defaults(func=cmd_usage)

    sb = sub.add_parser("submit", parents=[conn], help="submit a job; prints its id")
    sb.add_argument("kind", nargs="?", choices=["pretrain", "eval", "distill", "finetune", "export"],
                    help="the job kind (left out with --from: the job's)")
    sb.add_argument("--from", dest="from_job", metavar="JOB_ID", help="start from this job's spec (the same run again; "
                    "change fields with --set); `ssql reproduce JOB_ID` prints it as a command")
    sb.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a spec field (JSON value), repeatable; a dotted "
                    "name sets a field inside an object field, e.g. method_options.lambda=0.1")
    sb.add_argument("--json", help="file with the job body")
    sb.add_argument("--dry-run", action="store_true", help="validate and print the cost estimate and the quota answer; queue nothing")
    sb.add_argument("--source-job", help="eval / finetune: the pretrain job; distill: the eval job (with an fp head)")
    sb.add_argument("--bits", help="eval: comma-separated bit-widths, e.g. fp,8w8a,4w4a,2w4a; distill / finetune: one, e.g. 4w4a")
    sb.add_argument("--quantizer", help="distill / finetune: psq, pact, lsq, dorefa or ewgs")
    sb.add_argument("--export-bits", help="pretrain: packed checkpoints to write (default the paper's set; '' for none)")
    sb.add_argument("--ptq", help="eval: calibrate (default), adaround or brecq (settings: --set ptq_iters=..., ptq_images=...)")
    sb.add_argument("--idempotency-key")
    sb.add_argument("--name", help="a name for the job (shown by `ssql list` and the dashboard)")
    sb.add_argument("--tag", action="append", metavar="TAG", help="a tag, repeatable (letters, digits, _ . : / = + - @ #)")
    sb.add_argument("--notes", help="free text kept with the job")
    sb.add_argument("--priority", type=int, help="the order of your own queued jobs: higher starts first (-100..100, "
                    "default 0); between owners the fair share decides")
    sb.add_argument("--wait", action="store_true", help="show live progress until the job ends")
    sb.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", parents=[conn], help="a job's status (--watch: live progress bar)")
    st.add_argument("job_id")
    st.add_argument("--watch", "-w", action="store_true")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    ls = sub.add_parser("list", parents=[conn], help="your jobs, newest first (filters: all must match)")
    ls.add_argument("--status", "--state", dest="status", help="queued, running, succeeded, failed or cancelled")
    ls.add_argument("--kind", help="pretrain, eval, distill, export or finetune")
    ls.add_argument("--method", help="e.g. ssql")
    ls.add_argument("--dataset", help="e.g. cifar10")
    ls.add_argument("--tag", action="append", metavar="TAG", help="jobs with this tag; repeat for all of several")
    ls.add_argument("--search", "-q", help="text in the name or notes, or the id's start")
    ls.add_argument("--sort", help="created_at (default), name, kind, status, -updated_at, top1:4w4a (best first) ...")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--offset", type=int, default=0)
    ls.set_defaults(func=cmd_list)

    ed = sub.add_parser("edit", parents=[conn], help="set a job's name, tags, notes or priority")
    ed.add_argument("job_id")
    ed.add_argument("--name", help="'' clears it")
    ed.add_argument("--tags", help="comma-separated; replaces the tags ('' clears them)")
    ed.add_argument("--notes", help="'' clears them")
    ed.add_argument("--priority", type=int, help="-100..100, higher starts first among your queued jobs")
    ed.set_defaults(func=cmd_edit)

    cc = sub.add_parser("cancel", parents=[conn], help="cancel a job")
    cc.add_argument("job_id")
    cc.set_defaults(func=cmd_cancel)

    rs = sub.add_parser("results", parents=[conn], help="an eval job's table (top-1 per bit-width) or a distill job's row")
    rs.add_argument("job_ids", nargs="+", metavar="JOB", help="one or more eval (or distill) jobs")
    rs.add_argument("--json", action="store_true")
    rs.add_argument("--plot", metavar="FILE.png", help="write top-1 vs bit-width (one line per job, FP dashed) "
                    "and, beside it, top-1 vs model size (one line per job, source and PTQ method) to this file")
    rs.add_argument("--csv", action="store_true", help="the rows of every job as one CSV (job, name, method, "
                    "calibration, probe on each row)")
    rs.add_argument("--out", "-o", metavar="FILE", help="with --csv: write to FILE (default: stdout)")
    rs.set_defaults(func=cmd_results)

    mt = sub.add_parser("metrics", parents=[conn], help="a job's training curve: loss, lr, images/s per sample "
                        "(--csv: every sample of one or more jobs)")
    mt.add_argument("job_ids", nargs="+", metavar="JOB")
    mt.add_argument("--csv", action="store_true", help="every sample of the jobs as one CSV (not downsampled)")
    mt.add_argument("--out", "-o", metavar="FILE", help="with --csv: write to FILE (default: stdout)")
    mt.add_argument("--points", type=int, default=20, help="the table's samples: the whole history in at most this "
                    "many, first, last and extremes kept (default 20)")
    mt.add_argument("--json", action="store_true")
    mt.set_defaults(func=_reuse("cmd_metrics"))

    ln = sub.add_parser("lineage", parents=[conn], help="a job's chain: what it was made from and what was made from it")
    ln.add_argument("job_id")
    ln.add_argument("--json", action="store_true")
    ln.set_defaults(func=_reuse("cmd_lineage"))

    rp = sub.add_parser("reproduce", parents=[conn], help="the `ssql submit` command that runs a job again (same spec)")
    rp.add_argument("job_id")
    rp.add_argument("--json", action="store_true", help="the request body instead (every field)")
    rp.set_defaults(func=_reuse("cmd_reproduce"))

    ex = sub.add_parser("export", parents=[conn], help="queue an export job: a finished job's checkpoint at more bit-widths/formats")
    ex.add_argument("job_id", help="a succeeded pretrain job (backbones) or eval job (classifiers)")
    ex.add_argument("--bits", required=True, help="comma-separated, e.g. 4w4a,2w4a")
    ex.add_argument("--formats", default="safetensors", help="comma-separated: safetensors, onnx, torchvision (fp only)")
    ex.add_argument("--ptq", help="calibrate (default), adaround or brecq: reconstruct the files' rounding")
    ex.add_argument("--ptq-images", dest="ptq_images", type=int, help="reconstruction images (default 1024)")
    ex.add_argument("--ptq-iters", dest="ptq_iters", type=int, help="reconstruction iterations per unit (default 2000)")
    ex.add_argument("--onnx-form", dest="onnx_form", choices=["integer", "qlinear", "storage"],
                    help="the ONNX graph (with --formats onnx): integer (default), qlinear or storage; see docs/RESULTS.md")
    ex.add_argument("--idempotency-key")
    ex.add_argument("--wait", action="store_true", help="show progress until the export job ends")
    ex.set_defaults(func=cmd_export)

    lg = sub.add_parser("logs", parents=[conn], help="a job's log (every attempt's stdout/stderr, labelled)")
    lg.add_argument("job_id")
    lg.add_argument("--tail", "-n", type=int, help="only the last N lines")
    lg.add_argument("--follow", "-f", action="store_true", help="print new lines as they come, until the job ends")
    lg.set_defaults(func=cmd_logs)

    ck = sub.add_parser("checkpoints", parents=[conn], help="a job's downloadable files: bits, format, size, sha256")
    ck.add_argument("job_id")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=cmd_checkpoints)

    ds = sub.add_parser("datasets", help="your own image folders: upload, list, show, rm").add_subparsers(
        dest="datasets_command", required=True)
    du = ds.add_parser("upload", parents=[conn], help="upload an image folder (train/<class>/*, val/<class>/*) or a "
                       ".zip/.tar/.tar.gz of one; waits for the server's validation")
    du.add_argument("path", help="a folder (packed for you) or an archive")
    du.add_argument("--name", required=True, help="your name for the dataset")
    du.add_argument("--no-wait", action="store_true", help="return once uploaded (status: validating)")
    du.add_argument("--json", action="store_true")
    du.set_defaults(func=cmd_datasets_upload)
    dli = ds.add_parser("list", parents=[conn], help="your datasets, newest first")
    dli.add_argument("--status", choices=["validating", "ready", "invalid"])
    dli.add_argument("--limit", type=int, default=50)
    dli.add_argument("--offset", type=int, default=0)
    dli.add_argument("--json", action="store_true")
    dli.set_defaults(func=cmd_datasets_list)
    dsh = ds.add_parser("show", parents=[conn], help="one dataset (status, classes, image counts, error)")
    dsh.add_argument("dataset_id")
    dsh.add_argument("--json", action="store_true")
    dsh.set_defaults(func=cmd_datasets_show)
    drm = ds.add_parser("rm", parents=[conn], help="delete a dataset and its stored archive")
    drm.add_argument("dataset_id")
    drm.set_defaults(func=cmd_datasets_rm)

    dl = sub.add_parser("download", parents=[conn], help="download a checkpoint and verify its sha256")
    dl.add_argument("job_id")
    dl.add_argument("--bits", default="fp")
    dl.add_argument("--format", help="torch, safetensors, onnx or torchvision (default: the first available)")
    dl.add_argument("--out", "-o")
    dl.set_defaults(func=cmd_download)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ServerUnreachable as e:  # one line naming the address, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ssql list | head`: the reader left; say nothing, as `cat` would
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
