"""A local job's private Ray listens on loopback only (Ray 2.60 otherwise binds every interface)."""

import ipaddress

import psutil

from async_rl.config import ClusterConfig
from async_rl.job import placement


def listening_addresses(root_pid: int) -> set[str]:
    procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    pids = {p.pid for p in procs}
    return {
        conn.laddr.ip
        for conn in psutil.net_connections("inet")
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids
    }


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_private_ray_binds_only_loopback():
    import os

    ray = placement.init_ray(ClusterConfig(), num_cpus=2)
    try:
        addresses = listening_addresses(os.getpid())
        assert addresses, "Ray started no listening sockets under this process"
        assert {ip for ip in addresses if not is_loopback(ip)} == set()
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        ray.shutdown()
