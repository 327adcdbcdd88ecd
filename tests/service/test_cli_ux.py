"""The command line and the docs as a new user meets them (issue 10): JSON that parses, one line
when the server is down, ``--wait`` that survives a lost connection, no traceback into ``head``,
a second ``ssql up`` on a busy port, ``/docs`` offline, the ``4w4f`` alias on every bits route,
the job log route, ``ssql results --plot``.

The first tests need no server (the client is given a mock transport); the rest run the real
service in embedded mode (SQLite, filesystem broker) with tiny jobs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from ssql_cli import main as cli
from ssql_cli.stack import PortInUse, Stack, check_port_free, free_port
from ssql_client import ApiError, Client, ServerUnreachable
from tests.service.conftest import TINY, clean_env

FAILED_JOB = {
    "id": "0b8e0f9e-1111-4222-8333-444455556666", "kind": "eval", "status": "failed", "spec": {}, "source_job": None,
    "attempts": 1, "max_attempts": 3, "cancel_requested": False, "progress": {"fraction": 0.0}, "summary": None,
    "error": {"code": "missing_checkpoint", "message": "the last.pt of job X is gone", "field": "source_job"},
    "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "started_at": None, "finished_at": None,
}  # fmt: skip


def _mock_client(monkeypatch: pytest.MonkeyPatch, handler) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cli, "_client", lambda _a: Client("http://mock", "k", transport=httpx.MockTransport(handler)))


def test_status_json_is_only_json_when_the_job_failed(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    _mock_client(monkeypatch, lambda r: httpx.Response(200, json=FAILED_JOB))
    assert cli.main(["status", FAILED_JOB["id"], "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["error"]["code"] == "missing_checkpoint"  # the whole of stdout parses
    assert cli.main(["status", FAILED_JOB["id"]]) == 0  # the human form still says it
    assert "error: the last.pt" in capsys.readouterr().out


def test_server_down_is_one_line_naming_the_address(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status", "some-job"], ["list"], ["submit", "pretrain", "--wait"]):
        proc = subprocess.run([sys.executable, "-m", "ssql_cli.main", "--url", url, *args], capture_output=True,
                              text=True, timeout=60, env=clean_env(SSQL_HOME=str(tmp_path)))  # fmt: skip
        assert proc.returncode == 3, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and url in lines[0] and "connection refused" in lines[0], proc.stderr


def test_wait_retries_connection_errors() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise httpx.ConnectError("Connection refused", request=request)
        if calls["n"] == 4:
            return httpx.Response(503, json={"detail": "restarting"})
        status = "running" if calls["n"] < 6 else "succeeded"
        return httpx.Response(200, json={**FAILED_JOB, "status": status, "error": None})

    retries: list[tuple[str, int]] = []
    c = Client("http://mock", "k", transport=httpx.MockTransport(handler))
    job = c.wait("j", poll_s=0.01, on_retry=lambda e, n: retries.append((type(e).__name__, n)))
    assert job["status"] == "succeeded"
    assert retries == [("ServerUnreachable", 1), ("ServerUnreachable", 2), ("ApiError", 3)]
    # it gives up after reconnect_s without an answer, with the one-line error
    down = Client("http://mock", "k", transport=httpx.MockTransport(lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r))))
    with pytest.raises(ServerUnreachable, match="http://mock"):
        down.wait("j", poll_s=0.01, reconnect_s=0.05)
    # a 404 is not retried
    gone = Client("http://mock", "k", transport=httpx.MockTransport(lambda r: httpx.Response(404, json={"detail": "job not found"})))
    with pytest.raises(ApiError, match="404"):
        gone.wait("j", poll_s=0.01)


def test_pipe_into_head_is_quiet(tmp_path: Path) -> None:
    script = tmp_path / "many.py"
    script.write_text(textwrap.dedent(f"""
        import sys, httpx
        from ssql_cli import main as m
        from ssql_client import Client
        job = {dict(FAILED_JOB, error=None)!r}
        page = {{"items": [job] * 20000, "next_offset": None}}
        m._client = lambda a: Client("http://mock", "k", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=page)))
        sys.exit(m.main(["list", "--limit", "100"]))
    """))
    proc = subprocess.run(f"set -o pipefail; {sys.executable} {script} | head -n 2", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_port_check() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", free_port())


# -- the real service, embedded -------------------------------------------------------------------


def _ssql(env: dict[str, str], *args: str, timeout: float = 300, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ssql_cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"ssql {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("cli_ux_home")
    env = clean_env(SSQL_HOME=str(home), SSQL_DEVICE="cpu", SSQL_TORCH_THREADS="1")
    key = _ssql(env, "keys", "create", "dora").stdout.strip()
    other = _ssql(env, "keys", "create", "eve").stdout.strip()
    stack = Stack(env, free_port(), log_dir=home / "logs")
    stack.start(timeout=120)
    yield home, stack, dict(env, SSQL_URL=stack.url, SSQL_API_KEY=key), other
    stack.stop()


@pytest.fixture(scope="module")
def jobs(embedded):  # type: ignore[no-untyped-def]
    """A tiny pretrain (export_bits fp, 4w4a) and an eval of it at fp, 4w4a, 2w4a."""
    _home, stack, env, _other = embedded
    c = Client(stack.url, env["SSQL_API_KEY"])
    pre = c.pretrain(**{k: v for k, v in TINY.items() if k != "kind"}, epochs=2, export_bits=["fp", "4w4a"])
    pre = c.wait(pre["id"], poll_s=0.2, timeout=300)
    assert pre["status"] == "succeeded", pre
    ev = c.evaluate(pre["id"], ["fp", "4w4f", "2w4a"], epochs=1, calib_images=16, max_samples=64)
    ev = c.wait(ev["id"], poll_s=0.2, timeout=300)
    assert ev["status"] == "succeeded", ev
    return pre["id"], ev["id"]


def test_second_up_on_a_busy_port_fails(embedded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, _other = embedded
    t0 = time.monotonic()
    proc = _ssql(dict(env, SSQL_HOME=str(tmp_path)), "up", "--port", str(stack.port), ok=False, timeout=60)
    assert proc.returncode == 1, proc
    assert f"port {stack.port} on 127.0.0.1 is already in use" in proc.stderr
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "ssql.db").exists()  # nothing was started (no migration, no worker)


def test_docs_are_served_from_the_package(embedded) -> None:  # type: ignore[no-untyped-def]
    _home, stack, _env, _other = embedded
    html = httpx.get(f"{stack.url}/docs").text
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in html and "/static/vendor/swagger-ui/swagger-ui.css" in html
    assert "cdn" not in html.lower() and "https://" not in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "LICENSE"):
        r = httpx.get(f"{stack.url}/static/vendor/swagger-ui/{asset}")
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert httpx.get(f"{stack.url}/redoc").status_code == 404  # ReDoc would need a CDN
    assert httpx.get(f"{stack.url}/openapi.json").status_code == 200


def test_4w4f_is_4w4a_on_every_bits_route(embedded, jobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, _other = embedded
    pre_id, ev_id = jobs
    c = Client(stack.url, env["SSQL_API_KEY"])
    assert [r["bits"] for r in c.result_rows(ev_id)] == ["fp", "4w4a", "2w4a"]  # the eval took 4w4f
    path_a, sha_a = c.download(pre_id, "4w4a", tmp_path / "a.safetensors", fmt="safetensors")
    path_f, sha_f = c.download(pre_id, "4w4f", tmp_path / "f.safetensors", fmt="safetensors")
    assert sha_a == sha_f == hashlib.sha256(path_f.read_bytes()).hexdigest()
    assert c.download(pre_id, "4W4A", tmp_path / "u.safetensors", fmt="safetensors")[1] == sha_a
    r = c.http.get(f"/v1/jobs/{pre_id}/checkpoints/9w9a")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "bits"]
    assert c.http.get(f"/v1/jobs/{pre_id}/checkpoints/7w7a").status_code == 404  # valid, not exported
    # export and distill take it too
    r = c.http.post(f"/v1/jobs/{pre_id}/exports", json={"bits": ["4w4f"], "formats": ["safetensors"]})
    assert r.status_code == 202 and r.json()["spec"]["config"]["bits"] == ["4w4a"], r.text
    c.cancel(r.json()["id"])
    r = c.http.post("/v1/jobs", json={"kind": "distill", "source_job": ev_id, "bits": "4w4f", "epochs": 1})
    assert r.status_code == 201 and r.json()["spec"]["config"]["bits"] == "4w4a", r.text
    c.cancel(r.json()["id"])


def test_job_logs(embedded, jobs) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, other = embedded
    pre_id, _ev_id = jobs
    c = Client(stack.url, env["SSQL_API_KEY"])
    text = c.logs(pre_id)
    lines = text.splitlines()
    assert lines[0] == "==> attempt 1 <==" and any(x.split(" ", 1)[1].startswith("progress ") for x in lines[1:]), text
    assert any(" result: " in x for x in lines), text
    tail = c.logs(pre_id, tail=2).splitlines()
    assert tail == ["==> attempt 1 <==", *lines[-2:]]
    assert c.logs(pre_id, tail=0) == ""
    # follow on a finished job: everything, then the stream ends
    assert list(c.follow_logs(pre_id, tail=1)) == ["==> attempt 1 <==", lines[-1]]
    # the CLI
    out = _ssql(env, "logs", pre_id, "--tail", "1").stdout
    assert out.splitlines() == ["==> attempt 1 <==", lines[-1]]
    # owner-checked, and a bad tail is a 422
    assert httpx.get(f"{stack.url}/v1/jobs/{pre_id}/logs", headers={"Authorization": f"Bearer {other}"}).status_code == 404
    assert httpx.get(f"{stack.url}/v1/jobs/{pre_id}/logs").status_code == 401
    assert c.http.get(f"/v1/jobs/{pre_id}/logs", params={"tail": -1}).status_code == 422


def test_logs_follow_streams_a_running_job(embedded) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, _other = embedded
    c = Client(stack.url, env["SSQL_API_KEY"])
    job = c.pretrain(**{k: v for k, v in TINY.items() if k != "kind"}, epochs=3, export_bits=[])
    seen: list[tuple[float, str]] = []
    for line in c.follow_logs(job["id"]):
        seen.append((time.monotonic(), line))
    final = c.job(job["id"])
    assert final["status"] == "succeeded", final
    texts = [x for _t, x in seen]
    assert texts[0] == "==> attempt 1 <==" and any(" result: " in x for x in texts), texts
    assert c.logs(job["id"]).splitlines() == texts  # the stream sent every line, once


def test_results_plot_and_several_jobs(embedded, jobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _home, _stack, env, _other = embedded
    _pre_id, ev_id = jobs
    png = tmp_path / "field.png"
    proc = _ssql(env, "results", ev_id, ev_id, "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "wrote" in proc.stderr
    out = _ssql(env, "results", ev_id, "--json").stdout
    assert [r["bits"] for r in json.loads(out)["rows"]] == ["fp", "4w4a", "2w4a"]


def test_plot_order_and_points(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from ssql_client.plot import bits_order, plot_top1

    assert bits_order(["2w4a", "fp", "7w7a", "4w4a", "8w8a", "2w8a"]) == ["fp", "8w8a", "4w4a", "2w8a", "2w4a", "7w7a"]
    rows = {"ssql": [{"bits": b, "top1": t} for b, t in (("fp", 70.0), ("4w4a", 60.0), ("2w4a", 40.0))],
            "simsiam": [{"bits": b, "top1": t} for b, t in (("fp", 71.0), ("8w8a", 69.0), ("4w4a", 50.0))]}  # fmt: skip
    ax = plot_top1(rows, tmp_path / "x.png")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8w8a", "4w4a", "2w4a"]
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert [len(ln.get_xdata()) for ln in solid] == [2, 2] and len(dashed) == 2
    assert list(solid[1].get_xdata()) == [0, 1]  # simsiam: 8w8a at x=0, 4w4a at x=1


def test_readme_says_what_the_code_does() -> None:
    from ssql_core.bits import parse_bits

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert str(parse_bits("4w4f")) == "4w4a"
    assert 'alias `"4w4f"`' not in readme and "4w4f" in readme and "4-bit weights and 4-bit activations" in readme
    running = readme[readme.index("### Running it"):readme.index("### Python client")]
    assert "source .venv/bin/activate" in running and "SSQL_TORCH_THREADS=1" in running
    assert "max_samples=512" in running and "docker-compose.gpus.yml" in running and "SSQL_DATASETS_DIR" in running


# -- issue 18: CLI, client and API defects ----------------------------------------------------------


def test_results_of_a_pretrain_names_its_evaluations(embedded, jobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _home, _stack, env, _other = embedded
    pre_id, ev_id = jobs
    png = tmp_path / "empty.png"
    for args in (["results", pre_id], ["results", pre_id, "--plot", str(png)]):
        proc = _ssql(env, *args, ok=False)
        assert proc.returncode == 1 and proc.stdout == "", proc
        assert f"{pre_id} is a pretrain job" in proc.stderr and f"{ev_id} (eval, succeeded)" in proc.stderr
        assert f"ssql results {ev_id}" in proc.stderr and "Traceback" not in proc.stderr
    assert not png.exists()  # no empty figure


def test_url_and_key_after_the_subcommand(embedded, jobs) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, _other = embedded
    pre_id, _ev_id = jobs
    bare = {k: v for k, v in env.items() if k not in ("SSQL_URL", "SSQL_API_KEY")}
    key = env["SSQL_API_KEY"]
    for args in (["list", "--url", stack.url, "--key", key], ["--url", stack.url, "list", "--key", key],
                 ["--key", key, "status", pre_id, "--url", stack.url]):
        proc = _ssql(bare, *args)
        assert pre_id in proc.stdout or "succeeded" in proc.stdout, (args, proc.stdout)
    assert "401" in _ssql(bare, "--key", key, "list", "--url", stack.url, "--key", "wrong", ok=False).stderr  # the last one wins


def test_download_file_names(embedded, jobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, _other = embedded
    pre_id, _ev_id = jobs
    c = Client(stack.url, env["SSQL_API_KEY"])
    for bits, fmt, name in (("4w4a", "safetensors", f"{pre_id}-4w4a.safetensors"), ("fp", "torch", f"{pre_id}-fp.pt")):
        r = c.http.get(f"/v1/jobs/{pre_id}/checkpoints/{bits}", params={"format": fmt})
        assert r.status_code == 200 and f'filename="{name}"' in r.headers["content-disposition"], r.headers
    # `ssql download` without --format names the file by the format it got (4w4a: safetensors only)
    proc = subprocess.run([sys.executable, "-m", "ssql_cli.main", "download", pre_id, "--bits", "4w4a"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"{pre_id}-4w4a.safetensors").is_file() and not list(tmp_path.glob("*.pt"))


def test_client_finetune_and_catalog_defaults(embedded, jobs) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, _other = embedded
    pre_id, _ev_id = jobs
    c = Client(stack.url, env["SSQL_API_KEY"])
    job = c.finetune(pre_id, "2w4a", quantizer="lsq", epochs=1, max_samples=64)
    assert job["kind"] == "finetune" and job["source_job"] == pre_id
    assert job["spec"]["config"]["bits"] == "2w4a" and job["spec"]["config"]["quantizer"] == "lsq"
    c.cancel(job["id"])
    defaults = c.catalog()["defaults"]
    assert set(defaults) == {"pretrain", "eval", "distill", "finetune", "export"}
    assert defaults["pretrain"]["method"] == "ssql" and "data_root" not in defaults["eval"] and "checkpoint" not in defaults["finetune"]
    # what a preset decides shows as ours: MSE ranges and the BN probe; the checkpoint's rounding stays open
    assert (defaults["eval"]["calibration"], defaults["eval"]["probe"], defaults["eval"]["lr"]) == ("mse", "bn", 0.1)
    assert defaults["eval"]["rounding"] is None and defaults["pretrain"]["drop_last"] is True
    assert defaults["finetune"]["head_init"] == "probe"


def test_a_422_names_every_bad_field_with_this_servers_range(embedded, jobs) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, _other = embedded
    pre_id, _ev_id = jobs
    c = Client(stack.url, env["SSQL_API_KEY"])
    r = c.http.post("/v1/jobs", json={"kind": "pretrain", "epochs": 0, "batch_size": 1, "lr": -1.0})
    assert r.status_code == 422
    detail = {tuple(d["loc"]): d["msg"] for d in r.json()["detail"]}
    assert set(detail) == {("body", "epochs"), ("body", "batch_size"), ("body", "lr")}, detail
    assert detail[("body", "epochs")] == "must be between 1 and 1000 on this server, got 0"  # not the library's 10000
    assert detail[("body", "batch_size")] == "must be between 2 and 4096 on this server, got 1"
    r = c.http.post("/v1/jobs", json={"kind": "finetune", "source_job": pre_id, "epochs": 100000, "lr": -1.0})
    detail = {tuple(d["loc"]): d["msg"] for d in r.json()["detail"]}
    assert r.status_code == 422 and detail[("body", "epochs")] == "must be at most 1000 on this server, got 100000"
    assert ("body", "lr") in detail
    schema = c.http.get("/openapi.json").json()["components"]["schemas"]["FinetuneRequest"]["properties"]
    assert schema["epochs"]["maximum"] == 1000  # the schema states the same range


def test_the_event_stream_carries_the_times(embedded, jobs) -> None:  # type: ignore[no-untyped-def]
    _home, stack, env, _other = embedded
    _pre_id, ev_id = jobs
    c = Client(stack.url, env["SSQL_API_KEY"])
    with c.http.stream("GET", f"/v1/jobs/{ev_id}/events") as r:
        text = "".join(r.iter_text())
    event = json.loads(next(line[5:] for line in text.splitlines() if line.startswith("data:")))
    job = c.job(ev_id)
    assert event["started_at"] == job["started_at"] and event["finished_at"] == job["finished_at"] is not None


def test_eval_progress_names_the_bit_width_being_probed() -> None:
    from ssql_cli.render import progress_line

    job = {"kind": "eval", "status": "running", "attempts": 1,
           "spec": {"config": {"bits": ["fp", "8w8a", "4w4a", "2w4a"], "epochs": 35}},
           "progress": {"phase": "linear", "fraction": 0.26, "epoch": 36, "epochs": 140, "eta_s": 10.0}}  # fmt: skip
    line = progress_line(job)
    assert "8w8a (2/4) epoch 1/35" in line and "36/140" not in line, line
    pre = {**job, "kind": "pretrain", "spec": {"config": {"epochs": 140}}, "progress": {**job["progress"], "phase": "pretrain"}}
    assert "epoch 36/140" in progress_line(pre)


def test_plot_top1_shows_the_figure_from_a_script(tmp_path: Path) -> None:
    """A script calling plot_top1(rows) sees a figure: plt.show() is called (a recording backend)."""
    (tmp_path / "recording_backend.py").write_text(textwrap.dedent("""
        import os
        from matplotlib.backends.backend_agg import FigureCanvasAgg as FigureCanvas  # noqa: F401

        def show(*args, **kwargs):
            import matplotlib.pyplot as plt
            open(os.environ["SHOWN"], "w").write(str(len(plt.get_fignums())))
    """))
    script = "from ssql_client import plot_top1\nplot_top1({'ssql': [{'bits': 'fp', 'top1': 70.0}, {'bits': '4w4a', 'top1': 60.0}]})\n"
    shown = tmp_path / "shown.txt"
    env = clean_env(MPLBACKEND="module://recording_backend", SHOWN=str(shown),
                    PYTHONPATH=f"{tmp_path}:{Path(__file__).resolve().parents[2]}")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert shown.read_text() == "1"  # shown, with its one figure


def test_ctrl_c_of_ssql_up_stops_quietly(tmp_path: Path) -> None:
    import signal

    port = free_port()
    env = clean_env(SSQL_HOME=str(tmp_path), SSQL_DEVICE="cpu", SSQL_TORCH_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ssql_cli.main", "up", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        time.sleep(3)  # the worker is up too
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Ctrl-C stops it" in out, out  # it did start
    assert "ERROR" not in out and "Traceback" not in out, out


def test_help_shows_no_rest_markup() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ssql_cli.main", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ssql: run the service" in out.stdout and "``" not in out.stdout, out.stdout
