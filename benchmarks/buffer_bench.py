"""Replay buffer benchmark: ingest, sample latency and memory, against a plain baseline.

    python benchmarks/buffer_bench.py [--quick]

Rows measured (each also run through the baseline in the same run):
- the disk's own ceiling: os.write + fsync per batch of the bytes a segment holds, measured
  before and after every ingest figure (this disk's ceiling moves by a quarter or more
  within minutes: a figure is compared only with the ceilings measured beside it). Every
  ceiling and every figure starts its clock right after as many bytes of page cache as it
  will write were freed (a scratch file written and deleted): on these VMs memory left free
  for more than a few seconds is handed back to the host, and writing new data into such
  pages costs 2.5-3.3x as much as into pages freed just before (RESULTS.md, #19). Before,
  the ceiling rewrote its own just-truncated file (always recycled pages) while a ZeroMQ
  figure's service started up for a second or two first;
- ingest trajectories/s, 1k-token rows (256 prompt + 768 response tokens), batches of 256
  (48 batches with --quick, 160 without), ``fsync: batch`` (an ack only after an fsync
  covering the rows): in-process with a single writer, over ZeroMQ loopback (the service is
  its own process) with 8 concurrent writers (group commit shares fsyncs between them) and
  with one writer; each as a fraction of the mean of its two neighbouring ceilings, against
  the targets of issue #19 (0.8, 0.7, 0.5). Every figure is measured 3 times (--quick) or 5
  times, interleaved, and the medians are reported with the range of the fractions and the
  1-minute load average after each figure;
- the single writers again, pipelined: up to ``PIPELINE_WINDOW`` batches in flight
  (``ReplayStore.insert_many``, ``BufferClient.insert_many``), so one batch's work overlaps
  the fsync of the ones before while every ack still follows an fsync that covered its rows;
  their baseline column is the synchronous writer of the same run, and the targets of #19
  apply to them;
- sample latency p50/p99 for a 512-row batch (64 groups of 8) at 100k and 1M stored rows;
- resident memory (RSS) after filling 100k and 1M rows;
- the CPU time of one insert of 256 short rows (``fsync: never``) into an empty buffer and
  into one that holds 1M rows (the first and the last ``INSERT_PROBE`` inserts of the 1M fill):
  what a full buffer adds to every insert (the baseline column is the empty buffer).
Sampling/memory runs use short rows (32 response tokens) so a million rows fill in seconds;
each runs in a fresh process so RSS is not polluted by the other measurements.

Baseline: what a framework without a replay buffer does: a Python list of dicts, persisted
by appending pickle dumps of each batch to a file (fsync per batch), the same policy (FIFO,
complete groups, staleness and reuse checks) implemented with plain Python loops, and pickle
over a ZeroMQ REQ/REP socket for the remote case. (Pickle is fine here: it is the baseline.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from async_rl.config import BufferConfig  # noqa: E402
from buffer.testing import synthetic_batch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GROUPS_PER_BATCH, GROUP_SIZE = 32, 8  # 256 rows per insert
PROMPT_LEN, RESPONSE_LEN = 256, 768  # a "1k-token row"
SMALL_RESPONSE = 32  # rows used to fill 1M-row buffers quickly
SAMPLE_GROUPS = 64  # 512 rows per sample
INSERT_PROBE = 50  # inserts timed at each end of the 1M-row fill
ZMQ_WRITERS = 8
PIPELINE_WINDOW = 4  # batches in flight for a pipelined single writer (Kafka's max.in.flight)
STALENESS_CAP = 4  # the default algorithm.staleness.max_staleness; ingest never samples
# Ingest as a fraction of the disk's write+fsync ceiling in the same run (issue #19).
TARGETS = {"ingest_inproc": 0.8, f"ingest_zmq_{ZMQ_WRITERS}_writers": 0.7, "ingest_zmq_1_writer": 0.5,
           "ingest_inproc_pipelined": 0.8, "ingest_zmq_1_writer_pipelined": 0.5,
           "sample_p50_ms": 2.0, "rss_ratio": 2.0}


def _batches(n: int, *, response_len: int = RESPONSE_LEN, prompt_len: int = PROMPT_LEN, tag: str = "b"):
    return [
        synthetic_batch(groups=[f"{tag}{i}-{k}" for k in range(GROUPS_PER_BATCH)],
                        group_size=GROUP_SIZE, response_len=response_len, prompt_len=prompt_len,
                        seed=i % 16)
        for i in range(n)
    ]


def _as_dicts(batches):
    return [b.to_pylist() for b in batches]


# ------------------------------------------------------------------ ingest


def ingest_inprocess(directory: Path, batches, window: int = 0) -> float:
    """rows/s of one in-process writer: each insert waiting for its fsync, or (``window``) up
    to that many batches in flight under group commit."""
    from buffer.store import ReplayStore

    store = ReplayStore(directory, BufferConfig(fsync="batch"), max_staleness=STALENESS_CAP)
    recycle_page_cache(directory, batches)
    start = time.perf_counter()
    if window:
        store.insert_many(batches, window=window)
    else:
        for batch in batches:
            store.insert(batch)
    elapsed = time.perf_counter() - start
    store.close()
    return sum(b.num_rows for b in batches) / elapsed


def ingest_zmq(directory: Path, batches, writers: int, window: int = 0) -> float:
    """rows/s into a buffer service from ``writers`` concurrent clients (one thread each, each
    waiting for its ack before sending its next batch, as an actor's writer does; or, with
    ``window``, keeping up to that many inserts in flight)."""
    from buffer.client import BufferClient
    from buffer.service import start_service

    handle = start_service(directory, BufferConfig(fsync="batch"), max_staleness=STALENESS_CAP)
    clients = [BufferClient(handle.address) for _ in range(writers)]
    try:
        for client in clients:
            client.ping()  # connected before the clock starts
        shards = [batches[w::writers] for w in range(writers)]
        def write(client, shard):
            if window:
                client.insert_many(shard, window=window)
            else:
                for batch in shard:
                    client.insert(batch)

        threads = [threading.Thread(target=write, args=(c, bs)) for c, bs in zip(clients, shards, strict=True)]
        recycle_page_cache(directory, batches)  # after the service's start-up, right before the clock
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            client.close()
        handle.stop()
    return sum(b.num_rows for b in batches) / elapsed


class PickleBaseline:
    """A list of dicts; each batch is appended to a pickle log and fsynced."""

    def __init__(self, path: Path) -> None:
        self.rows: list[dict] = []
        self.seen: set[str] = set()
        self.log = open(path, "ab")  # noqa: SIM115

    def insert(self, rows: list[dict]) -> int:
        fresh = [r for r in rows if r["traj_id"] not in self.seen]
        pickle.dump(fresh, self.log)
        self.log.flush()
        os.fsync(self.log.fileno())
        self.seen.update(r["traj_id"] for r in fresh)
        self.rows.extend(fresh)
        return len(fresh)

    def sample(self, n_groups: int, learner_version: int, max_staleness: int, max_times: int):
        groups: dict[str, list[dict]] = {}
        for row in self.rows:  # the plain way: scan for complete, fresh, unused groups
            if row["times_sampled"] < max_times and (
                learner_version - min(row["token_versions"]) <= max_staleness
            ):
                groups.setdefault(row["group_id"], []).append(row)
        picked = [g for g in groups.values() if len(g) == g[0]["group_size"]][:n_groups]
        out = [row for group in picked for row in group]
        for row in out:
            row["times_sampled"] += 1
        return out


def baseline_ingest_inprocess(directory: Path, dict_batches) -> float:
    base = PickleBaseline(directory / "baseline.pkl")
    start = time.perf_counter()
    for rows in dict_batches:
        base.insert(rows)
    return sum(len(r) for r in dict_batches) / (time.perf_counter() - start)


def _baseline_server(address_queue, directory: str) -> None:
    import msgpack
    import zmq

    base = PickleBaseline(Path(directory) / "baseline-zmq.pkl")
    socket = zmq.Context.instance().socket(zmq.REP)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    address_queue.put(f"tcp://127.0.0.1:{port}")
    while True:
        message = socket.recv()
        if message == b"stop":
            socket.send(b"ok")
            return
        # The baseline's wire is msgpack: nothing on any wire is pickled, baselines included.
        socket.send(msgpack.packb(base.insert(msgpack.unpackb(message)), default=str))


def baseline_ingest_zmq(directory: Path, dict_batches) -> float:
    import msgpack
    import zmq

    queue = mp.Queue()
    server = mp.Process(target=_baseline_server, args=(queue, str(directory)))
    server.start()
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.connect(queue.get(timeout=60))
    start = time.perf_counter()
    for rows in dict_batches:
        socket.send(msgpack.packb(rows, default=str))
        msgpack.unpackb(socket.recv())
    elapsed = time.perf_counter() - start
    socket.send(b"stop")
    socket.recv()
    socket.close()
    server.join(30)
    return sum(len(r) for r in dict_batches) / elapsed


def segment_messages(batches) -> list:
    """The bytes a segment holds for each batch (checksummed IPC messages): what the ceiling writes."""
    from buffer.segments import encode_batch

    return [encode_batch(batch).message for batch in batches]


def disk_ceiling(directory: Path, batches, payloads: list) -> float:
    """rows/s of writing ``payloads`` (:func:`segment_messages` of ``batches``) with os.write +
    fsync per batch: no validation, no index, no wire."""
    path = directory / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    recycle_page_cache(directory, batches)
    start = time.perf_counter()
    for data in payloads:
        os.write(fd, data)
        os.fsync(fd)
    elapsed = time.perf_counter() - start
    os.close(fd)
    path.unlink()  # its pages are not recycled by the next ceiling, as a figure's are not
    return sum(b.num_rows for b in batches) / elapsed


def recycle_page_cache(directory: Path, batches) -> None:
    """Write and delete a scratch file of the bytes ``batches`` take, so that the measurement
    that follows writes into page cache freed just now, as every ceiling and figure does: on
    these VMs (free page reporting) pages left free for a few seconds go back to the host and
    cost 2.5-3.3x as much to write into, so without this a figure's ratio to the ceiling
    depended on how long its set-up took."""
    block = bytes(1 << 22)
    path = directory / "recycle.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for _ in range(0, sum(b.nbytes for b in batches), len(block)):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()


# ------------------------------------------------------------------ sample + memory


def _sample_run(kind: str, n_rows: int, n_samples: int, directory: str, out) -> None:
    """In a fresh process: fill ``n_rows`` short rows, then time samples and read RSS."""
    n_batches = n_rows // (GROUPS_PER_BATCH * GROUP_SIZE)
    sampler = _fill_store if kind == "buffer" else _fill_baseline
    sample, fill = sampler(Path(directory), n_batches)
    rss_filled = psutil.Process().memory_info().rss
    times = []
    for _ in range(n_samples):
        start = time.perf_counter()
        rows = sample()
        times.append(time.perf_counter() - start)
        assert rows == SAMPLE_GROUPS * GROUP_SIZE, rows
    times_ms = np.array(times) * 1e3
    out.put({"p50_ms": float(np.percentile(times_ms, 50)), "p99_ms": float(np.percentile(times_ms, 99)),
             "rss_mb": rss_filled / 2**20,
             "rss_after_samples_mb": psutil.Process().memory_info().rss / 2**20, **fill})


def _fill_store(directory: Path, n_batches: int):
    from buffer.store import ReplayStore

    cfg = BufferConfig(fsync="never", max_times_sampled=1_000_000,
                       capacity_rows=10_000_000, min_size_to_sample=1)
    store = ReplayStore(directory, cfg, max_staleness=1000)
    cpu_s = []
    for i in range(n_batches):
        batch = _small_batch(i)
        start = time.thread_time()
        store.insert(batch)
        cpu_s.append(time.thread_time() - start)
    probe = min(INSERT_PROBE, n_batches // 2)
    fill = {"insert_cpu_ms_empty": 1e3 * statistics.fmean(cpu_s[:probe]),
            "insert_cpu_ms_full": 1e3 * statistics.fmean(cpu_s[-probe:])}
    return (lambda: store.sample(SAMPLE_GROUPS)[0].num_rows), fill


def _small_batch(i: int):
    return synthetic_batch(groups=[f"s{i}-{k}" for k in range(GROUPS_PER_BATCH)], group_size=GROUP_SIZE,
                           response_len=SMALL_RESPONSE, prompt_len=16, seed=i % 16)


def _fill_baseline(directory: Path, n_batches: int):
    base = PickleBaseline(directory / "baseline.pkl")
    template = _small_batch(0).to_pylist()
    for i in range(n_batches):
        rows = [dict(r, traj_id=f"{i}/{r['traj_id']}", group_id=f"{i}/{r['group_id']}",
                     prompt_tokens=list(r["prompt_tokens"]), response_tokens=list(r["response_tokens"]),
                     behavior_logprobs=list(r["behavior_logprobs"]),
                     token_versions=list(r["token_versions"])) for r in template]
        base.rows.extend(rows)  # the fill is not what is measured here
    return (lambda: len(base.sample(SAMPLE_GROUPS, 0, 1000, 1_000_000))), {}


def sample_and_memory(kind: str, n_rows: int, n_samples: int) -> dict:
    directory = tempfile.mkdtemp(prefix=f"buffer-bench-{kind}-")
    ctx = mp.get_context("spawn")  # a clean process: RSS is this measurement's only
    queue = ctx.Queue()
    proc = ctx.Process(target=_sample_run, args=(kind, n_rows, n_samples, directory, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join(60)
    shutil.rmtree(directory, ignore_errors=True)
    return result


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows; under a minute")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    load_before = os.getloadavg()
    results = {"rows": {}, "quick": args.quick, "targets": TARGETS}
    _ingest_rows(results, n_batches=48 if args.quick else 160, baseline_batches=16 if args.quick else 40,
                 repeats=3 if args.quick else 5)
    for n_rows in (100_000 // scale, 1_000_000 // scale):
        for kind in ("buffer", "baseline"):
            # the baseline scans every row per sample (seconds at 1M rows): fewer repeats
            samples = 200 if kind == "buffer" else (20 if n_rows <= 100_000 // scale else 5)
            results["rows"][f"sample_{kind}_{n_rows}"] = sample_and_memory(kind, n_rows, samples)
    load_after = os.getloadavg()
    results["machine"] = {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "contended": max(load_before[0], load_after[0]) > 0.75 * (os.cpu_count() or 1),
    }
    _report(results, small=100_000 // scale, large=1_000_000 // scale)


# The ingest figures in the order each repetition measures them (each between two ceilings).
INGEST_FIGURES = (
    ("ingest_inproc", ingest_inprocess, ()),
    ("ingest_inproc_pipelined", ingest_inprocess, (PIPELINE_WINDOW,)),
    (f"ingest_zmq_{ZMQ_WRITERS}_writers", ingest_zmq, (ZMQ_WRITERS,)),
    ("ingest_zmq_1_writer", ingest_zmq, (1,)),
    ("ingest_zmq_1_writer_pipelined", ingest_zmq, (1, PIPELINE_WINDOW)),
)


def _ingest_rows(results: dict, n_batches: int, baseline_batches: int, repeats: int) -> None:
    """The ingest figures, ``repeats`` times over: every figure is measured between two
    measurements of the disk's ceiling and taken as a fraction of their mean, and the median
    of those paired fractions is the figure's result (this disk's ceiling moves by a quarter or
    more within minutes, so only a ceiling measured beside a figure is its reference). Then the
    baselines once (their rows are Python dicts: memory, not the disk, limits, so they get
    fewer batches)."""
    batches = _batches(n_batches)
    payloads = segment_messages(batches)  # encoded once for every ceiling
    work = Path(tempfile.mkdtemp(prefix="buffer-bench-"))
    rows = results["rows"]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in INGEST_FIGURES}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in INGEST_FIGURES}
    ceilings: list[float] = []
    load: dict[str, float] = {}
    try:
        rows["row_bytes"] = batches[0].nbytes / batches[0].num_rows
        rows["ingest_batches"], rows["baseline_batches"], rows["ingest_repeats"] = n_batches, baseline_batches, repeats
        ceilings.append(disk_ceiling(work, batches, payloads))
        for repeat in range(repeats):
            for name, fn, extra in INGEST_FIGURES:
                runs[name].append(fn(work / name, batches, *extra))
                shutil.rmtree(work / name)  # every figure starts from an empty buffer and disk
                ceilings.append(disk_ceiling(work, batches, payloads))
                ratios[name].append(runs[name][-1] / statistics.fmean(ceilings[-2:]))
                load[name] = os.getloadavg()[0]  # the machine is shared: what each figure ran beside
            print(f"ingest repetition {repeat + 1}/{repeats}: "
                  + ", ".join(f"{name} {ratios[name][-1]:.2f}" for name in ratios), flush=True)
        dicts = _as_dicts(batches[:baseline_batches])
        rows["ingest_inproc_baseline"] = baseline_ingest_inprocess(work, dicts)
        rows["ingest_zmq_baseline"] = baseline_ingest_zmq(work, dicts)
        rows["disk_ceilings"] = ceilings
        rows["disk_ceiling"] = statistics.median(ceilings)
        rows["ingest_loadavg_1min"] = load
        rows["pipeline_window"] = PIPELINE_WINDOW
        for name in runs:
            rows[name] = statistics.median(runs[name])
            rows[f"{name}_runs"] = runs[name]
            rows[f"{name}_vs_ceiling"] = statistics.median(ratios[name])
            rows[f"{name}_vs_ceiling_runs"] = ratios[name]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(results: dict, small: int, large: int) -> None:
    r = results["rows"]
    sb, bb = r[f"sample_buffer_{small}"], r[f"sample_baseline_{small}"]
    sl, bl = r[f"sample_buffer_{large}"], r[f"sample_baseline_{large}"]
    ceiling = r["disk_ceiling"]
    zmq8 = f"ingest_zmq_{ZMQ_WRITERS}_writers"
    table = [
        ("disk write+fsync ceiling traj/s (median)", ceiling, float("nan"), "reference", True),
        ("ingest traj/s in-process, 1 writer", r["ingest_inproc"], r["ingest_inproc_baseline"],
         _target(r, "ingest_inproc"), True),
        (f"ingest traj/s ZMQ, {ZMQ_WRITERS} writers", r[zmq8], float("nan"), _target(r, zmq8), True),
        ("ingest traj/s ZMQ, 1 writer", r["ingest_zmq_1_writer"], r["ingest_zmq_baseline"],
         _target(r, "ingest_zmq_1_writer"), True),
        # baseline: the synchronous writer above, in this run
        (f"  pipelined ({PIPELINE_WINDOW} in flight) in-process", r["ingest_inproc_pipelined"], r["ingest_inproc"],
         _target(r, "ingest_inproc_pipelined"), True),
        (f"  pipelined ({PIPELINE_WINDOW} in flight) ZMQ, 1 writer", r["ingest_zmq_1_writer_pipelined"],
         r["ingest_zmq_1_writer"], _target(r, "ingest_zmq_1_writer_pipelined"), True),
        (f"sample p50 ms, 512 rows @ {small:,}", sb["p50_ms"], bb["p50_ms"], "<= 2", False),
        (f"sample p99 ms, 512 rows @ {small:,}", sb["p99_ms"], bb["p99_ms"], "", False),
        (f"sample p50 ms, 512 rows @ {large:,}", sl["p50_ms"], bl["p50_ms"], "<= 2", False),
        (f"sample p99 ms, 512 rows @ {large:,}", sl["p99_ms"], bl["p99_ms"], "", False),
        (f"RSS MB @ {small:,} rows", sb["rss_mb"], bb["rss_mb"], "", False),
        (f"RSS MB @ {large:,} rows", sl["rss_mb"], bl["rss_mb"],
         f"<= 2x RSS@{small:,} = {2 * sb['rss_mb']:.0f}", False),
        # baseline: the same insert into the empty buffer
        (f"insert CPU ms, 256 short rows @ {large:,}", sl["insert_cpu_ms_full"], sl["insert_cpu_ms_empty"],
         "baseline: into the empty buffer", None),
    ]
    results["table"] = []
    print(f"\nreplay buffer benchmark{' (quick)' if results['quick'] else ''}; "
          f"row = {r['row_bytes']:.0f} B for ingest; contended={results['machine']['contended']} "
          f"(loadavg {results['machine']['loadavg_before'][0]:.1f}→{results['machine']['loadavg_after'][0]:.1f})")
    print(f"{'measure':44s} {'buffer':>12s} {'baseline':>12s} {'target':>38s}  better")
    for name, ours, base, target, higher_is_better in table:
        # nan baseline or None direction: a reference, not a comparison
        better = None if base != base or higher_is_better is None else ours > base if higher_is_better else ours < base
        results["table"].append({"measure": name, "buffer": ours, "baseline": base,
                                 "target": target, "better_than_baseline": better})
        print(f"{name:44s} {ours:12.2f} {base:12.2f} {target:>38s}  {'-' if better is None else 'yes' if better else 'NO'}")
    print("1-min loadavg after each ingest figure: "
          + ", ".join(f"{name} {value:.1f}" for name, value in r["ingest_loadavg_1min"].items()))
    print(f"ingest rows: medians of {r['ingest_repeats']} repetitions, each figure a fraction of the mean of the "
          "ceilings measured right before and after it (range in brackets); pipelined rows: their baseline column "
          "is the synchronous writer of this run")
    path = RESULTS_DIR / ("buffer_bench_quick.json" if results["quick"] else "buffer_bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


def _target(rows: dict, name: str) -> str:
    """``>= 0.8 ceiling: 0.93 [0.88-0.97] met``: the target, the median paired fraction and its range."""
    fraction, runs = TARGETS[name], rows[f"{name}_vs_ceiling_runs"]
    reached = rows[f"{name}_vs_ceiling"]
    return (f">= {fraction} ceiling: {reached:.2f} [{min(runs):.2f}-{max(runs):.2f}] "
            f"{'met' if reached >= fraction else 'NOT met'}")


if __name__ == "__main__":
    main()
