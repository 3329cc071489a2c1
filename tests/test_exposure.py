"""What a run exposes: the private Ray instance the driver starts listens on loopback only. (No credential in a
run directory or on the console: tests/test_resume.py checks its two runs for the environment's tokens.)"""

import ipaddress
import json
import subprocess
import sys

import pytest

LISTENERS = """
import json, time
import psutil, ray
from opd.cluster import ray_instance as topology
from opd.presets import tiny_cpu

topology.connect(tiny_cpu())
try:
    ray.get(ray.remote(lambda: 1).remote())  # a worker is up too
    time.sleep(3)  # Ray's agents open their ports in the background
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    found = sorted({(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                    for c in psutil.net_connections(kind="inet") if c.status == "LISTEN" and c.pid in pids})
    print(json.dumps(found))
finally:
    ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or (address.version == 6 and address.ipv4_mapped is not None
                                   and address.ipv4_mapped.is_loopback)


@pytest.mark.slow
def test_private_ray_instance_listens_on_loopback_only(root):
    pytest.importorskip("psutil")
    out = subprocess.run([sys.executable, "-c", LISTENERS], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    listeners = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(listeners) >= 3  # gcs, raylet, agents: the check saw Ray's processes
    exposed = [entry for entry in listeners if not _loopback(entry[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"
