"""Runs one untrusted program against its test inputs, INSIDE the sandbox.

This file is copied into the sandbox's working directory and run by the system
``python3`` (the sandbox user cannot run the project's virtualenv), so it imports the
standard library only and keeps to Python 3.8 syntax. It never sees expected outputs:
the host compares, so a program that tampers with this harness can at worst lose its
own tests.

Input: ``job.json`` and ``solution.py`` in the current directory. job.json holds
``mode`` ("stdin" | "call"), ``fn_name``, ``inputs`` (list: stdin text, or a list of
call arguments), the limits (``timeout_s``, ``cpu_s``, ``memory_bytes``,
``output_bytes``, ``fsize_bytes``, ``nproc``, ``budget_s``) and ``kill_all_on_exit``
(true only inside a private PID namespace).

Output, on stdout, one JSON object per line: ``{"i", "status", "stdout", "result",
"error", "time_s"}`` per test, with status one of ``ok`` (ran to completion; the host
judges the output), ``timeout``, ``runtime_error``, ``memory_limit``, ``output_limit``;
then ``{"done": true}``. A program that does not compile yields one
``{"compile_error": msg}`` line instead of the per-test lines.

Each test runs in a forked child: a new session (so its whole process group can be
killed), rlimits, a fresh empty directory, fds 0/1/2 on pipes, all other fds closed.
"""

import builtins
import json
import os
import resource
import selectors
import signal
import sys
import time

MEMORY_EXIT = 86  # child exit code meaning MemoryError (rlimit AS reached)
ERROR_TAIL_BYTES = 2048  # the end of a traceback names the error; keep only that
CHUNK = 65536
POLL_S = 0.02  # how soon an exit is noticed while a daemon holds the pipes open
DRAIN_CHUNKS = 16  # reads per wake-up, so a flood on stderr cannot pin the harness
PR_SET_DUMPABLE = 4  # prctl: a non-dumpable harness cannot be ptraced or have /proc/pid/fd opened


def make_undumpable():
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except Exception:
        pass


def set_child_limits(job):
    cpu = int(job["cpu_s"])
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"])),
        (resource.RLIMIT_FSIZE, (job["fsize_bytes"], job["fsize_bytes"])),
        (resource.RLIMIT_NPROC, (job["nproc"], job["nproc"])),
        (resource.RLIMIT_NOFILE, (64, 64)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    for which, value in limits:
        try:
            resource.setrlimit(which, value)
        except (ValueError, OSError):
            pass  # a limit above the inherited hard limit: the inherited one still holds


def run_child(job, code, index, stdin_r, out_w, err_w, res_w):
    """In the forked child: never returns."""
    try:
        os.setsid()
        os.dup2(stdin_r, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(res_w, 3)
        os.closerange(4, 1 << 16)
        run_dir = f"run_{index}"
        os.mkdir(run_dir, 0o700)
        os.chdir(run_dir)
        set_child_limits(job)
        sys.argv = ["solution.py"]
        if job["mode"] == "stdin":
            exec(code, {"__name__": "__main__", "__builtins__": builtins})
            sys.stdout.flush()
            os._exit(0)
        namespace = {"__name__": "solution", "__builtins__": builtins}
        exec(code, namespace)
        value = call_function(namespace, job["fn_name"], job["inputs"][index])
        sys.stdout.flush()
        os.write(3, json.dumps(value, default=repr).encode())
        os._exit(0)
    except SystemExit as exc:
        try:
            sys.stdout.flush()
        except Exception:
            pass
        os._exit(0 if exc.code in (None, 0) else 1)
    except MemoryError:
        os._exit(MEMORY_EXIT)
    except BaseException:
        try:
            import traceback  # only on the error path: it costs start-up time

            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(1)


def call_function(namespace, fn_name, args):
    """Calls ``fn_name`` (a top-level function, or a method of LeetCode-style ``Solution``)."""
    if fn_name in namespace and callable(namespace[fn_name]):
        fn = namespace[fn_name]
    elif "Solution" in namespace:
        fn = getattr(namespace["Solution"](), fn_name)
    else:
        raise NameError(f"function {fn_name!r} is not defined")
    return fn(*args)


def pump(pid, job, stdin_data, stdin_w, out_r, err_r, res_r):
    """Feeds stdin and drains the pipes until the child exits (a daemon it left may hold
    the pipes open), the deadline, or the output cap. Returns (verdict or None, the wait
    status or None if still running, stdout, stderr, result bytes)."""
    sel = selectors.DefaultSelector()
    buffers = {out_r: bytearray(), err_r: bytearray(), res_r: bytearray()}
    for fd in buffers:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    os.set_blocking(stdin_w, False)
    if stdin_data:
        sel.register(stdin_w, selectors.EVENT_WRITE)
    deadline = time.monotonic() + job["timeout_s"]
    verdict, status = None, None
    while verdict is None and status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            verdict = "timeout"
            break
        for key, _ in sel.select(min(left, POLL_S)):
            if key.fd == stdin_w:
                stdin_data = feed(stdin_w, stdin_data, sel)
            else:
                verdict = verdict or drain(key.fd, buffers, job, sel, err_r)
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            status = wait_status
            for fd in list(buffers):  # what the child wrote before exiting is still queued
                verdict = verdict or drain(fd, buffers, job, sel, err_r)
    sel.close()
    os.close(stdin_w)
    return verdict, status, buffers[out_r], buffers[err_r], buffers[res_r]


def feed(stdin_w, stdin_data, sel):
    try:
        sent = os.write(stdin_w, stdin_data[:CHUNK])
        stdin_data = stdin_data[sent:]
    except BlockingIOError:
        return stdin_data
    except OSError:  # the program closed stdin or exited: it will not read the rest
        stdin_data = b""
    if not stdin_data:
        sel.unregister(stdin_w)
    return stdin_data


def drain(fd, buffers, job, sel, err_fd):
    """Reads what is queued on ``fd`` (bounded); "output_limit" past the cap."""
    for _ in range(DRAIN_CHUNKS):
        try:
            chunk = os.read(fd, CHUNK)
        except BlockingIOError:
            return None
        if not chunk:
            if fd in sel.get_map():
                sel.unregister(fd)
            return None
        buf = buffers[fd]
        buf += chunk
        if fd == err_fd:
            if len(buf) > 2 * ERROR_TAIL_BYTES:
                del buf[:-ERROR_TAIL_BYTES]  # stderr is not capped, only its tail is kept
        elif len(buf) > job["output_bytes"]:
            return "output_limit"
    return None


def kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def classify(status, pump_verdict, stderr):
    if pump_verdict:
        return pump_verdict, None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return "timeout", f"killed by signal {sig} (CPU limit)"
        return "runtime_error", f"killed by signal {sig}"
    code = os.WEXITSTATUS(status)
    if code == MEMORY_EXIT:
        return "memory_limit", "MemoryError"
    if code != 0:
        tail = stderr[-ERROR_TAIL_BYTES:].decode("utf-8", "replace").strip()
        return "runtime_error", tail or f"exit code {code}"
    return "ok", None


def run_test(job, code, index):
    raw = job["inputs"][index]
    stdin_data = raw.encode() if job["mode"] == "stdin" else b""
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    res_r, res_w = os.pipe()
    start = time.monotonic()
    sys.stdout.flush()  # a buffered line would otherwise be written twice, once by the child
    pid = os.fork()
    if pid == 0:
        run_child(job, code, index, stdin_r, out_w, err_w, res_w)
    for fd in (stdin_r, out_w, err_w, res_w):
        os.close(fd)
    verdict, status, out, err, res = pump(pid, job, stdin_data, stdin_w, out_r, err_r, res_r)
    for fd in (out_r, err_r, res_r):
        os.close(fd)
    kill_group(pid)  # the test's whole session: a timed-out child and any grandchildren
    if status is None:
        status = os.waitpid(pid, 0)[1]
    status_word, error = classify(status, verdict, err)
    return {
        "i": index,
        "status": status_word,
        "stdout": out[: job["output_bytes"]].decode("utf-8", "replace"),
        "result": res.decode("utf-8", "replace") if status_word == "ok" else None,
        "error": error,
        "time_s": round(time.monotonic() - start, 4),
    }


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    make_undumpable()
    with open("job.json") as f:
        job = json.load(f)
    with open("solution.py") as f:
        source = f.read()
    try:
        code = compile(source, "solution.py", "exec")
    except BaseException as exc:  # SyntaxError, or a parser blown by pathological nesting
        emit({"compile_error": f"{type(exc).__name__}: {exc}"})
        emit({"done": True})
        return
    start = time.monotonic()
    for index in range(len(job["inputs"])):
        if time.monotonic() - start >= job["budget_s"]:
            emit({"i": index, "status": "timeout", "error": "time budget of the program spent"})
            continue
        emit(run_test(job, code, index))
    emit({"done": True})
    if job["kill_all_on_exit"]:
        # Inside a private PID namespace this reaches every process the program left
        # behind (daemons included) and nothing outside; init (pid 1) is spared by kill(2).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    main()
