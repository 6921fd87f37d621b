"""Graph specs: a TOML file of nodes and edges, validated, then wired to concrete endpoints.

Format (every key but ``class`` and the edges' ``from``/``to`` is optional)::

    [graph]
    name = "identity"
    transport = "ipc"            # "ipc" (sockets in the run directory) or "tcp" (loopback ports)
    base_port = 5550             # fixed ports for nodes with a host (needed to split the graph)

    [security]                   # required as soon as a node names a non-loopback host
    server_secret = "keys/server.key_secret"
    client_secret = "keys/client.key_secret"
    authorized_dir = "keys/authorized"   # public keys of accepted clients

    [nodes.source]
    class = "nodes.sources:FileSource"   # "module:Class", a subclass of engine.node.Node
    host = "127.0.0.1"                   # binds this node's sockets on tcp://host:port
    max_restarts = 3
    params = { path = "{graph_dir}/in.wav", block = 1024 }

    [[edges]]
    from = "source.audio"        # node.output_port
    to = "stft.audio"            # node.input_port
    hwm = 1000

``{graph_dir}`` in a string parameter is replaced by the directory of the graph file.
The receiving side of a push->pull edge binds (many producers may feed one port); the sending
side of a pub->sub edge binds (many subscribers may listen).

Ports. A node without ``host`` binds ipc sockets (or free loopback tcp ports). A node with a
``host`` binds ``tcp://host:port``: a free port when ``base_port`` is not set; with
``base_port``, the ports ``base_port, base_port + 1, ...`` in the order of :func:`bound_sockets`
(nodes in file order; per node its fed "pull" inputs, then its "pub" outputs that have
subscribers, each in the order its class declares them), counting only nodes with a host. So
every machine that reads the same file (and the same node classes) computes the same wiring,
which is what running one graph over several machines needs (``engine.launcher --host``).
"""

from __future__ import annotations

import importlib
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.node import Node, PortWiring, Wiring
from engine.transport import CurveKeys, is_loopback

TRANSPORTS = ("ipc", "tcp")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_PAIRS = {"push": "pull", "pub": "sub"}


class GraphError(ValueError):
    """A graph spec that cannot run; the message names the bad value and the allowed ones."""


@dataclass
class NodeSpec:
    """One node of the graph."""

    name: str
    cls: str
    params: dict[str, Any] = field(default_factory=dict)
    host: str | None = None
    max_restarts: int | None = None


@dataclass
class EdgeSpec:
    """One edge ``src.src_port -> dst.dst_port``."""

    src: str
    src_port: str
    dst: str
    dst_port: str
    hwm: int | None = None


@dataclass
class Graph:
    """A parsed graph: nodes in file order, edges, transport and optional CURVE keys."""

    name: str
    nodes: dict[str, NodeSpec]
    edges: list[EdgeSpec]
    transport: str = "ipc"
    curve: CurveKeys | None = None
    base_dir: str = "."
    base_port: int | None = None


def resolve_class(path: str) -> type[Node]:
    """Import ``"module:Class"`` and check that it is a Node subclass."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise GraphError(f"class {path!r} must be 'module:Class', e.g. 'nodes.stft:STFT'")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise GraphError(f"cannot import class {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise GraphError(f"class {path!r} is not a subclass of engine.node.Node")
    return cls


def _subst(value: Any, base_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace("{graph_dir}", base_dir)
    if isinstance(value, list):
        return [_subst(v, base_dir) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, base_dir) for k, v in value.items()}
    return value


def _split(ref: Any, what: str) -> tuple[str, str]:
    if not isinstance(ref, str) or ref.count(".") != 1:
        raise GraphError(f"edge {what} {ref!r} must be 'node.port'")
    node, port = ref.split(".")
    return node, port


def parse_graph(data: dict[str, Any], base_dir: str = ".") -> Graph:
    """Build a Graph from the TOML document ``data`` (checks structure, not the classes)."""
    unknown = set(data) - {"graph", "security", "nodes", "edges"}
    if unknown:
        raise GraphError(f"unknown top-level tables {sorted(unknown)}; allowed: graph, security, "
                         "nodes, edges")
    meta = data.get("graph", {})
    transport = meta.get("transport", "ipc")
    if transport not in TRANSPORTS:
        raise GraphError(f"graph.transport {transport!r}; allowed: {list(TRANSPORTS)}")
    base_port = meta.get("base_port")
    if base_port is not None and (type(base_port) is not int or not 1 <= base_port <= 65535):
        raise GraphError(f"graph.base_port {base_port!r}; allowed: an integer from 1 to 65535")
    curve = None
    if "security" in data:
        sec = _subst(data["security"], base_dir)
        try:
            curve = CurveKeys(sec["server_secret"], sec["client_secret"], sec.get("authorized_dir"))
        except KeyError as exc:
            raise GraphError(
                f"[security] needs server_secret and client_secret; missing {exc}"
            ) from None
    nodes: dict[str, NodeSpec] = {}
    for name, spec in data.get("nodes", {}).items():
        if not _NAME.match(name):
            raise GraphError(f"node name {name!r} must match {_NAME.pattern}")
        if not isinstance(spec, dict) or "class" not in spec:
            raise GraphError(f"node {name!r} needs a 'class' = 'module:Class'")
        extra = set(spec) - {"class", "params", "host", "max_restarts"}
        if extra:
            raise GraphError(f"node {name!r} has unknown keys {sorted(extra)}; allowed: class, "
                             "params, host, max_restarts")
        host = spec.get("host")
        if host is not None and not is_loopback(host) and curve is None:
            raise GraphError(f"node {name!r} binds on non-loopback host {host!r}: add a [security] "
                             "table with CURVE key files, or use 127.0.0.1")
        nodes[name] = NodeSpec(name, spec["class"], _subst(dict(spec.get("params", {})), base_dir),
                               host, spec.get("max_restarts"))
    if not nodes:
        raise GraphError("a graph needs at least one [nodes.<name>] table")
    edges = []
    for e in data.get("edges", []):
        src, src_port = _split(e.get("from"), "from")
        dst, dst_port = _split(e.get("to"), "to")
        for n in (src, dst):
            if n not in nodes:
                raise GraphError(f"edge {e.get('from')} -> {e.get('to')} names unknown node {n!r}; "
                                 f"nodes: {list(nodes)}")
        edges.append(EdgeSpec(src, src_port, dst, dst_port, e.get("hwm")))
    return Graph(meta.get("name", "graph"), nodes, edges, transport, curve, base_dir, base_port)


def load_graph(path: str | Path) -> Graph:
    """Read and parse a TOML graph file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise GraphError(f"{path}: invalid TOML: {exc}") from exc
    return parse_graph(data, str(path.resolve().parent))


def validate(graph: Graph) -> dict[str, type[Node]]:
    """Import every class and check ports and patterns; return name -> class."""
    classes = {name: resolve_class(spec.cls) for name, spec in graph.nodes.items()}
    for e in graph.edges:
        out_pat = classes[e.src].outputs.get(e.src_port)
        in_pat = classes[e.dst].inputs.get(e.dst_port)
        if out_pat is None:
            raise GraphError(f"{e.src} has no output {e.src_port!r}; outputs: "
                             f"{list(classes[e.src].outputs)}")
        if in_pat is None:
            raise GraphError(f"{e.dst} has no input {e.dst_port!r}; inputs: "
                             f"{list(classes[e.dst].inputs)}")
        if _PAIRS.get(out_pat) != in_pat:
            raise GraphError(f"edge {e.src}.{e.src_port} ({out_pat}) -> {e.dst}.{e.dst_port} "
                             f"({in_pat}): allowed pairs are push->pull and pub->sub")
    return classes


def hosts(graph: Graph) -> list[str]:
    """The distinct ``host`` values of the nodes, in file order."""
    return list(dict.fromkeys(n.host for n in graph.nodes.values() if n.host is not None))


def placed_on(graph: Graph, host: str) -> list[str]:
    """The nodes to run on ``host`` when the graph is split over machines, in file order.

    Raises GraphError when no node is placed there, when ``[graph] base_port`` is missing
    (machines could not agree on ports) or when a node has no host (it would bind ipc or
    loopback sockets, which no other machine can reach, and no ``--host`` would run it).
    """
    names = [name for name, spec in graph.nodes.items() if spec.host == host]
    if not names:
        raise GraphError(f"no node is placed on host {host!r}; hosts in graph "
                         f"{graph.name!r}: {hosts(graph) or 'none (no node names a host)'}")
    if graph.base_port is None:
        raise GraphError("a graph split over hosts needs [graph] base_port = <port> so that "
                         "every machine computes the same tcp ports")
    homeless = [name for name, spec in graph.nodes.items() if spec.host is None]
    if homeless:
        raise GraphError(f"nodes {homeless} have no host: in a graph split over hosts every "
                         f"node needs one (hosts: {hosts(graph)})")
    return names


def bound_sockets(graph: Graph, classes: dict[str, type[Node]]) -> list[tuple[str, str, str]]:
    """Every socket that binds, as ``(node, "in" | "out", port)``, in port-numbering order.

    Nodes in file order; per node, its "pull" inputs that some edge feeds, then its "pub"
    outputs that some edge reads, each in the order the node's class declares its ports.
    """
    out = []
    for name, cls in classes.items():
        for port, pattern in cls.inputs.items():
            if pattern == "pull" and any(e.dst == name and e.dst_port == port
                                         for e in graph.edges):
                out.append((name, "in", port))
        for port, pattern in cls.outputs.items():
            if pattern == "pub" and any(e.src == name and e.src_port == port
                                        for e in graph.edges):
                out.append((name, "out", port))
    return out


def _free_port(host: str) -> int:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    except OSError:
        with socket.socket() as s:  # a host of another machine: any free number will do
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def allocate(
    graph: Graph, run_dir: str | Path, sock_dir: str | Path | None = None
) -> dict[str, Wiring]:
    """Give every bound socket an endpoint and return each node's wiring.

    ipc sockets live in ``sock_dir`` (default ``run_dir``; a socket path must stay under ~100
    characters). Nodes with a host get ``base_port`` + i when it is set (see the module doc).
    """
    run_dir = Path(run_dir)
    sock_dir = Path(sock_dir or run_dir)
    classes = validate(graph)
    wiring = {name: Wiring(curve=graph.curve, stats_path=str(run_dir / f"{name}.stats.json"))
              for name in graph.nodes}

    def endpoint(node: str, port: str, direction: str) -> str:
        host = graph.nodes[node].host
        if host is not None or graph.transport == "tcp":
            host = host or "127.0.0.1"
            return f"tcp://{host}:{_free_port(host)}"
        path = sock_dir / f"{node}.{direction}.{port}"
        if len(str(path)) > 100:
            raise GraphError(f"ipc socket path {path} is over 100 characters: use a shorter "
                             "sock_dir or graph.transport = 'tcp'")
        return f"ipc://{path}"

    bound: dict[tuple[str, str, str], str] = {}
    next_port = graph.base_port
    for node, direction, port in bound_sockets(graph, classes):
        host = graph.nodes[node].host
        if host is not None and next_port is not None:
            if next_port > 65535:
                raise GraphError(f"graph.base_port {graph.base_port} leaves too few ports below "
                                 "65536 for the sockets of the nodes with a host")
            bound[node, direction, port] = f"tcp://{host}:{next_port}"
            next_port += 1
        else:
            bound[node, direction, port] = endpoint(node, port, direction)

    for name, cls in classes.items():
        for port, pattern in cls.inputs.items():
            feeding = [e for e in graph.edges if e.dst == name and e.dst_port == port]
            if not feeding:
                continue
            if pattern == "pull":
                ep = bound[name, "in", port]
                hwm = max((e.hwm or 0) for e in feeding) or None
                wiring[name].inputs[port] = PortWiring("pull", [ep], True, hwm, len(feeding))
                for e in feeding:
                    wiring[e.src].outputs.setdefault(e.src_port, []).append(
                        PortWiring("push", [ep], False, e.hwm))
            else:
                wiring[name].inputs[port] = PortWiring("sub", [], False, None, len(feeding))
    for name, cls in classes.items():  # after all inputs exist: subscribers join publishers
        for port, pattern in cls.outputs.items():
            fed = [e for e in graph.edges if e.src == name and e.src_port == port]
            if pattern == "pub" and fed:
                ep = bound[name, "out", port]
                hwm = max((e.hwm or 0) for e in fed) or None
                wiring[name].outputs[port] = [PortWiring("pub", [ep], True, hwm)]
                for e in fed:
                    wiring[e.dst].inputs[e.dst_port].endpoints.append(ep)
    return wiring
