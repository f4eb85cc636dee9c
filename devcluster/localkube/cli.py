"""``localkube``: build, start, inspect and stop the local Kubernetes control plane.

localkube build [--with-kueue]            build (or find cached) etcd and the control plane (and Kueue)
localkube up [--nodes N] [--with-kueue]   start etcd, apiserver, controller-manager, scheduler, node
                                          agent (and Kueue: its manager, CRDs and webhooks)
localkube status           say what runs and print the kubeconfig path
localkube env              print `export KUBECONFIG=...` and PATH for kubectl/helm/kubectl-research
localkube down             stop exactly the processes `up` started (Kueue too)
localkube logs NS/POD      print a pod's log (pods run as local processes, see docs/node-agent.md)
localkube agent ...        run the node agent in the foreground (used by `up`)
localkube real-node up|down|status   a real node on the running cluster: the kubelet, containerd, the
                           CNI bridge, kube-proxy and CoreDNS (root; docs/node-agent.md)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from localkube import kueue
from localkube.controlplane import Cluster, build_binaries, default_state_dir, kube_tools_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="localkube", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--state-dir", type=Path, default=default_state_dir(), help="cluster state directory")
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="build or find the cached control-plane binaries")
    build.add_argument("--with-kueue", action="store_true", help="also build Kueue's manager")
    up = sub.add_parser("up", help="start the cluster (reuses a healthy running one)")
    up.add_argument("--nodes", type=int, default=1, help="number of Nodes the agent registers")
    up.add_argument(
        "--with-kueue",
        action="store_true",
        help="also run Kueue (its CRDs, its manager, its webhooks on loopback); also on a running cluster",
    )
    sub.add_parser("status", help="show whether the cluster runs")
    sub.add_parser("env", help="print shell exports for KUBECONFIG and kubectl/helm")
    sub.add_parser("down", help="stop the cluster")
    logs = sub.add_parser("logs", help="print a pod's log file")
    logs.add_argument("pod", help="NAMESPACE/POD")
    logs.add_argument("-c", "--container", default=None)
    sub.add_parser("agent", help="run the node agent in the foreground", add_help=False)
    real = sub.add_parser("real-node", help="a real node (kubelet, containerd, kube-proxy, CoreDNS)")
    real.add_argument("action", choices=("up", "down", "status"))
    real.add_argument("--name", default="localreal-1", help="the Node's name (up)")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = Cluster(args.state_dir)

    if args.cmd == "build":
        start = time.monotonic()
        print(build_binaries())
        if args.with_kueue:
            print(kueue.build())
        print(f"took {time.monotonic() - start:.1f}s", file=sys.stderr)
        return 0
    if args.cmd == "up":
        start = time.monotonic()
        nodes = tuple(f"localnode-{i + 1}" for i in range(args.nodes))
        cluster.up(nodes=nodes)
        if args.with_kueue:
            try:
                kueue.start(cluster)
            except BaseException:
                kueue.stop(cluster)
                raise
        print(f"cluster ready in {time.monotonic() - start:.1f}s", file=sys.stderr)
        _print_env(cluster)
        return 0
    if args.cmd == "status":
        if cluster.healthy():
            print(f"running: {cluster.server}  KUBECONFIG={cluster.kubeconfig}")
            if kueue.running(cluster):
                print(f"Kueue {kueue.KUEUE_VERSION} running (log {cluster.logs_dir / 'kueue.log'})")
            from localkube import realnode

            real_node = realnode.running(cluster)
            if real_node is not None:
                log_dir = cluster.state_dir / "real-nodes" / real_node["name"] / "logs"
                print(f"real node {real_node['name']} running (logs {log_dir})")
            node = cluster.container_node()
            if node is not None:
                print(
                    f"container node {node['name']} running (image {node['image']},"
                    f" log {cluster.logs_dir / 'container-node.log'})"
                )
            return 0
        print("not running")
        return 1
    if args.cmd == "env":
        _print_env(cluster)
        return 0
    if args.cmd == "down":
        stopped = cluster.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    if args.cmd == "logs":
        ns, _, pod = args.pod.partition("/")
        paths = sorted((cluster.state_dir / "nodes" / "pods").glob(f"{ns}_{pod}_*/*.log"))
        if args.container:
            paths = [p for p in paths if p.stem == args.container]
        if not paths:
            print(f"no logs for pod {args.pod}", file=sys.stderr)
            return 1
        for p in paths:
            sys.stdout.write(p.read_text(errors="replace"))
        return 0
    if args.cmd == "real-node":
        return _real_node(cluster, args.action, args.name)
    if args.cmd == "agent":
        from localkube import nodeagent

        return int(nodeagent.main(rest))
    return 2


def _real_node(cluster: Cluster, action: str, name: str) -> int:
    from localkube import realnode
    from localkube.containers import build_image

    if action == "down":
        print("stopped the real node" if realnode.stop(cluster) else "no real node was running")
        return 0
    if action == "status":
        node = realnode.running(cluster)
        if node is None:
            print("no real node running")
            return 1
        logs = cluster.state_dir / "real-nodes" / node["name"] / "logs"
        print(f"real node {node['name']} running (image {node['image']}, logs {logs})")
        return 0
    if os.geteuid() != 0:
        print("a real node needs root (containerd, runc, network and mount namespaces)", file=sys.stderr)
        return 1
    if realnode.running(cluster) is None:
        # A node whose supervisor was killed: forget it (the cluster counts its recorded processes);
        # its leftovers (containers, shims, namespaces) go when it starts again.
        realnode.stop(cluster)
    if not cluster.healthy():
        print("the cluster is not running: localkube up first", file=sys.stderr)
        return 1
    start = time.monotonic()
    bin_dir = realnode.build_binaries()
    image = build_image()
    started = realnode.start(cluster, name, image.directory, bin_dir)
    took = time.monotonic() - start
    print(f"real node {name} {'started' if started else 'already running'} in {took:.1f}s", file=sys.stderr)
    print(
        f"pods land there with nodeSelector {realnode.RUNTIME_LABEL}={realnode.RUNTIME} and a toleration of"
        f" the taint {realnode.RUNTIME_LABEL}={realnode.RUNTIME}:NoSchedule"
    )
    return 0


def _print_env(cluster: Cluster) -> None:
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    # kubectl and helm, and this venv's bin for the `kubectl research` plugin (kubectl-research)
    print(f"export PATH={kube_tools_dir()}:{Path(sys.executable).parent}:$PATH")


if __name__ == "__main__":
    sys.exit(main())
