"""The two services a `tests.netns_cluster` cluster shares besides its network: S3 and MLflow.

Both run in the head's network namespace, listening on its addresses, so every node reaches
them over the cluster network only (as ``<head ip>:<port>``), the way real machines reach a
bucket and a tracking server:

* ``moto_server`` (``moto[server]``) on ``<head ip>:9000`` with one bucket: the object store;
* ``mlflow server`` on ``<head ip>:5000``, its SQLite store in the cluster's temp dir (the
  server's own disk) and its artifacts proxied to ``s3://<bucket>/mlflow``.

Nodes get the S3 endpoint and credentials from their environment (`s3_env`, given to
`start_netns_cluster` as ``node_env``), as a user's would; nothing in the project's params or
code names them. This machine's own namespace cannot reach either service: `ClusterServices`
reads the bucket and the tracking server by running small Python programs in the head's namespace.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from tests.netns_cluster import NetnsRayCluster
from tests.s3_server import moto_server_command

S3_PORT = 9000
MLFLOW_PORT = 5000
BUCKET = "fpn-cluster"
START_TIMEOUT_S = 150

WAIT_AND_MAKE_BUCKET = """
import sys, time, urllib.error, urllib.request, boto3
endpoint, mlflow, bucket, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + timeout
def answers(url):
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
while not answers(endpoint):
    if time.monotonic() > deadline:
        sys.exit(f"no S3 server at {endpoint}")
    time.sleep(0.3)
boto3.client("s3").create_bucket(Bucket=bucket)
while not answers(mlflow + "/health"):
    if time.monotonic() > deadline:
        sys.exit(f"no MLflow server at {mlflow}")
    time.sleep(0.5)
print("ready")
"""

LIST_KEYS = """
import json, sys, boto3
pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=sys.argv[1], Prefix=sys.argv[2])
print(json.dumps(sorted(o["Key"] for p in pages for o in p.get("Contents", []))))
"""


def s3_env(head_ip: str) -> dict[str, str]:
    """The AWS variables every S3 client on the cluster reads (moto accepts any credentials)."""
    return {
        "AWS_ENDPOINT_URL": f"http://{head_ip}:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@dataclass
class ClusterServices:
    """The running services of ``cluster``: the bucket, the tracking server, and how to read them."""

    cluster: NetnsRayCluster
    bucket: str = BUCKET

    @property
    def env(self) -> dict[str, str]:
        return s3_env(self.cluster.head_ip)

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.cluster.head_ip}:{MLFLOW_PORT}"

    def driver_env(self, **extra: str) -> dict[str, str]:
        """A driver's environment in the head's namespace: cluster address, S3, tracking server."""
        return self.cluster.env(**self.env, MLFLOW_TRACKING_URI=self.tracking_uri, **extra)

    def python(self, code: str, *args: str, timeout: float = 120) -> str:
        """Run ``python -c code args`` in the head's namespace; its stdout (AssertionError on failure)."""
        done = self.cluster.run_in_head(
            [sys.executable, "-c", code, *args], timeout=timeout, env=self.driver_env()
        )
        assert done.returncode == 0, f"{code[:200]}...\n{done.stderr[-3000:]}"
        return done.stdout

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``, sorted."""
        return json.loads(self.python(LIST_KEYS, self.bucket, prefix))

    def mlflow(self, expression: str) -> Any:
        """``expression`` evaluated with ``client`` (an `MlflowClient` of the server); its JSON value."""
        code = (
            "import json, sys\nfrom mlflow import MlflowClient\nclient = MlflowClient(sys.argv[1])\n"
            f"print(json.dumps({expression}))"
        )
        return json.loads(self.python(code, self.tracking_uri).strip().splitlines()[-1])


def start_services(cluster: NetnsRayCluster) -> ClusterServices:
    """Start both servers in the head's namespace and wait until they answer; the cluster's stop ends them."""
    moto = moto_server_command()
    if moto is None:
        raise RuntimeError('moto_server is not installed: pip install "moto[server]"')
    services = ClusterServices(cluster)
    logs = cluster.root / "services"
    logs.mkdir(exist_ok=True)
    bare = {k: v for k, v in cluster.env().items() if not k.startswith(("AWS_", "MLFLOW_"))}
    with (logs / "moto.log").open("wb") as log:
        cluster.popen_in_head([moto, "-H", "0.0.0.0", "-p", str(S3_PORT)], env=bare, stdout=log, stderr=log)
    store = f"sqlite:///{logs}/mlflow.db"
    with (logs / "mlflow.log").open("wb") as log:
        cluster.popen_in_head(
            ["mlflow", "server", "--host", "0.0.0.0", "--port", str(MLFLOW_PORT), "--workers", "1",
             "--backend-store-uri", store, "--artifacts-destination", f"s3://{services.bucket}/mlflow"],
            env={**bare, **services.env}, stdout=log, stderr=log,
        )  # fmt: skip
    endpoint = services.env["AWS_ENDPOINT_URL"]
    done = cluster.run_in_head(
        [sys.executable, "-c", WAIT_AND_MAKE_BUCKET, endpoint, services.tracking_uri, services.bucket,
         str(START_TIMEOUT_S)],
        timeout=START_TIMEOUT_S + 30, env={**bare, **services.env},
    )  # fmt: skip
    if done.returncode != 0:
        tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs.glob("*.log"))
        raise RuntimeError(f"the cluster's services did not start: {done.stderr[-1000:]}\n{tails}")
    return services
