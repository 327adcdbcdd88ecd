"""``ssql-core``: pretrain and evaluate from a terminal, no service needed.

    ssql-core pretrain --method ssql --dataset digits --epochs 20 --width 0.25 --image-size 16 --out runs/ssql
    ssql-core eval --checkpoint runs/ssql/last.pt --bits fp,8w8a,4w4a,2w4a --protocol linear
    ssql-core catalog
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from ssql_core.config import EVAL_PRESETS, PRESETS, EvalConfig, PretrainConfig
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss
from ssql_core.hooks import Hooks, Progress

_SKIP = {"method_options", "checkpoint", "bits", "w_bits", "a_bits", "lr_milestones"}
#: fields whose None default means "what the preset says" (EVAL_PRESETS, PRESETS)
_PRESET_FIELDS = {*EVAL_PRESETS[None], *PRESETS[None]}


def _add_fields(p: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, typed from its annotation (keeps CLI and config in step)."""
    for f in dataclasses.fields(cls):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = str(f.type).split("|")[0].strip()
        shown = default
        if default is None and cls is EvalConfig and f.name in ("normalization", "rounding"):
            shown = "the checkpoint's own"
        elif default is None and f.name in _PRESET_FIELDS:
            shown = "from --preset (ours when none)"
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind in ("int", "float"):
            p.add_argument(flag, dest=f.name, type=int if kind == "int" else float, default=None, help=f"default {shown}")
        elif f.name == "autobit":
            p.add_argument(flag, dest=f.name, type=str, default=None,
                           help='JSON: per-layer weight bits for a budget, evaluated as one more row, e.g. '
                                '\'{"budget_bits": 4.0, "sensitivity": "hessian", "solver": "milp"}\' (decision 020)')
        else:
            p.add_argument(flag, dest=f.name, type=str, default=None, help=f"default {shown}")


def _overrides(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def _parse_opt(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--opt", f"expected NAME=VALUE, got {item!r} (e.g. --opt queue_size=1024)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _json_option(flag: str, text: str, example: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(flag, f"is not JSON ({e}); {example}") from None


def _bits_item(item: str) -> Any:
    """A bit-width, or ``@file.json``: a per-layer map (ssql_core.bitconfig)."""
    if not item.startswith("@"):
        return item
    path = Path(item[1:])
    if not path.is_file():
        raise ConfigError("--bits", f"{item}: no such file (a JSON object of layer name -> bit-width)")
    return _json_option("--bits", path.read_text(), f"{path} must hold a JSON object such as {{\"layer1.0.conv1\": \"4w8a\"}}")


class PrintProgress(Hooks):
    every_n_steps = 10

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def on_progress(self, p: Progress) -> None:
        parts = [f"[{p.phase}] {100 * p.fraction:5.1f}%", f"epoch {p.epoch}/{p.epochs}"]
        if p.loss is not None:
            parts.append(f"loss {p.loss:.4f}")
        if p.images_per_s:
            parts.append(f"{p.images_per_s:.0f} img/s")
        if "z_std" in p.metrics:
            parts.append(f"z_std {p.metrics['z_std']:.3f}")
        if p.eta_s is not None:
            parts.append(f"eta {p.eta_s:.0f}s")
        print("  ".join(parts), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ssql-core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pretrain", help="self-supervised pretraining (resumes if --out has last.pt)")
    _add_fields(pp, PretrainConfig)
    pp.add_argument("--w-bits", nargs=2, type=int, metavar=("LOW", "HIGH"), help="SSQL weight-bit range (default 2 8)")
    pp.add_argument("--a-bits", nargs=2, type=int, metavar=("LOW", "HIGH"), help="SSQL activation-bit range (default 4 8)")
    pp.add_argument("--bits", help="fixed bit-width for fixed-bit QAT methods, e.g. 4w4a")
    pp.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE", help="method option, repeatable")
    pp.add_argument("--out", required=True, help="run folder (last.pt, backbone.pt)")
    ep = sub.add_parser("eval", help="PTQ + linear/kNN evaluation at each bit-width")
    ep.add_argument("--checkpoint", required=True, help="a pretrain run's last.pt")
    ep.add_argument("--bits", default="fp,8w8a,6w6a,5w5a,4w4a,3w3a,2w8a,2w4a",
                    help="comma-separated bit-widths; @FILE reads a per-layer map {layer: 'NwMa'} from a JSON file")
    _add_fields(ep, EvalConfig)
    ep.add_argument("--out", help="folder for heads.pt (the trained linear heads)")
    ep.add_argument("--json", action="store_true", help="print result rows as JSON")
    sub.add_parser("catalog", help="datasets, backbones, methods and bit-widths accepted")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "catalog":
            from ssql_core.catalog import catalog

            print(json.dumps(catalog(), indent=2))
        elif args.cmd == "pretrain":
            from ssql_core.train import pretrain

            d = _overrides(args, PretrainConfig)
            d["method_options"] = _parse_opt(args.opt)
            for k in ("w_bits", "a_bits", "bits"):
                if getattr(args, k) is not None:
                    d[k] = tuple(getattr(args, k)) if k != "bits" else args.bits
            summary = pretrain(PretrainConfig.from_dict(d), args.out, PrintProgress())
            print(json.dumps(summary, indent=2))
        else:
            from ssql_core.evaluate import evaluate, format_table

            d = _overrides(args, EvalConfig)
            d["checkpoint"] = args.checkpoint
            d["bits"] = [_bits_item(b) for b in args.bits.split(",") if b]
            if isinstance(d.get("autobit"), str):
                d["autobit"] = _json_option("--autobit", d["autobit"], 'e.g. --autobit \'{"budget_bits": 4.0}\'')
            rows = evaluate(EvalConfig.from_dict(d), args.out, PrintProgress())
            print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    except ConfigError as e:
        print(f"ssql-core: error: {e.field}: {e.reason}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, Cancelled) as e:
        print(f"ssql-core: stopped: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"ssql-core: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
