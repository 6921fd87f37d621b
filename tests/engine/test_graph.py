"""Graph specs: parsing, validation errors, endpoint allocation; profiler; node harness."""

from __future__ import annotations

import numpy as np
import pytest

from engine.graph import GraphError, allocate, load_graph, parse_graph
from engine.messages import ALL_STREAMS, AudioChunk, EndOfStream
from engine.profiler import format_summary, summarize
from engine.testing import ManualClock, PassThrough, run_node

PT = "engine.testing:PassThrough"


def _graph(edges, **nodes_extra):
    nodes = {"a": {"class": PT}, "b": {"class": PT}, **nodes_extra}
    return {"graph": {"name": "t"}, "nodes": nodes,
            "edges": [{"from": f, "to": t} for f, t in edges]}


def test_allocate_ipc_and_tcp(tmp_path):
    g = parse_graph(_graph([("a.out", "b.in")]))
    w = allocate(g, tmp_path)
    assert w["b"].inputs["in"].bind and w["b"].inputs["in"].endpoints[0].startswith("ipc://")
    assert w["a"].outputs["out"][0].endpoints == w["b"].inputs["in"].endpoints
    assert not w["a"].outputs["out"][0].bind and w["b"].inputs["in"].n_upstream == 1
    data = _graph([("a.out", "b.in")])
    data["graph"]["transport"] = "tcp"
    w = allocate(parse_graph(data), tmp_path)
    assert w["b"].inputs["in"].endpoints[0].startswith("tcp://127.0.0.1:")


def test_fan_in_counts_upstream_edges(tmp_path):
    g = parse_graph(_graph([("a.out", "c.in"), ("b.out", "c.in")], c={"class": PT}))
    assert allocate(g, tmp_path)["c"].inputs["in"].n_upstream == 2


@pytest.mark.parametrize("data, why", [
    ({"nodes": {}}, "at least one"),
    ({"nodes": {"a": {}}}, "needs a 'class'"),
    ({"nodes": {"bad name": {"class": PT}}}, "must match"),
    ({"nodes": {"a": {"class": PT, "colour": 1}}}, "unknown keys"),
    ({"nodes": {"a": {"class": PT}}, "extra": {}}, "unknown top-level"),
    ({"graph": {"transport": "udp"}, "nodes": {"a": {"class": PT}}}, "transport"),
    (_graph([("a.out", "zz.in")]), "unknown node 'zz'"),
    (_graph([("a", "b.in")]), "node.port"),
    ({"nodes": {"a": {"class": PT, "host": "10.0.0.5"}}}, "non-loopback host"),
])
def test_parse_errors(data, why):
    with pytest.raises(GraphError, match=why):
        parse_graph(data)


@pytest.mark.parametrize("edges, extra, why", [
    ([("a.nope", "b.in")], {}, "no output 'nope'"),
    ([("a.out", "b.nope")], {}, "no input 'nope'"),
    ([("a.out", "b.in")], {"b": {"class": "engine.testing:ManualClock"}}, "not a subclass"),
    ([("a.out", "b.in")], {"b": {"class": "no_such_module:X"}}, "cannot import"),
    ([("a.out", "b.in")], {"b": {"class": "engine.testing"}}, "module:Class"),
])
def test_validation_errors(tmp_path, edges, extra, why):
    data = _graph(edges)
    data["nodes"].update(extra)
    with pytest.raises(GraphError, match=why):
        allocate(parse_graph(data), tmp_path)


def test_pattern_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(PassThrough, "inputs", {"in": "sub"})
    with pytest.raises(GraphError, match="push->pull and pub->sub"):
        allocate(parse_graph(_graph([("a.out", "b.in")])), tmp_path)


def test_load_graph_file_substitutes_graph_dir(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[nodes.a]\nclass = "engine.testing:CrashOnce"\n'
                    'params = { marker = "{graph_dir}/m" }\n')
    g = load_graph(path)
    assert g.nodes["a"].params["marker"] == f"{tmp_path.resolve()}/m"
    path.write_text("[nodes.a\n")
    with pytest.raises(GraphError, match="invalid TOML"):
        load_graph(path)


def test_profiler_percentiles():
    trails = [[("src", 0.0, 0.001), ("mid", 0.003, 0.004 + i * 1e-4), ("sink", 0.005 + i * 1e-4,
                                                                         0.006 + i * 1e-4)]
              for i in range(100)]
    s = summarize(trails)
    assert s["compute"]["src"]["p50"] == pytest.approx(1.0)
    assert s["queue"]["mid"]["p99"] == pytest.approx(2.0)
    assert s["end_to_end"]["p50"] == pytest.approx(6.0 + 49.5 * 0.1)  # i * 0.1 ms, median i = 49.5
    assert s["end_to_end"]["n"] == 100 and s["paths"] == {"src>mid>sink": 100}
    assert "end-to-end" in format_summary(s)


def test_run_node_stamps_trails_with_injected_clock():
    clock = ManualClock(10.0)
    msg = AudioChunk(stream="a", sample_index=0, samples=np.zeros(4, np.float32),
                     trail=[("src", 9.0, 9.5)])
    out = run_node(PassThrough(), [("in", msg), ("in", EndOfStream(stream=ALL_STREAMS))],
                   clock=clock)
    assert [p for p, _ in out] == ["out", "out"]
    assert out[0][1].trail == [("src", 9.0, 9.5), ("PassThrough", 10.0, 10.0)]
    with pytest.raises(ValueError, match="no input 'x'"):
        run_node(PassThrough(), [("x", msg)])
    assert len(run_node(PassThrough(), [("in", msg)] * 5, max_messages=2)) == 2
