"""Runs a graph: one process per node, a supervisor that restarts crashed nodes, clean shutdown.

``python -m engine.launcher graph.toml [--run-dir DIR] [--timeout S]`` runs a graph until its
sinks have finished (every node without outputs exited after end-of-stream), Ctrl-C or SIGTERM.
A node process that exits non-zero is restarted with the same endpoints (logged and counted) up
to ``max_restarts`` times; past that the whole graph is stopped and the summary says why. On
stop every node gets SIGTERM (its loop ends, ``stop()`` closes files), stragglers SIGKILL after
a grace period; each worker also asks the kernel for SIGTERM if the launcher dies, so no node
outlives it. Each node logs to ``<run_dir>/<node>.log`` and writes ``<node>.stats.json``.

One graph over several machines: ``python -m engine.launcher graph.toml --host ADDR`` on each
machine runs only the nodes whose ``host`` is ADDR (the graph needs ``[graph] base_port`` and a
host on every node; see engine.graph). Each such launcher supervises and restarts its own
nodes only, and ends when those of them that end its part have finished: its sinks and its
nodes that feed another host. Without ``--host`` the whole graph runs here.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from engine.graph import Graph, GraphError, allocate, load_graph, placed_on, resolve_class
from engine.messages import ALL_STREAMS, EndOfStream
from engine.node import PortWiring, Runner, Wiring, install_signal_handlers
from engine.profiler import summarize
from engine.transport import CurveKeys, Sender

DEFAULT_MAX_RESTARTS = 3
STOP_GRACE_S = 5.0
END_GRACE_S = 0.5


@dataclass
class NodeProcess:
    """Supervision state of one node."""

    name: str
    spec_path: str
    log_path: str
    max_restarts: int
    is_end: bool  # a sink, or a node that feeds another host: the run waits for these
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    done: bool = False  # exited 0 (finished or stopped): never restarted
    done_at: float = 0.0
    upstream: list[tuple[str, str]] = field(default_factory=list)  # (node, endpoint) pull edges
    ends_sent: set[str] = field(default_factory=set)  # stand-in ends sent since the restart


class Launcher:
    """Starts, supervises and stops the processes of one graph."""

    def __init__(
        self,
        graph: Graph | str | Path,
        run_dir: str | Path | None = None,
        *,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        log: Any = None,
        host: str | None = None,
    ) -> None:
        self.graph = graph if isinstance(graph, Graph) else load_graph(graph)
        self.host = host  # None: every node; else only the nodes placed on this host
        self.own = list(self.graph.nodes) if host is None else placed_on(self.graph, host)
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"iq-run-{self.graph.name}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._sock_dir = tempfile.mkdtemp(prefix="iq-")  # short: ipc paths are length-limited
        self.max_restarts = max_restarts
        self.log = log or (lambda line: print(f"[launcher] {line}", file=sys.stderr, flush=True))
        self.nodes: dict[str, NodeProcess] = {}
        self.failed: str | None = None
        self._stop = threading.Event()
        self._ctx: zmq.Context | None = None
        self._t0 = 0.0

    def start(self) -> None:
        """Allocate endpoints, write one spec per node and start this launcher's processes."""
        wiring = allocate(self.graph, self.run_dir, self._sock_dir)
        upstream: dict[str, list[tuple[str, str]]] = {name: [] for name in self.graph.nodes}
        feeds_away: set[str] = set()
        for e in self.graph.edges:
            port = wiring[e.dst].inputs[e.dst_port]
            if port.pattern == "pull":
                upstream[e.dst].append((e.src, port.endpoints[0]))
            if e.src in self.own and e.dst not in self.own:
                feeds_away.add(e.src)
        if self.host is not None:
            self.log(f"host {self.host}: nodes {self.own}; binds {_bound(wiring, self.own)}")
        for name in self.own:
            spec = self.graph.nodes[name]
            spec_path = self.run_dir / f"{name}.spec.json"
            spec_path.write_text(json.dumps({
                "name": name, "class": spec.cls, "params": spec.params,
                "wiring": _wiring_to_json(wiring[name]),
            }))
            self.nodes[name] = NodeProcess(
                name, str(spec_path), str(self.run_dir / f"{name}.log"),
                self.max_restarts if spec.max_restarts is None else spec.max_restarts,
                is_end=not wiring[name].outputs or name in feeds_away,
                upstream=upstream[name],
            )
        self._t0 = time.monotonic()
        for np_ in self.nodes.values():
            self._spawn(np_)

    def _spawn(self, n: NodeProcess) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        with open(n.log_path, "a") as logf:
            n.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.launcher", "--worker", n.spec_path],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )

    def supervise_once(self) -> bool:
        """Reap exited nodes, restart crashed ones; True when the graph is done."""
        for n in self.nodes.values():
            if n.done or n.proc is None or n.proc.poll() is None:
                continue
            code = n.proc.returncode
            n.exit_codes.append(code)
            if code == 0 or self._stop.is_set():
                n.done, n.done_at = True, time.monotonic()
                continue
            if n.restarts >= n.max_restarts:
                n.done = True
                self.failed = (f"node {n.name!r} crashed (exit {code}) after {n.restarts} "
                               f"restarts (max_restarts {n.max_restarts}); see {n.log_path}")
                self.log(self.failed)
                return True
            n.restarts += 1
            self.log(f"node {n.name!r} exited with {code}; restart {n.restarts}/{n.max_restarts}")
            n.ends_sent.clear()
            self._spawn(n)
        self._stand_in_ends()
        ends = [n for n in self.nodes.values() if n.is_end]
        return (bool(ends) and all(n.done for n in ends)) or all(
            n.done for n in self.nodes.values())

    def _stand_in_ends(self) -> None:
        """Send a restarted node the final ends its dead predecessor consumed.

        A crash loses the messages queued in the crashed process, possibly the final
        EndOfStream(ALL) of an upstream node that has since exited: without a stand-in the
        restarted node would wait forever. Sent only for upstream nodes that exited 0 at least
        END_GRACE_S ago, when all their data has long been delivered; the receiving node counts
        ends per sender, so a repeated end is harmless. An upstream node on another host is
        not watched from here: no stand-in for its end.
        """
        now = time.monotonic()
        for n in self.nodes.values():
            if n.restarts == 0 or n.done:
                continue
            for up, endpoint in n.upstream:
                u = self.nodes.get(up)
                key = f"{up}@{endpoint}"
                if u is None or key in n.ends_sent or not u.done or u.exit_codes[-1:] != [0]:
                    continue
                if now - u.done_at < END_GRACE_S:
                    continue
                if self._ctx is None:
                    self._ctx = zmq.Context()
                sender = Sender(self._ctx, "push", [endpoint], bind_endpoint=False,
                                curve=self.graph.curve)
                sender.send(EndOfStream(stream=ALL_STREAMS, reason="upstream finished",
                                        trail=[(up, now, now)]))
                sender.close(linger_ms=-1)  # kept until the node binds; stop() destroys the context
                n.ends_sent.add(key)
                self.log(f"sent {n.name!r} the end of {up!r} (lost in its crash)")

    def run(self, timeout: float | None = None) -> dict[str, Any]:
        """Start (if needed), supervise until done, a signal or ``timeout``; stop; summarize."""
        if not self.nodes:
            self.start()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, lambda *_: self._stop.set())
        reason = "finished"
        try:
            while True:
                if self._stop.is_set():
                    reason = "signal"
                    break
                if self.supervise_once():
                    reason = "failed" if self.failed else "finished"
                    break
                if timeout is not None and time.monotonic() - self._t0 > timeout:
                    reason = "timeout"
                    break
                self._stop.wait(0.05)
        finally:
            self.stop()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return self.summary(reason)

    def request_stop(self) -> None:
        """Ask run() to stop (thread-safe)."""
        self._stop.set()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every live node, SIGKILL what is left after ``grace_s``; reap all."""
        self._stop.set()
        live = [n.proc for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"pid {p.pid} ignored SIGTERM for {grace_s} s: SIGKILL")
                p.kill()
                p.wait()
        for n in self.nodes.values():
            if n.proc is not None and not n.done and n.proc.returncode is not None:
                n.exit_codes.append(n.proc.returncode)
                n.done = True
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def summary(self, reason: str) -> dict[str, Any]:
        """Per-node counters, restarts and exit codes, plus profiler stats from the sinks."""
        nodes: dict[str, Any] = {}
        trails: list = []
        for name, n in self.nodes.items():
            stats_path = self.run_dir / f"{name}.stats.json"
            stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
            trails.extend(stats.pop("trails", []))
            nodes[name] = {"restarts": n.restarts, "exit_codes": n.exit_codes, **stats}
        return {
            "graph": self.graph.name,
            "host": self.host,
            "reason": reason,
            "error": self.failed,
            "wall_s": time.monotonic() - self._t0,
            "run_dir": str(self.run_dir),
            "nodes": nodes,
            "latency": summarize(trails),
        }


def launch(
    graph: Graph | str | Path,
    run_dir: str | Path | None = None,
    *,
    timeout: float | None = None,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> dict[str, Any]:
    """Run a graph to completion and return its summary (see Launcher.summary)."""
    return Launcher(graph, run_dir, max_restarts=max_restarts).run(timeout)


def _bound(wiring: dict[str, Wiring], names: list[str]) -> list[str]:
    """The endpoints the nodes ``names`` bind (what a firewall must let in)."""
    out = []
    for name in names:
        w = wiring[name]
        for pw in [*w.inputs.values(), *(pw for pws in w.outputs.values() for pw in pws)]:
            if pw.bind:
                out.extend(pw.endpoints)
    return out


# ------------------------------------------------------------------------------- the worker
def _wiring_to_json(w: Wiring) -> dict[str, Any]:
    return {
        "inputs": {p: asdict(pw) for p, pw in w.inputs.items()},
        "outputs": {p: [asdict(pw) for pw in pws] for p, pws in w.outputs.items()},
        "curve": asdict(w.curve) if w.curve else None,
        "stats_path": w.stats_path,
    }


def _wiring_from_json(d: dict[str, Any]) -> Wiring:
    return Wiring(
        inputs={p: PortWiring(**pw) for p, pw in d["inputs"].items()},
        outputs={p: [PortWiring(**pw) for pw in pws] for p, pws in d["outputs"].items()},
        curve=CurveKeys(**d["curve"]) if d["curve"] else None,
        stats_path=d["stats_path"],
    )


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGTERM to this process when the launcher dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass  # the loop's parent-pid check still ends the node


def worker_main(spec_path: str) -> int:
    """Entry of one node process: build the node, serve it, exit 0 when finished or stopped."""
    parent = os.getppid()
    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text())
    cls = resolve_class(spec["class"])
    node = cls(**spec["params"])
    node.name = spec["name"]
    runner = Runner(node, _wiring_from_json(spec["wiring"]))
    install_signal_handlers(runner)
    finished = runner.serve(parent_pid=parent)
    print(f"[{node.name}] {'finished' if finished else 'stopped'}: {dict(node.counters)}",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: run a graph file, print its summary as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("graph", nargs="?", help="graph TOML file")
    ap.add_argument("--run-dir", help="where logs, specs and stats go (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS)
    ap.add_argument("--host", metavar="ADDR",
                    help="run only the nodes whose host is ADDR: one part of a graph split over "
                         "machines, one launcher per machine (needs [graph] base_port and a "
                         "host on every node; default: the whole graph here)")
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if not args.graph:
        ap.error("a graph file is required")
    try:
        launcher = Launcher(args.graph, args.run_dir, max_restarts=args.max_restarts,
                            host=args.host)
    except (GraphError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    launcher.log(f"run dir {launcher.run_dir}")
    try:
        launcher.start()  # checks the classes and ports before anything runs
    except GraphError as exc:
        launcher.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = launcher.run(args.timeout)
    print(json.dumps(summary, indent=1))
    return 0 if summary["reason"] in ("finished", "signal") else 1


if __name__ == "__main__":
    sys.exit(main())
