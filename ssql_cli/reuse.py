"""``ssql`` commands that compare and reuse runs: ``metrics`` (CSV, a table), ``lineage``,
``reproduce`` and what ``submit --from JOB --set k=v`` starts from."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ssql_cli.render import table
from ssql_client import Client
from ssql_client.overrides import UnknownField, apply, parse_assignment

KINDS = ("pretrain", "eval", "distill", "finetune", "export")


class UsageError(Exception):
    """A command line that cannot be run as written (exit status 2, the message on stderr)."""


def submission(args: argparse.Namespace, client: Client) -> tuple[str, dict[str, Any]]:
    """The kind and body ``ssql submit`` starts from: ``--from JOB``'s request (the same spec), or
    ``--json FILE``, with ``--set`` applied by dotted name. With ``--from`` a name the kind does not
    take is refused here, with the closest names."""
    changes = {}
    for item in args.set or []:
        try:
            name, value = parse_assignment(item)
        except ValueError as e:
            raise UsageError(str(e)) from None
        changes[name] = value
    if args.from_job:
        r = client.reproduce(args.from_job)
        if args.kind and args.kind != r["kind"]:
            article = "an" if r["kind"][:1] in "aeiou" else "a"
            raise UsageError(f"--from {args.from_job} is {article} {r['kind']} job, not {args.kind}: leave the kind out")
        kind, base = r["kind"], dict(r["request"])
        if kind == "export":
            base["source_job"] = r["source_job"]
        known, nested = client.request_fields(kind)
        try:
            body = apply(base, changes, kind, known, nested)
        except UnknownField as e:
            raise UsageError(str(e)) from None
        return kind, body
    if not args.kind:
        raise UsageError(f"give the kind ({', '.join(KINDS)}) or --from JOB_ID")
    base = json.loads(Path(args.json).read_text()) if args.json else {}
    try:
        return args.kind, apply(base, changes, args.kind)
    except UnknownField as e:
        raise UsageError(str(e)) from None


def _write(text: str, out: str | None, what: str) -> None:
    if out:
        Path(out).write_text(text, encoding="utf-8", newline="")
        print(f"wrote {out} ({what})", file=sys.stderr)
    else:
        sys.stdout.write(text)


def cmd_metrics(args: argparse.Namespace, client: Client) -> int:
    """``ssql metrics JOB... --csv``: every sample as CSV; else a table of at most ``--points`` samples."""
    if args.csv:
        text = client.metrics_csv(*args.job_ids)
        _write(text, args.out, f"{max(0, text.count(chr(10)) - 1)} samples of {len(args.job_ids)} job(s)")
        return 0
    for i, job_id in enumerate(args.job_ids):
        page = client.metrics(job_id, max_points=args.points)
        if args.json:
            print(json.dumps(page, indent=2))
            continue
        if len(args.job_ids) > 1:
            print(("\n" if i else "") + f"{job_id}:")
        rows = [{"step": m["step"], "epoch": m["epoch"], "phase": m["phase"],
                 "loss": "" if m["loss"] is None else f"{m['loss']:.4g}", "lr": "" if m["lr"] is None else f"{m['lr']:.4g}",
                 "images/s": "" if m["images_per_s"] is None else f"{m['images_per_s']:.1f}"} for m in page["items"]]
        print(table(rows, ["step", "epoch", "phase", "loss", "lr", "images/s"]) if rows else "(no samples)")
        if page.get("downsampled_from") and page["downsampled_from"] > len(rows):
            print(f"({len(rows)} of {page['downsampled_from']} samples, extremes kept; all of them: --csv)")
    return 0


def cmd_results_csv(args: argparse.Namespace, client: Client) -> int:
    text = client.results_csv(*args.job_ids)
    _write(text, args.out, f"{max(0, text.count(chr(10)) - 1)} rows of {len(args.job_ids)} job(s)")
    return 0


def cmd_lineage(args: argparse.Namespace, client: Client) -> int:
    """The job's chain as an indented tree (``*`` marks the job asked about)."""
    lin = client.lineage(args.job_id)
    if args.json:
        print(json.dumps(lin, indent=2))
        return 0
    for node in lin["tree"]:
        mark = "*" if node["id"] == args.job_id else " "
        name = f"  {node['name']!r}" if node.get("name") else ""
        print(f"{mark} {'    ' * (node['depth'] or 0)}{node['id']}  {node['kind']:<8} {node['status']:<9} {node['what']}{name}")
    if lin["truncated"]:
        print("(more jobs in this chain than listed)")
    return 0


def cmd_reproduce(args: argparse.Namespace, client: Client) -> int:
    """The command (and the request body) that makes the job again."""
    r = client.reproduce(args.job_id)
    if args.json:
        print(json.dumps(r["request"], indent=2))
        return 0
    print(r["cli"])
    print(f"# or, from this server (add --set FIELD=VALUE to change a field): {r['cli_from']}", file=sys.stderr)
    return 0
