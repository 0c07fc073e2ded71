"""Weight publishing throughput: learner tensors → verified tensors in subscriber processes.

For each payload (fp32 tensors) it measures, in one run:
  * zmq: WeightPublisher → 1, 2, 4 WeightSubscriber processes streaming over tcp loopback
    (``transport=tcp``, the cross-host path; end-to-end: ``publish()`` called → every
    subscriber's ``on_weights`` has the verified set), plus one subscriber under CURVE;
  * zmq+shm: the same with ``transport=shm``: subscribers map the publisher's /dev/shm
    file and verify every checksum on it (the same-host path); ``zmq+shm+copy`` is one
    subscriber whose callback copies the set into its own preallocated buffer;
  * ray: the same tensors through the Ray object store (``ray.put`` here, ``ray.get`` in
    a worker process);
  * torch.save: ``torch.save`` to /dev/shm then ``torch.load`` (same process);
  * memcpy: a plain copy of the bytes into a preallocated buffer (the ceiling).
Times are medians of ``--repeats`` steady-state publishes. The publisher alternates two
send buffers, so zmq rows first make two warm-up publishes that allocate them (the first
one's first-touch page faults are reported as ``cold_s``); the baselines warm up once.

    python benchmarks/weights_bench.py            # 0.5 GB and 2 GB, 1/2/4 subscribers
    python benchmarks/weights_bench.py --quick    # 64 MB, 1/2 subscribers, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from async_rl.config import WeightsConfig  # noqa: E402
from async_rl.weights import WeightPublisher  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "weights_bench.json"
GB = 1e9
TENSOR_BYTES = 64 << 20  # payloads are cut into 64 MiB fp32 tensors (a large layer's size)
# Memory kept free for the other processes on a shared machine.
MEMORY_MARGIN = 2 << 30
# One per send buffer the publisher alternates between.
WARMUP_PUBLISHES = 2


def make_payload(nbytes: int) -> list[tuple[str, torch.Tensor]]:
    tensors, left, i = [], nbytes, 0
    while left > 0:
        size = min(TENSOR_BYTES, left)
        tensors.append((f"layers.{i}.weight", torch.randn(size // 4)))
        left -= size
        i += 1
    return tensors


def payload_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors)


# --------------------------------------------------------------------------- zmq


def subscriber_main(address: str, cfg_json: str, copy: str = "") -> None:
    """Child: report (version, monotonic time) once each verified set is handed over.

    With ``copy``, the callback first copies the set into buffers it owns (allocated once).
    """
    from async_rl.weights import WeightSubscriber

    owned: list[torch.Tensor] = []

    def on_weights(version, named_tensors):
        if copy:
            if not owned:
                owned.extend(torch.empty_like(t) for _, t in named_tensors)
            for mine, (_, tensor) in zip(owned, named_tensors, strict=True):
                mine.copy_(tensor)
        sys.stdout.write(json.dumps({"version": version, "t": time.monotonic()}) + "\n")
        sys.stdout.flush()

    cfg = WeightsConfig.model_validate_json(cfg_json)
    with WeightSubscriber(address, on_weights, cfg):
        sys.stdin.read()


def _read(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"subscriber {proc.pid} exited with {proc.wait()}")
    return json.loads(line)


def bench_zmq(tensors, n_subs: int, cfg: WeightsConfig, repeats: int, copy: bool = False) -> dict:
    with WeightPublisher(cfg) as publisher:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--subscriber", publisher.address, cfg.model_dump_json(),
                 "copy" if copy else ""],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            for _ in range(n_subs)
        ]
        try:
            deadline = time.monotonic() + 300  # child start-up (imports) is not timed
            while len(publisher.stats()["peers"]) < n_subs and time.monotonic() < deadline:
                time.sleep(0.05)
            times, stalls = [], []
            for version in range(1, repeats + 1 + WARMUP_PUBLISHES):
                start = time.monotonic()
                publisher.publish(version, tensors)
                stalls.append(time.monotonic() - start)
                done = [_read(p) for p in procs]
                assert all(d["version"] == version for d in done), done
                times.append(max(d["t"] for d in done) - start)
        finally:
            for proc in procs:  # started here, stopped here, by handle
                proc.stdin.close()
                proc.wait(timeout=60)
    return {"cold_s": times[0], "seconds": statistics.median(times[WARMUP_PUBLISHES:]),
            "publish_stall_s": statistics.median(stalls[WARMUP_PUBLISHES:])}


# --------------------------------------------------------------------------- baselines


def bench_memcpy(tensors, repeats: int) -> dict:
    flat = torch.empty(payload_bytes(tensors), dtype=torch.uint8)
    times = []
    for _ in range(repeats + 1):
        start, offset = time.monotonic(), 0
        for _, tensor in tensors:
            n = tensor.numel() * tensor.element_size()
            flat[offset : offset + n].view(tensor.dtype).copy_(tensor.view(-1))
            offset += n
        times.append(time.monotonic() - start)
    return {"cold_s": times[0], "seconds": statistics.median(times[1:])}


def bench_torch_save(tensors, repeats: int) -> dict:
    times = []
    state = dict(tensors)
    for _ in range(repeats + 1):
        with tempfile.NamedTemporaryFile(dir="/dev/shm", suffix=".pt") as f:
            start = time.monotonic()
            torch.save(state, f.name)
            loaded = torch.load(f.name)
            times.append(time.monotonic() - start)
            del loaded
    return {"cold_s": times[0], "seconds": statistics.median(times[1:])}


def bench_ray(tensors, repeats: int) -> dict:
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=int(payload_bytes(tensors) * 2.5) + (256 << 20),
             include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        def fetch(refs):
            got = ray.get(refs[0])
            return time.monotonic(), sum(t.numel() for t in got.values())

        numel = sum(t.numel() for _, t in tensors)
        times = []
        for _ in range(repeats + 1):
            start = time.monotonic()
            ref = ray.put(dict(tensors))
            done, count = ray.get(fetch.remote([ref]))
            assert count == numel
            times.append(done - start)
            del ref
    finally:
        ray.shutdown()
    return {"cold_s": times[0], "seconds": statistics.median(times[1:])}


# --------------------------------------------------------------------------- driver


def fits(nbytes: int, copies: float, shm_copies: float = 0) -> bool:
    """Room for ``copies`` of the payload in memory and ``shm_copies`` in /dev/shm."""
    if psutil.virtual_memory().available < nbytes * copies + MEMORY_MARGIN:
        return False
    if shm_copies:
        shm = os.statvfs("/dev/shm")
        return shm.f_bavail * shm.f_frsize >= nbytes * shm_copies + MEMORY_MARGIN
    return True


def run(sizes, subs, repeats, chunk_bytes, with_ray, curve_dir) -> list[dict]:
    rows = []
    cfg = WeightsConfig(chunk_bytes=chunk_bytes, credit_chunks=32, transport="tcp")
    shm_cfg = cfg.model_copy(update={"transport": "shm"})
    for size in sizes:
        tensors = make_payload(size)

        def add(method, subscribers, result, size=size):
            row = {"size_gb": size / GB, "method": method, "subscribers": subscribers, **result}
            if "seconds" in result:
                row["gb_per_s"] = size / GB / result["seconds"]
            rows.append(row)
            print(f"  {row}", flush=True)

        add("memcpy", 0, bench_memcpy(tensors, repeats))
        for n in subs:
            # tensors + up to 3 send buffers here, one receive buffer per subscriber
            if fits(size, 4 + n):
                add("zmq", n, bench_zmq(tensors, n, cfg, repeats))
            else:
                add("zmq", n, {"skipped": "not enough free memory on this shared machine"})
        for n in subs:
            # tensors + two /dev/shm files (at most two named, plus one a slow reader may hold)
            if fits(size, 4, shm_copies=3):
                add("zmq+shm", n, bench_zmq(tensors, n, shm_cfg, repeats))
            else:
                add("zmq+shm", n, {"skipped": "not enough free memory or /dev/shm space"})
        if fits(size, 5, shm_copies=3):
            add("zmq+shm+copy", 1, bench_zmq(tensors, 1, shm_cfg, repeats, copy=True))
        if curve_dir is not None and fits(size, 5):
            add("zmq+curve", 1, bench_zmq(tensors, 1, cfg.model_copy(update={"curve_keys_dir": curve_dir}), repeats))
        add("torch.save", 1, bench_torch_save(tensors, repeats) if fits(size, 3) else {"skipped": "memory"})
        if with_ray:
            add("ray", 1, bench_ray(tensors, repeats) if fits(size, 5) else {"skipped": "memory"})
        del tensors
    return rows


def table(rows) -> str:
    lines = [f"{'GB':>5} {'method':<13} {'subs':>4} {'seconds':>8} {'GB/s':>6} {'cold_s':>7} {'stall_s':>8}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['size_gb']:>5.2f} {r['method']:<13} {r['subscribers']:>4}  skipped: {r['skipped']}")
            continue
        stall = f"{r['publish_stall_s']:.3f}" if "publish_stall_s" in r else "-"
        lines.append(
            f"{r['size_gb']:>5.2f} {r['method']:<13} {r['subscribers']:>4} {r['seconds']:>8.3f} "
            f"{r['gb_per_s']:>6.2f} {r['cold_s']:>7.3f} {stall:>8}"
        )
    return "\n".join(lines)


def targets(rows) -> dict:
    """The issue's targets, read off the measured rows (None where a row is missing)."""
    def get(size, method, subs):
        for r in rows:
            if abs(r["size_gb"] - size) < 1e-9 and r["method"] == method and r["subscribers"] == subs and "seconds" in r:
                return r
        return None

    out = {}
    for size in sorted({r["size_gb"] for r in rows}):
        ceiling, ray, save = get(size, "memcpy", 0), get(size, "ray", 1), get(size, "torch.save", 1)
        for method in ("zmq", "zmq+shm"):
            one, four = get(size, method, 1), get(size, method, 4)
            out[f"{size:g}GB {method}"] = {
                "one_sub_share_of_memcpy": one and ceiling and one["gb_per_s"] / ceiling["gb_per_s"],
                "faster_than_ray": one and ray and one["seconds"] < ray["seconds"],
                "faster_than_torch_save": one and save and one["seconds"] < save["seconds"],
                "seconds_per_gb_one_sub": one and one["seconds"] / size,
                "four_subs_over_one": one and four and four["seconds"] / one["seconds"],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MB, 1 and 2 subscribers, no Ray")
    parser.add_argument("--sizes-gb", type=float, nargs="+", help="payload sizes (default 0.5 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--subscriber", nargs=3, metavar=("ADDRESS", "CFG_JSON", "COPY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber:
        subscriber_main(*args.subscriber)
        return
    sizes = [64 << 20] if args.quick else [int(gb * GB) for gb in (args.sizes_gb or [0.5, 2])]
    subs = [1, 2] if args.quick else [1, 2, 4]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as keys:
        from async_rl.weights.keys import generate_keys

        generate_keys(keys)
        rows = run(sizes, subs, args.repeats, args.chunk_bytes, not (args.quick or args.no_ray), keys)
    load_after = os.getloadavg()
    contended = max(load_before[0], load_after[0]) > os.cpu_count() * 0.5
    print(table(rows))
    result = {
        "rows": rows, "targets": targets(rows), "quick": args.quick, "chunk_bytes": args.chunk_bytes,
        "transport": "zmq: tcp loopback; zmq+shm: same-host /dev/shm mapping", "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "under_contention": contended, "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result["targets"], indent=1))
    if contended:
        print(f"note: measured under contention (load average {load_before[0]:.1f}/{load_after[0]:.1f} "
              f"on {os.cpu_count()} CPUs)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
