"""One graph over several hosts: fixed ports from base_port, one launcher per host (--host),
CURVE on non-loopback binds. "Hosts" here are addresses of this machine: 127.0.0.1 and
127.0.0.2 (both loopback on Linux) and, when it has one, a non-loopback IPv4 address."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile as wavfile
import zmq
import zmq.auth

from engine.graph import GraphError, allocate, load_graph, parse_graph, placed_on
from engine.launcher import launch
from engine.messages import AudioChunk
from engine.node import Node
from engine.transport import CurveKeys, InsecureBindError, Receiver, Sender, stop_authenticator

SR = 11025
ROOT = Path(__file__).resolve().parents[2]
# source and sink on host A, two pass-throughs on host B: the audio crosses A -> B -> A.
SPLIT = """
[graph]
name = "split"
base_port = {base}
{security}
[nodes.source]
class = "engine.testing:ArraySource"
host = "{a}"
params = {{ path = "{{graph_dir}}/in.npy", block = 1000 }}
[nodes.p1]
class = "engine.testing:PassThrough"
host = "{b}"
[nodes.p2]
class = "engine.testing:PassThrough"
host = "{b}"
[nodes.sink]
class = "nodes.sinks:WavSink"
host = "{a}"
params = {{ out_dir = "{{graph_dir}}/sep" }}
[[edges]]
from = "source.audio"
to = "p1.in"
[[edges]]
from = "p1.out"
to = "p2.in"
[[edges]]
from = "p2.out"
to = "sink.audio"
"""


def _lan_ipv4() -> str | None:
    """A non-loopback IPv4 address of this machine (`hostname -I`), or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in out.split():
        try:
            ip = ipaddress.ip_address(word)
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback:
            return word
    return None


LAN = _lan_ipv4()
needs_lan = pytest.mark.skipif(LAN is None, reason="no non-loopback IPv4 address on this "
                               "machine (`hostname -I`): a CURVE bind off loopback needs one")


def _free_base(n: int, hosts: list[str]) -> int:
    """A base port whose next ``n`` ports are free on every host (below the ephemeral range)."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        try:
            for port in range(base, base + n):
                for host in hosts:
                    with socket.socket() as s:
                        s.bind((host, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def _procs_mentioning(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if token in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _write_graph(d: Path, x: np.ndarray, **fmt) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "in.npy", x)
    fmt.setdefault("security", "")
    (d / "g.toml").write_text(SPLIT.format(**fmt))
    return d / "g.toml"


def _launcher(graph: Path, host: str, run_dir: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.launcher", str(graph), "--host", host,
         "--run-dir", str(run_dir), "--timeout", "60"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run_split(graph: Path, a: str, b: str, run_dir: Path) -> dict[str, tuple[dict, str]]:
    """Both launchers at once; {host: (summary, stderr)}."""
    procs = {h: _launcher(graph, h, run_dir / h) for h in (a, b)}
    results = {}
    try:
        for host, p in procs.items():
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results[host] = (json.loads(out), err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return results


# ------------------------------------------------------------------------ fixed endpoints
class _Cam(Node):
    outputs = {"audio": "push", "video": "pub"}


class _Watch(Node):
    inputs = {"video": "sub", "audio": "pull"}


class _Mid(Node):
    inputs = {"in": "pull"}
    outputs = {"out": "push"}


@pytest.fixture
def fake_nodes(monkeypatch):
    """Node classes importable as ``mh:<name>`` (in this process only)."""
    module = types.ModuleType("mh")
    module.Cam, module.Watch, module.Mid = _Cam, _Watch, _Mid
    monkeypatch.setitem(sys.modules, "mh", module)


def _placed(base_port=6000, **hosts):
    nodes = {"cam": {"class": "mh:Cam"}, "mid": {"class": "mh:Mid"},
             "watch": {"class": "mh:Watch"}, "local": {"class": "mh:Mid"}}
    for name, host in hosts.items():
        nodes[name]["host"] = host
    edges = [("cam.audio", "mid.in"), ("mid.out", "watch.audio"), ("cam.video", "watch.video"),
             ("cam.audio", "local.in")]
    return {"graph": {"name": "t", "base_port": base_port}, "nodes": nodes,
            "edges": [{"from": f, "to": t} for f, t in edges]}


def _tcp_view(wiring) -> list[tuple]:
    """Every tcp endpoint of every node: (node, direction, port, pattern, bind, endpoint)."""
    out = []
    for name, w in wiring.items():
        ports = [("in", p, pw) for p, pw in w.inputs.items()]
        ports += [("out", p, pw) for p, pws in w.outputs.items() for pw in pws]
        for direction, port, pw in ports:
            out += [(name, direction, port, pw.pattern, pw.bind, ep) for ep in pw.endpoints
                    if ep.startswith("tcp://")]
    return out


def test_base_port_numbers_bound_sockets_in_file_order(tmp_path, fake_nodes):
    data = _placed(cam="127.0.0.1", mid="127.0.0.2", watch="127.0.0.1")
    w1 = allocate(parse_graph(data), tmp_path / "m1")  # two "machines", the same file
    w2 = allocate(parse_graph(data), tmp_path / "m2")
    # cam: no pull input, its pub output -> 6000; mid.in -> 6001; watch.audio -> 6002
    # (watch.video is a sub input: it connects). "local" has no host: ipc, not numbered.
    assert w1["cam"].outputs["video"][0].endpoints == ["tcp://127.0.0.1:6000"]
    assert w1["cam"].outputs["video"][0].bind
    assert w1["mid"].inputs["in"].endpoints == ["tcp://127.0.0.2:6001"]
    assert w1["watch"].inputs["audio"].endpoints == ["tcp://127.0.0.1:6002"]
    assert w1["watch"].inputs["video"].endpoints == ["tcp://127.0.0.1:6000"]
    assert not w1["watch"].inputs["video"].bind
    assert [pw.endpoints for pw in w1["cam"].outputs["audio"]] == [
        ["tcp://127.0.0.2:6001"], [w1["local"].inputs["in"].endpoints[0]]]
    assert w1["local"].inputs["in"].endpoints[0].startswith("ipc://")
    assert _tcp_view(w1) == _tcp_view(w2) and len(_tcp_view(w1)) == 6
    del data["graph"]["base_port"]  # no base_port: the hosted node gets some free port
    w = allocate(parse_graph(data), tmp_path / "m3")
    assert w["mid"].inputs["in"].endpoints[0].startswith("tcp://127.0.0.2:")


def test_split_placement_errors(tmp_path, fake_nodes):
    all_placed = _placed(cam="127.0.0.1", mid="127.0.0.2", watch="127.0.0.1",
                         local="127.0.0.2")
    assert placed_on(parse_graph(all_placed), "127.0.0.2") == ["mid", "local"]
    with pytest.raises(GraphError, match=r"no node is placed on host '10\.9\.9\.9'; hosts in "
                                         r"graph 't': \['127\.0\.0\.1', '127\.0\.0\.2'\]"):
        placed_on(parse_graph(all_placed), "10.9.9.9")
    with pytest.raises(GraphError, match=r"nodes \['local'\] have no host"):
        placed_on(parse_graph(_placed(cam="127.0.0.1", mid="127.0.0.2", watch="127.0.0.1")),
                  "127.0.0.1")
    no_base = _placed(cam="127.0.0.1", mid="127.0.0.2", watch="127.0.0.1", local="127.0.0.2")
    del no_base["graph"]["base_port"]
    with pytest.raises(GraphError, match="needs \\[graph\\] base_port"):
        placed_on(parse_graph(no_base), "127.0.0.1")
    for bad in (0, 65536, "5550", True, 1.5):
        with pytest.raises(GraphError, match="graph.base_port"):
            parse_graph(_placed(base_port=bad))
    with pytest.raises(GraphError, match="too few ports"):  # 3 hosted sockets from 65534
        allocate(parse_graph(_placed(base_port=65534, cam="127.0.0.1", mid="127.0.0.1",
                                     watch="127.0.0.1")), tmp_path)


def test_cli_bad_host_is_one_error_line(tmp_path):
    graph = _write_graph(tmp_path, np.zeros(10, np.float32), base=6000, a="127.0.0.1",
                         b="127.0.0.2")
    p = subprocess.run([sys.executable, "-m", "engine.launcher", str(graph), "--host",
                        "10.9.9.9", "--run-dir", str(tmp_path / "run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [
        "error: no node is placed on host '10.9.9.9'; hosts in graph 'split': "
        "['127.0.0.1', '127.0.0.2']"]
    assert not (tmp_path / "run").exists()  # nothing was started


# ------------------------------------------------------------------------ real processes
def test_graph_split_over_two_launchers_equals_single_launcher(tmp_path):
    x = (0.3 * np.random.default_rng(2).standard_normal(SR)).astype(np.float32)
    a, b = "127.0.0.1", "127.0.0.2"
    base = _free_base(3, [a, b])
    one = _write_graph(tmp_path / "one", x, base=base, a=a, b=b)
    two = _write_graph(tmp_path / "two", x, base=base, a=a, b=b)

    single = launch(one, tmp_path / "one" / "run", timeout=60)
    assert single["reason"] == "finished", single
    assert set(single["nodes"]) == {"source", "p1", "p2", "sink"}

    results = _run_split(two, a, b, tmp_path / "two" / "run")
    (sa, err_a), (sb, err_b) = results[a], results[b]
    assert sa["reason"] == sb["reason"] == "finished"
    assert (sa["host"], set(sa["nodes"])) == (a, {"source", "sink"})
    assert (sb["host"], set(sb["nodes"])) == (b, {"p1", "p2"})
    # file order source, p1, p2, sink: p1.in and p2.in bind base, base+1 on b; sink.audio
    # base+2 on a; each launcher reports what it binds
    assert f"binds ['tcp://{b}:{base}', 'tcp://{b}:{base + 1}']" in err_b
    assert f"binds ['tcp://{a}:{base + 2}']" in err_a
    assert sa["nodes"]["sink"]["inputs"]["audio"]["gaps"] == 0
    assert sb["nodes"]["p1"]["counters"]["in"] == sa["nodes"]["source"]["counters"]["out"]

    _, y1 = wavfile.read(tmp_path / "one" / "sep" / "mix.wav")
    _, y2 = wavfile.read(tmp_path / "two" / "sep" / "mix.wav")
    assert y1.shape == x.shape and np.array_equal(y1, x)
    assert np.array_equal(y2, y1)
    assert not _procs_mentioning(str(tmp_path))


def test_split_launcher_waits_for_its_peers_and_stops_on_ctrl_c(tmp_path):
    base = _free_base(3, ["127.0.0.1", "127.0.0.2"])
    graph = _write_graph(tmp_path, np.zeros(SR, np.float32), base=base, a="127.0.0.1",
                         b="127.0.0.2")
    run_dir = tmp_path / "run"
    # Only host b: its nodes wait for a source that never comes; the launcher must wait too.
    p = _launcher(graph, "127.0.0.2", run_dir, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(_procs_mentioning(str(run_dir))) < 1 + 2:  # the launcher, p1 and p2 only
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        time.sleep(1.0)
        assert p.poll() is None
        assert len(_procs_mentioning(str(run_dir))) == 1 + 2
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    summary = json.loads(out)
    assert summary["reason"] == "signal" and set(summary["nodes"]) == {"p1", "p2"}
    assert all(n["exit_codes"] == [0] for n in summary["nodes"].values())
    time.sleep(0.2)
    assert not _procs_mentioning(str(run_dir))


# ------------------------------------------------------------------------ CURVE off loopback
def _keys(tmp_path: Path) -> tuple[CurveKeys, CurveKeys]:
    """(keys of the graph: server + authorized client, keys of a client nobody authorized)."""
    keys = tmp_path / "keys"
    (keys / "authorized").mkdir(parents=True)
    (keys / "other").mkdir()
    _, server_secret = zmq.auth.create_certificates(str(keys), "server")
    _, client_secret = zmq.auth.create_certificates(str(keys / "authorized"), "client")
    _, other_secret = zmq.auth.create_certificates(str(keys / "other"), "intruder")
    good = CurveKeys(server_secret, client_secret, str(keys / "authorized"))
    return good, CurveKeys(server_secret, other_secret)


@needs_lan
def test_curve_bind_off_loopback_serves_only_authorized_clients(tmp_path):
    good, intruder = _keys(tmp_path)
    endpoint = f"tcp://{LAN}:{_free_base(1, [LAN])}"
    refused_ctx = zmq.Context()
    try:
        with pytest.raises(InsecureBindError, match="CURVE"):
            Sender(refused_ctx, "pub", [endpoint], bind_endpoint=True)
    finally:
        refused_ctx.destroy(linger=0)
    server_ctx, client_ctx = zmq.Context(), zmq.Context()
    pub, readers = None, {}
    try:
        pub = Sender(server_ctx, "pub", [endpoint], bind_endpoint=True, curve=good)
        for name, k in (("authorized", good), ("intruder", intruder), ("plain", None)):
            readers[name] = Receiver(client_ctx, "sub", [endpoint], bind_endpoint=False, curve=k)
        got = {name: 0 for name in readers}
        deadline = time.monotonic() + 10
        i = 0
        # Publish until the authorized reader has had 0.5 s of messages.
        while got["authorized"] < 25 and time.monotonic() < deadline:
            pub.send(AudioChunk(stream="s", sample_index=i, samples=np.ones(8, np.float32)))
            i += 1
            for name, r in readers.items():
                got[name] += len(r.recv(20))
        assert got["authorized"] >= 25
        assert got["intruder"] == 0 and got["plain"] == 0
    finally:
        if pub is not None:
            pub.close(linger_ms=0)
        for r in readers.values():
            r.close()
        stop_authenticator(server_ctx)
        server_ctx.term()
        client_ctx.term()


@needs_lan
def test_graph_split_with_a_curve_host(tmp_path):
    good, _ = _keys(tmp_path)
    security = (f'[security]\nserver_secret = "{good.server_secret}"\n'
                f'client_secret = "{good.client_secret}"\n'
                f'authorized_dir = "{good.authorized_dir}"\n')
    x = (0.3 * np.random.default_rng(3).standard_normal(SR)).astype(np.float32)
    a, b = "127.0.0.1", LAN
    base = _free_base(3, [a, b])
    plain = _write_graph(tmp_path / "plain", x, base=base, a=a, b=b)
    with pytest.raises(GraphError, match=f"'p1' binds on non-loopback host '{b}'"):
        load_graph(plain)  # without [security] the graph is refused
    graph = _write_graph(tmp_path / "curve", x, base=base, a=a, b=b, security=security)
    results = _run_split(graph, a, b, tmp_path / "curve" / "run")
    assert all(s["reason"] == "finished" for s, _ in results.values())
    assert all(n["restarts"] == 0 for s, _ in results.values() for n in s["nodes"].values())
    _, y = wavfile.read(tmp_path / "curve" / "sep" / "mix.wav")
    assert np.array_equal(y, x)
