"""Issue 18 items 3 and 4 over HTTP, in the client and in the CLI (real Postgres, Redis, Celery):
metric histories downsampled for charts (first, last and extremes kept) and whole in CSV, CSV
cells safe from formula injection, a job's chain owner-scoped both ways, and the request that
makes a job again giving the same spec for every kind. The jobs are rows (tests/service/runs_chain.py):
nothing trains here but one cloned pretrain, cancelled at once."""

from __future__ import annotations

import csv
import io
import json
import shlex
from pathlib import Path

import httpx
import pytest

from api.downsample import keep_indices
from api.specs import export_spec
from ssql_cli import main as cli
from ssql_cli.reuse import submission
from ssql_client import Client, UnknownField
from tests.service import runs_chain
from tests.service.runs_chain import DIP_AT, EVIL_NAME, FORMULA_NAME, SPIKE_AT, STEPS, Chain

MB = 1_000_000


@pytest.fixture(scope="module")
def chain(client: httpx.Client, other_client: httpx.Client, sessions) -> Chain:  # type: ignore[no-untyped-def]
    return runs_chain.build(client, sessions)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# -- downsampling (no server) ------------------------------------------------------------------------


def test_downsampling_keeps_ends_and_extremes_of_every_series_and_line() -> None:
    rows = [{"phase": "pretrain", **{k: v for k, v in runs_chain.pretrain_curve(i).items() if k != "metrics"},
             "extra": runs_chain.pretrain_curve(i)["metrics"]} for i in range(STEPS)]
    kept = keep_indices(rows, 500)
    assert len(kept) <= 500 and kept == sorted(set(kept))
    assert {0, STEPS - 1, SPIKE_AT, DIP_AT} <= set(kept)
    for name in ("lr", "images_per_s"):
        values = [r[name] for r in rows]
        assert values.index(max(values)) in kept and values.index(min(values)) in kept
    z = [r["extra"]["z_std"] for r in rows]
    assert z.index(max(z)) in kept and z.index(min(z)) in kept
    # an eval job's probes are lines of their own: each keeps its first and last sample
    probes = [{"phase": "linear", "loss": float(i % 13), "extra": {"bits_index": i // 300}} for i in range(900)]
    kept = keep_indices(probes, 60)
    assert len(kept) <= 60 and {0, 299, 300, 599, 600, 899} <= set(kept)
    assert keep_indices(rows[:10], 500) == list(range(10))  # short histories are not touched
    assert keep_indices(probes, 2) == [0, 899]  # fewer points than lines: evenly spaced, ends kept


# -- metrics: chart-sized and whole ----------------------------------------------------------------


def test_a_10000_step_curve_downsampled_under_1_mb_with_its_ends_and_extremes(client: httpx.Client, chain: Chain) -> None:
    full = client.get(f"/v1/jobs/{chain.pretrain}/metrics", params={"limit": 10000})
    assert full.status_code == 200 and len(full.json()["items"]) == STEPS
    r = client.get(f"/v1/jobs/{chain.pretrain}/metrics", params={"max_points": 1500})
    assert r.status_code == 200, r.text
    assert len(r.content) < MB < len(full.content)  # the page's request stays small; the whole history would not
    page = r.json()
    items = page["items"]
    assert page["downsampled_from"] == STEPS and page["next_after"] is None and 100 < len(items) <= 1500
    steps = [m["step"] for m in items]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == STEPS  # first and last
    losses = {m["step"]: m["loss"] for m in items}
    assert losses[SPIKE_AT + 1] == 9.5 and losses[DIP_AT + 1] == -0.75  # the extremes
    every = full.json()["items"]
    for name in ("lr", "images_per_s"):
        assert max(m[name] for m in items) == max(m[name] for m in every)
        assert min(m[name] for m in items) == min(m[name] for m in every)
    # after= continues from the last sample shown (a live page's next poll)
    assert client.get(f"/v1/jobs/{chain.pretrain}/metrics", params={"max_points": 10, "after": items[-1]["id"]}).json()["items"] == []
    assert client.get(f"/v1/jobs/{chain.pretrain}/metrics", params={"max_points": 1}).status_code == 422


def test_metrics_csv_is_every_sample_with_formulas_defused(client: httpx.Client, chain: Chain) -> None:
    r = client.get(f"/v1/jobs/{chain.pretrain}/metrics", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert f'filename="{chain.pretrain}-metrics.csv"' in r.headers["content-disposition"]
    rows = _rows(r.text)
    assert len(rows) == STEPS
    assert list(rows[0])[:11] == ["job_id", "job_name", "job_kind", "sample_id", "attempt", "phase", "epoch", "step", "loss", "lr",
                                  "images_per_s"]
    assert list(rows[0])[-2:] == ["metrics.z_std", "at"]
    assert rows[0]["job_name"] == EVIL_NAME  # text, as written (it starts with '<': no formula)
    assert rows[DIP_AT]["loss"] == "-0.75"  # a negative number stays a number: never prefixed
    assert float(rows[SPIKE_AT]["loss"]) == 9.5 and rows[-1]["step"] == str(STEPS)
    ev = _rows(client.get(f"/v1/jobs/{chain.eval1}/metrics", params={"format": "csv"}).text)
    assert {row["job_name"] for row in ev} == {"'" + FORMULA_NAME}  # '=HYPERLINK(...)': shown as text by a spreadsheet
    assert [row["metrics.bits_index"] for row in ev] == ["0", "1", "2"]
    assert client.get(f"/v1/jobs/{chain.pretrain}/metrics", params={"format": "xml"}).status_code == 422


def test_results_csv_of_a_selection_names_method_calibration_and_probe(client: httpx.Client, chain: Chain) -> None:
    r = client.get("/v1/compare/results.csv", params={"job": [chain.eval1, chain.eval2, chain.distill, chain.finetune]})
    assert r.status_code == 200, r.text
    rows = _rows(r.text)
    assert [row["job_id"] for row in rows] == [chain.eval1] * 3 + [chain.eval2] * 3 + [chain.distill, chain.finetune]
    assert {row["method"] for row in rows} == {"ssql"}  # the pretrain's, for every kind
    by = {(row["job_id"], row["bits"]): row for row in rows}
    e1 = by[(chain.eval1, "4w4a")]
    assert e1["top1"] == "70.25" and e1["calibration"] == chain.specs[chain.eval1]["config"]["calibration"]
    assert e1["job_name"] == "'" + FORMULA_NAME and e1["pretrain_job"] == chain.pretrain
    assert by[(chain.eval2, "8w8a")]["calibration"] == "minmax" and by[(chain.eval2, "8w8a")]["probe"] == "linear"
    assert by[(chain.distill, "4w4a")]["quantizer"] == "lsq" and by[(chain.distill, "4w4a")]["pretrain_job"] == chain.pretrain
    assert json.loads(by[(chain.finetune, "4w4a")]["curve"])[1]["test_top1"] == 74.0
    single = _rows(client.get(f"/v1/jobs/{chain.eval1}/results", params={"format": "csv"}).text)
    assert single == [{k: row[k] for k in single[0]} for row in rows[:3]]  # the selection's file: more columns (empty here)
    assert all(v == "" for row in rows[:3] for k, v in row.items() if k not in single[0])
    metrics = _rows(client.get("/v1/compare/metrics.csv", params={"job": [chain.distill, chain.finetune]}).text)
    assert len(metrics) == 100 and {m["job_kind"] for m in metrics} == {"distill", "finetune"}


def test_a_selection_is_owner_scoped_and_bounded(client: httpx.Client, other_client: httpx.Client, chain: Chain) -> None:
    r = other_client.get("/v1/compare/results.csv", params={"job": [chain.eval1]})
    assert r.status_code == 404 and chain.eval1 in r.json()["detail"]
    assert other_client.get(f"/v1/jobs/{chain.pretrain}/metrics", params={"format": "csv"}).status_code == 404
    assert client.get("/v1/compare/metrics.csv").status_code == 422  # no job named
    assert client.get("/v1/compare/metrics.csv", params={"job": [chain.eval1] * 51}).status_code == 422


# -- lineage ---------------------------------------------------------------------------------------


def test_lineage_links_both_ways_and_never_shows_another_owners_job(client: httpx.Client, other_client: httpx.Client,
                                                                     chain: Chain) -> None:
    lin = client.get(f"/v1/jobs/{chain.distill}/lineage").json()
    assert [p["id"] for p in lin["parents"]] == [chain.eval1, chain.pretrain]  # its source first
    assert lin["children"] == []
    tree = [(n["id"], n["depth"]) for n in lin["tree"]]  # depth-first from the pretrain, oldest first
    assert tree == [(chain.pretrain, 0), (chain.eval1, 1), (chain.distill, 2), (chain.export, 2), (chain.eval2, 1), (chain.finetune, 1)]
    assert lin["truncated"] is False
    pre = client.get(f"/v1/jobs/{chain.pretrain}/lineage").json()
    assert [c["id"] for c in pre["children"]] == [chain.eval1, chain.eval2, chain.finetune] and pre["parents"] == []
    assert chain.foreign not in json.dumps(pre) and chain.foreign not in json.dumps(lin)  # mallory's row points at alice's job
    what = {n["id"]: n["what"] for n in pre["tree"]}
    assert what[chain.pretrain] == "ssql · resnet18 · synthetic" and what[chain.export] == "export 4w4a as safetensors,onnx"
    assert what[chain.eval2] == "eval fp,8w8a,4w4a · minmax · linear probe" and what[chain.distill] == "distill 4w4a lsq"
    assert {n["name"] for n in pre["tree"]} >= {EVIL_NAME, FORMULA_NAME}  # JSON carries the text as is; pages escape it
    # the other owner: alice's jobs are 404; their own row sourced from alice's job stands alone
    assert other_client.get(f"/v1/jobs/{chain.pretrain}/lineage").status_code == 404
    own = other_client.get(f"/v1/jobs/{chain.foreign}/lineage").json()
    assert own["parents"] == [] and [n["id"] for n in own["tree"]] == [chain.foreign]
    small = client.get(f"/v1/jobs/{chain.pretrain}/lineage", params={"limit": 2}).json()
    assert small["truncated"] is True and len(small["tree"]) == 2 and len(small["children"]) == 2


# -- reuse: the same spec again ----------------------------------------------------------------------


def test_the_reproducing_request_gives_the_same_spec_for_every_kind(client: httpx.Client, api_key: str, stack, chain: Chain) -> None:  # type: ignore[no-untyped-def]
    c = Client(stack.url, api_key)
    for job_id in (chain.pretrain, chain.eval1, chain.eval2, chain.distill, chain.finetune):
        r = client.get(f"/v1/jobs/{job_id}/reproduce").json()
        assert r["path"] == "/v1/jobs" and r["cli_from"] == f"ssql submit --from {job_id}"
        assert len(r["minimal"]) < len(r["request"])
        for body in (r["request"], r["minimal"]):
            again = client.post("/v1/jobs", params={"dry_run": "1"}, json=body)
            assert again.status_code == 200, (job_id, body, again.text)
            assert again.json()["spec"] == chain.specs[job_id], job_id
        # the command line shown: parsed by the CLI, it builds the same spec
        words = shlex.split(r["cli"])
        assert words[:3] == ["ssql", "submit", r["kind"]]
        args = cli.build_parser().parse_args(words[1:])
        kind, body = submission(args, c)
        if args.source_job:
            body["source_job"] = args.source_job
        assert c.estimate({**body, "kind": kind})["spec"] == chain.specs[job_id], (job_id, r["cli"])
    r = client.get(f"/v1/jobs/{chain.export}/reproduce").json()
    assert r["path"] == f"/v1/jobs/{chain.eval1}/exports" and r["source_job"] == chain.eval1
    source = {"id": chain.eval1, "kind": "eval", "spec": chain.specs[chain.eval1], "source_job_id": chain.pretrain}
    width = chain.specs[chain.pretrain]["config"]["width"]
    for body in (r["request"], r["minimal"]):
        assert export_spec(body, source, width) == chain.specs[chain.export]
    assert r["cli"] == f"ssql submit export --source-job {chain.eval1} --set 'bits=[\"4w4a\"]' --set 'formats=[\"safetensors\",\"onnx\"]'"
    pre = client.get(f"/v1/jobs/{chain.pretrain}/reproduce").json()
    assert pre["request"]["method_options"] == {"proj_dim": 32} and "name" not in pre["request"]  # labels are not copied
    assert "--set 'method_options={\"proj_dim\":32}'" in pre["cli"]


def test_clone_in_the_client_and_submit_from_in_the_cli(stack, api_key: str, client: httpx.Client, chain: Chain,  # type: ignore[no-untyped-def]
                                                       capsys, tmp_path: Path) -> None:
    c = Client(stack.url, api_key)
    with pytest.raises(UnknownField, match="did you mean 'epochs'"):
        c.clone(chain.pretrain, {"epochz": 3})
    with pytest.raises(UnknownField, match="proj_dim"):
        c.clone(chain.pretrain, {"method_options.proj_dimm": 16})
    job = c.clone(chain.pretrain, {"seed": 7, "method_options.proj_dim": 16}, name="clone of P", tags=["runs-test"])
    c.cancel(job["id"])  # a real submission; it need not train
    want = json.loads(json.dumps(chain.specs[chain.pretrain]))
    want["config"]["seed"], want["config"]["method_options"] = 7, {"proj_dim": 16}
    got = {k: v for k, v in job["spec"].items() if k != "estimate"}
    assert got == want and job["name"] == "clone of P" and job["source_job"] is None
    assert [n["id"] for n in c.lineage(chain.pretrain)["tree"]][0] == chain.pretrain
    base = ["--url", stack.url, "--key", api_key]
    # the CLI: an unknown field is refused before anything is sent, with the closest names
    assert cli.main([*base, "submit", "--from", chain.eval1, "--set", "calibrationn=minmax"]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'calibrationn' for an eval job (did you mean 'calibration'" in err, err
    assert cli.main([*base, "submit", "pretrain", "--from", chain.eval1]) == 2
    assert "is an eval job, not pretrain" in capsys.readouterr().err
    assert cli.main([*base, "submit", "--from", chain.eval1, "--set", "bits.x=1"]) == 2
    assert "'bits' is a list, not an object" in capsys.readouterr().err
    assert cli.main([*base, "submit", "--from", chain.eval1, "--set", "epochs=2", "--set", "calibration=\"minmax\"", "--dry-run"]) == 0
    assert "would be accepted" in capsys.readouterr().out
    assert cli.main([*base, "reproduce", chain.eval2]) == 0
    assert capsys.readouterr().out.strip() == client.get(f"/v1/jobs/{chain.eval2}/reproduce").json()["cli"]
    # metrics, results and lineage in the CLI
    out = tmp_path / "m.csv"
    assert cli.main([*base, "metrics", chain.distill, chain.finetune, "--csv", "-o", str(out)]) == 0
    assert out.read_bytes().decode() == c.metrics_csv(chain.distill, chain.finetune)  # as served: CRLF (RFC 4180)
    capsys.readouterr()
    assert cli.main([*base, "results", chain.eval1, chain.eval2, "--csv"]) == 0
    assert _rows(capsys.readouterr().out) == _rows(c.results_csv(chain.eval1, chain.eval2))
    assert cli.main([*base, "metrics", chain.pretrain, "--points", "12"]) == 0
    shown = capsys.readouterr().out
    assert "9.5" in shown and f"of {STEPS} samples, extremes kept" in shown
    assert cli.main([*base, "lineage", chain.export]) == 0
    tree = capsys.readouterr().out.splitlines()
    assert tree[0].startswith(f"  {chain.pretrain}") and any(line.startswith(f"*         {chain.export}") for line in tree), tree
