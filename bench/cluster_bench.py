"""Measure the local control plane: time to start it, and time for a trivial Job to complete.

    .venv/bin/python bench/cluster_bench.py [--jobs 5]

Starts a fresh cluster in a temporary state directory (binaries must be built: `make cluster-build`),
times `up` until every Node is Ready, then creates trivial Jobs one after another and times each from
create to the Complete condition. Stops the cluster at the end.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from kubernetes import client, config

from localkube.controlplane import Cluster


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp) / "state")
        t0 = time.monotonic()
        cluster.up()
        start = time.monotonic() - t0
        try:
            api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
            core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
            while not core.list_namespaced_service_account("default").items:
                time.sleep(0.1)
            times = []
            for i in range(args.jobs):
                name = f"trivial-{i}"
                t = time.monotonic()
                batch.create_namespaced_job(
                    "default",
                    {
                        "metadata": {"name": name},
                        "spec": {
                            "backoffLimit": 0,
                            "template": {
                                "spec": {
                                    "restartPolicy": "Never",
                                    "containers": [
                                        {"name": "main", "image": "python", "command": ["python", "-c", "print(1)"]}
                                    ],
                                }
                            },
                        },
                    },
                )
                while True:
                    job = batch.read_namespaced_job(name, "default")
                    if any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or []):
                        break
                    time.sleep(0.05)
                times.append(time.monotonic() - t)
        finally:
            cluster.down()
    print(f"cluster start (up until Nodes Ready): {start:.1f} s")
    print(
        f"trivial Job create -> Complete over {len(times)} runs: median {statistics.median(times):.2f} s, "
        f"min {min(times):.2f} s, max {max(times):.2f} s"
    )


if __name__ == "__main__":
    main()
