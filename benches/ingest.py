#!/usr/bin/env python3
"""Ingest benchmark: pacs-gateway against DCMTK storescp and Orthanc.

What is measured
    One DCMTK `storescu` sender (TCP_NODELAY=1, calling AE BENCHSCU, called AE
    COUNTYPACS) pushes the whole synthetic corpus (`sample-dicom --seed 1
    --profile bench`, about 2,500 explicit VR LE instances, 850 MB) to each
    server, over 1 association (one storescu process with every file) and over
    4 parallel associations (one storescu process each, whole studies dealt
    out so that each carries about a quarter of the bytes; see
    split_by_study). For every run:
      - wall time of the send (spawn of the first storescu to exit of the
        last), giving instances/s and MB/s (MB = 10^6 bytes of files sent);
      - server CPU seconds over the send (see "CPU accounting"), reported per
        1,000 instances;
      - peak RSS: VmHWM of the server process; for storescp --fork the largest
        VmHWM of the listener and of its per-association children (sampled
        every 0.1 s while they live; VmHWM only grows, so the last sample
        is at most 0.1 s stale);
      - noise indicators: "other CPU", the machine-wide busy CPU (/proc/stat)
        used by neither the server, storescu nor this script, as a share of
        both cores (kernel threads working for the run, such as jbd2 and
        writeback, and anybody else); in the progress lines and the JSON
        also the outside processes that used >= 0.2 s of CPU, bytes written
        to the disk device, and steal time;
      - that every instance arrived: gateway `select count(*) from instances`
        in DATA/index.sqlite, Orthanc `/statistics` CountInstances over
        loopback HTTP, storescp the number of files written. A shortfall, a
        non-zero storescu exit or a server dying aborts the benchmark.

Servers
    gateway   target/release/pacs-gateway, fresh data dir; fsync + SQLite index
              before every success status.
    storescp  /usr/bin/storescp --fork +xa, plain files, no fsync (an upper
              bound on what the disk and the DICOM stack allow, not a PACS).
    storescp-sync  the same storescp with an LD_PRELOAD shim
              (benches/fsync_on_close.c) that fdatasyncs each received file
              and fsyncs its directory before storescp acknowledges it: what
              durability alone costs, with no hashing and no index. No target;
              it shows how far "0.8x plain storescp" is from any server whose
              success status means "on disk".
    orthanc   /usr/sbin/Orthanc (Debian 1.10.1), fresh storage and SQLite index,
              shipped defaults (SyncStorageArea=true, MaximumPduLength=16384).
    Only files storescu can send as they are (uncompressed or deflated
    transfer syntaxes) are used; the bench profile is all explicit VR LE, the
    small profile loses its JPEG/RLE files (storescu has no codecs for them).
    storescp and Orthanc bind every interface; both run with an LD_PRELOAD shim
    (benches/bind_loopback.c, compiled into target/bench/) that turns a
    wildcard bind() into a loopback bind, and the script checks that each
    server listens on loopback only. Every server and sender runs with
    TCP_NODELAY=1 (DCMTK otherwise waits ~40 ms per C-STORE on delayed ACKs).
    Peers keep their default max PDU (16 KiB); the gateway announces its own
    configured value (256 KiB by default).

CPU accounting
    From /proc/PID/stat, in clock ticks (10 ms): utime+stime+cutime+cstime of
    the server process plus utime+stime+cutime+cstime of each child still
    present (running or zombie), read before the send and again after the
    last storescu has exited, the children have finished and a 1 s settle
    (so work deferred just past the last acknowledgement counts). A child
    reaped by the listener moves into its cutime/cstime; the read is retried
    until the listener's cutime is stable, so no child is counted twice or
    lost. Only storescp --fork has children; the gateway and Orthanc are one
    multi-threaded process each (threads are included in utime/stime). The
    JSON also holds the kernel (system) part, and the CPU from the same
    baseline to server exit (wait4 rusage), which adds shutdown work.

Method and caveats
    - The machine has 2 cores shared with other work; sender and server
      compete for them. Runs are repeated (--rounds, default 3), the server
      order rotates every round and the parallelism order alternates, and the
      table shows medians (with the min-max of instances/s). Load average
      before each run, and the noise indicators above, are in the JSON.
      Compare against peers of the same run only; rerun when a progress line
      shows someone else busy (another engineer's build or tests fsync on the
      same disk too). Even on an otherwise idle machine, server CPU for the
      same work varied by up to +-30% between runs here (VM host effects,
      no steal time reported), so prefer --rounds 5 or more for decisions.
    - Every run gets a fresh server process and a fresh data dir under
      target/bench-tmp (on the same disk as target/, never /tmp, which may be
      tmpfs). After a run the server is stopped and sync() called, so no
      writeback of one run spills into the next. Run data is deleted only
      at the end (or, oldest first, when the disk gets short of space):
      ext4's inode allocator skips inodes freed in the last minutes one by
      one (recently_deleted() in the kernel's ialloc.c), so creating ~2,500
      files right after deleting the previous run's ~2,500 costs whichever
      server runs next up to twice the kernel time (seen here as a bimodal
      729 vs 1,277 instances/s for the same gateway binary). Deleting in the
      middle of the benchmark would measure the previous run, not this one.
    - Before every run the page cache is emptied (as root: drop_caches) and
      the corpus read back in, so every run starts with the same free memory
      and sends from a warm cache. Left full, the cache of earlier runs'
      files made later runs pay for reclaim: server CPU for the same binary
      flipped between 2.0-2.5 and 3.7-4.1 CPU-s with the cache's state. The
      JSON records whether each run had its caches dropped. One untimed
      warm-up run per server precedes round 1 (--no-warmup skips it): without
      it, round 1 came out faster than later rounds for every server here.
    - The corpus is cached in target/bench-corpus[-small]; delete it to
      regenerate after changing sample-dicom.

Usage
    python3 benches/ingest.py [--rounds N] [--corpus-profile bench|small]
                              [--servers gateway,storescp,orthanc] [--no-warmup]
    (`make bench` installs Orthanc, builds the release binaries and runs this.)
    Output: a table on stdout and target/bench-results/ingest-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "target"
RELEASE = TARGET / "release"
GATEWAY_BIN = RELEASE / "pacs-gateway"
SAMPLE_DICOM_BIN = RELEASE / "sample-dicom"
SHIM_SRC = ROOT / "benches" / "bind_loopback.c"
SHIM_LIB = TARGET / "bench" / "libbind_loopback.so"
DURABLE_SHIM_SRC = ROOT / "benches" / "fsync_on_close.c"
DURABLE_SHIM_LIB = TARGET / "bench" / "libfsync_on_close.so"
WORK_ROOT = TARGET / "bench-tmp"
RESULTS_DIR = TARGET / "bench-results"

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"

CALLED_AE = "COUNTYPACS"
CALLING_AE = "BENCHSCU"
PARALLELISMS = (1, 4)
ALL_SERVERS = ("gateway", "storescp", "storescp-sync", "orthanc")
CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTUP_TIMEOUT_S = 60
SETTLE_S = 1.0

# (parallelism, peer) -> minimum ratio of gateway instances/s to the peer's.
TARGETS = {(4, "orthanc"): 2.0, (4, "storescp"): 0.8, (1, "orthanc"): 1.5}


class BenchError(RuntimeError):
    """A run went wrong; the benchmark stops with this message."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------
# Corpus


@dataclass
class Corpus:
    root: Path
    files: list[str]  # paths relative to root, sorted
    total_bytes: int


def ensure_corpus(profile: str) -> Corpus:
    """Generates the corpus once (atomically, via a temp dir) and lists it."""
    root = TARGET / ("bench-corpus" if profile == "bench" else f"bench-corpus-{profile}")
    stamp = root / ".complete"
    if not stamp.exists():
        if not SAMPLE_DICOM_BIN.exists():
            raise BenchError(f"{SAMPLE_DICOM_BIN} missing: run `cargo build --release --bins`")
        log(f"generating the {profile} corpus into {root} ...")
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [str(SAMPLE_DICOM_BIN), "--out", str(partial), "--seed", "1", "--profile", profile]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        (partial / ".complete").write_text(" ".join(cmd[1:]) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
    files, skipped = [], []
    for path in sorted(root.rglob("*.dcm")):
        rel = str(path.relative_to(root))
        (files if transfer_syntax_of(path) in UNCOMPRESSED else skipped).append(rel)
    if skipped:
        log(f"skipping {len(skipped)} encapsulated (JPEG/RLE) files storescu cannot send as-is: "
            + ", ".join(skipped))
    if not files:
        raise BenchError(f"no sendable .dcm files in {root}")
    total = sum((root / f).stat().st_size for f in files)
    return Corpus(root, files, total)


# Transfer syntaxes storescu converts between without codecs (deflate included).
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                "1.2.840.10008.1.2.1.99"}
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def transfer_syntax_of(path: Path) -> str | None:
    """(0002,0010) from the Part 10 file meta information, or None."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group = int.from_bytes(head[pos : pos + 2], "little")
        elem = int.from_bytes(head[pos + 2 : pos + 4], "little")
        if group != 2:
            return None
        vr = head[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            length, pos = int.from_bytes(head[pos + 8 : pos + 12], "little"), pos + 12
        else:
            length, pos = int.from_bytes(head[pos + 6 : pos + 8], "little"), pos + 8
        if elem == 0x0010:
            return head[pos : pos + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += length
    return None


def warm_page_cache(corpus: Corpus) -> None:
    """Reads every file once so that no run pays for a cold corpus."""
    for rel in corpus.files:
        with open(corpus.root / rel, "rb") as f:
            while f.read(1 << 20):
                pass


DROPPED_CACHES: list[bool] = []  # one entry per run (warm-ups included): were caches dropped before it?


@functools.cache
def tool_files() -> list[Path]:
    """The programs of a run, their shared libraries, and DCMTK's dictionary."""
    programs = [Path(p) for p in (STORESCU, STORESCP, ORTHANC, GATEWAY_BIN, RELEASE / "consortium-upload")]
    files = [p for p in programs if p.exists()]
    for program in list(files):
        out = subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout
        files += [Path(w) for line in out.splitlines() for w in line.split() if w.startswith("/")]
    files += sorted(Path("/usr/share").glob("libdcmtk*/dicom.dic"))
    return sorted(set(files))


def fresh_page_cache(corpus: Corpus) -> None:
    """Gives every run the same memory: the page cache emptied (when this
    script may: root), then only the corpus and the programs read back in.

    Without this, each run's ~850 MB of new files stays cached, and once the
    cache fills memory (after a dozen runs in 24 GiB), every later run also
    pays the kernel for reclaiming pages: the same gateway binary used 2.0-2.5
    CPU-s for the corpus in runs after a drop and 3.7-4.1 CPU-s in runs with a
    full cache, alternating with the cache's state rather than the code."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        DROPPED_CACHES.append(True)
    except OSError as e:
        if not DROPPED_CACHES or DROPPED_CACHES[-1]:
            log(f"warning: cannot drop the page cache ({e}); runs after the cache fills are slower")
        DROPPED_CACHES.append(False)
    warm_page_cache(corpus)
    # Dropping also evicted the programs: a client must not start cold
    # inside the timed window (and each client loads different files).
    for path in tool_files():
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def split_by_study(corpus: Corpus, parts: int) -> list[list[str]]:
    """Deals whole studies (folders) to `parts` senders, largest first, each to
    the sender with the fewest bytes so far: every association carries about
    the same bytes, and a study travels over one association as it would from
    a modality. (Cutting the sorted list into equal counts would give 4x more
    bytes to two of the four associations: MR and CT instances differ in size.)"""
    studies: dict[str, list[str]] = {}
    for rel in corpus.files:
        studies.setdefault(str(Path(rel).parent), []).append(rel)
    size = {k: sum((corpus.root / f).stat().st_size for f in v) for k, v in studies.items()}
    loads = [[0, i, []] for i in range(parts)]
    for study in sorted(studies, key=lambda k: (-size[k], k)):
        lightest = min(loads)
        lightest[0] += size[study]
        lightest[2].append(study)
    return [sorted(f for st in studies_ for f in studies[st]) for _, _, studies_ in loads if studies_]


# --------------------------------------------------------------------------
# /proc helpers


@dataclass
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    utime: int
    stime: int
    cutime: int  # reaped descendants
    cstime: int

    @property
    def ticks_self(self) -> int:
        return self.utime + self.stime

    @property
    def ticks_children(self) -> int:
        return self.cutime + self.cstime


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    close = raw.rindex(")")
    fields = raw[close + 2 :].split()  # fields[0] is field 3 (state)
    return ProcStat(
        pid=pid,
        comm=raw[raw.index("(") + 1 : close],
        state=fields[0],
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def all_processes() -> list[ProcStat]:
    procs = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := read_stat(int(entry.name))):
            procs.append(st)
    return procs


def children_of(pid: int) -> list[ProcStat]:
    return [p for p in all_processes() if p.ppid == pid]


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size; None once the process is gone or a zombie."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def tree_cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) CPU ticks of `pid`, its reaped and its unreaped children."""
    for _ in range(20):
        before = read_stat(pid)
        if before is None:
            raise BenchError(f"server process {pid} is gone")
        kids = children_of(pid)
        after = read_stat(pid)
        if after and after.ticks_children == before.ticks_children:
            user = after.utime + after.cutime + sum(k.utime + k.cutime for k in kids)
            system = after.stime + after.cstime + sum(k.stime + k.cstime for k in kids)
            return user, system
        time.sleep(0.01)
    raise BenchError(f"CPU accounting of {pid} did not settle")


def wait_children_done(pid: int, timeout: float = 10.0) -> None:
    """Waits until every child of `pid` has exited (zombie or reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(k.state in "ZX" for k in children_of(pid)):
            return
        time.sleep(0.05)
    log(f"warning: children of {pid} still running after {timeout:.0f} s")


class RunSampler(threading.Thread):
    """Samples /proc every 0.1 s during a run: the largest VmHWM among the
    server's children (forking storescp), and the CPU used by every process
    outside the benchmark, to name whoever else competed for the cores."""

    def __init__(self, server_pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.server_pid, self.interval = server_pid, interval
        self.max_child_kib = 0
        self._others: dict[int, list] = {}  # pid -> [comm, first ticks, last ticks]
        self._done = threading.Event()

    def run(self) -> None:
        ours = {os.getpid(), self.server_pid}
        first = True
        while not self._done.is_set():
            for p in all_processes():
                if p.ppid == self.server_pid:
                    self.max_child_kib = max(self.max_child_kib, vm_hwm_kib(p.pid) or 0)
                elif p.pid not in ours and p.ppid not in ours:
                    ticks = p.ticks_self  # not cutime: reaped children show up themselves
                    entry = self._others.setdefault(p.pid, [p.comm, ticks if first else 0, ticks])
                    entry[2] = ticks
            first = False
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()

    def busy_others(self, min_cpu_s: float = 0.2, top: int = 6) -> list[str]:
        """'comm[pid] N.Ns' for other processes that used at least min_cpu_s."""
        used = [((last - first) / CLK_TCK, comm, pid) for pid, (comm, first, last) in self._others.items()]
        used = sorted((u for u in used if u[0] >= min_cpu_s), reverse=True)[:top]
        return [f"{comm}[{pid}] {cpu:.1f}s" for cpu, comm, pid in used]


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket of `pid` in LISTEN state."""
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(fd.path)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except FileNotFoundError:
        return set()
    found = set()
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


def wait_listening(proc: subprocess.Popen, ports: list[int], logfile: Path) -> None:
    """Waits until the process listens on every port, and only on loopback."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} at startup:\n{tail(logfile)}")
        socks = listening_sockets(proc.pid)
        if all(any(port == p for _, p in socks) for port in ports):
            exposed = [s for s in socks if not ipaddress.ip_address(s[0]).is_loopback]
            if exposed:
                raise BenchError(f"server listens beyond loopback: {sorted(exposed)}")
            return
        time.sleep(0.05)
    raise BenchError(f"server did not listen on {ports} within {STARTUP_TIMEOUT_S} s:\n{tail(logfile)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SystemSnapshot:
    """Machine-wide counters, to tell how much else ran during a run."""
    at: float  # time.monotonic()
    busy_ticks: int  # user+nice+system+irq+softirq of all CPUs
    steal_ticks: int
    sectors_written: int  # device holding target/
    own_cpu_s: float  # this script (the /proc sampler thread)

    @staticmethod
    def take() -> "SystemSnapshot":
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = cpu
        t = os.times()
        return SystemSnapshot(time.monotonic(), user + nice + system + irq + softirq, steal,
                              sectors_written(), t.user + t.system)


def sectors_written() -> int:
    dev = os.stat(TARGET).st_dev
    major, minor = os.major(dev), os.minor(dev)
    for line in Path("/proc/diskstats").read_text().splitlines():
        cols = line.split()
        if int(cols[0]) == major and int(cols[1]) == minor:
            return int(cols[9])
    return 0


def build_shim() -> Path:
    """Compiles the LD_PRELOAD shims when missing or older than their
    source; returns the loopback bind() one (see DurableStoreScp for the other)."""
    for src, lib in ((SHIM_SRC, SHIM_LIB), (DURABLE_SHIM_SRC, DURABLE_SHIM_LIB)):
        if not lib.exists() or lib.stat().st_mtime < src.stat().st_mtime:
            lib.parent.mkdir(parents=True, exist_ok=True)
            cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(lib), str(src), "-ldl"]
            subprocess.run(cmd, check=True)
    return SHIM_LIB


def base_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# --------------------------------------------------------------------------
# Servers: start in a fresh work dir, count what arrived, stop by PID.


class Server:
    name = ""
    forks = False  # spawns a child per association

    def __init__(self, workdir: Path, shim: Path):
        self.workdir, self.shim = workdir, shim
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.logfile = workdir / f"{self.name}.log"
        self.exit_rusage = None

    def start(self) -> None:
        raise NotImplementedError

    def count_received(self) -> int:
        raise NotImplementedError

    def _spawn(self, cmd: list[str], env: dict[str, str], stdout=subprocess.DEVNULL) -> None:
        with open(self.logfile, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=err, cwd=self.workdir)

    def preload_env(self) -> dict[str, str]:
        return {**base_env(), "LD_PRELOAD": str(self.shim)}

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 60 s); keeps the wait4 rusage."""
        if not self.proc or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.exit_rusage = rusage
                return
            time.sleep(0.05)
        log(f"warning: {self.name} ignored SIGTERM for 60 s; killing it")
        self.proc.kill()
        _, status, self.exit_rusage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} died (exit {self.proc.returncode}):\n{tail(self.logfile)}")


class Gateway(Server):
    name = "gateway"

    def start(self) -> None:
        data = self.workdir / "data"
        config = self.workdir / "gateway.toml"
        config.write_text(
            f"""[gateway]
ae_title = "{CALLED_AE}"
listen = "127.0.0.1:0"
max_associations = 200
max_associations_per_clinic = 50

[storage]
data_dir = "{data}"

[[clinics]]
id = "bench"
name = "Bench clinic"
ae_titles = ["{CALLING_AE}"]
"""
        )
        out = self.workdir / "gateway.out"
        with open(out, "wb") as stdout:
            self._spawn([str(GATEWAY_BIN), "--config", str(config)], base_env(), stdout=stdout)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            line = out.read_text().strip()
            if line.startswith("listening on "):
                host, _, port = line.removeprefix("listening on ").rpartition(":")
                if not ipaddress.ip_address(host.strip("[]")).is_loopback:
                    raise BenchError(f"gateway listens on {host}, expected loopback")
                self.port = int(port)
                return
            time.sleep(0.05)
        raise BenchError(f"gateway did not print its address:\n{tail(self.logfile)}")

    def count_received(self) -> int:
        db = self.workdir / "data" / "index.sqlite"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("select count(*) from instances").fetchone()[0]
        finally:
            conn.close()


class StoreScp(Server):
    name = "storescp"
    forks = True

    def start(self) -> None:
        self.out = self.workdir / "received"
        self.out.mkdir()
        self.port = free_port()
        cmd = [STORESCP, "--fork", "+xa", "-aet", CALLED_AE, "-od", str(self.out), str(self.port)]
        self._spawn(cmd, self.preload_env())
        wait_listening(self.proc, [self.port], self.logfile)

    def count_received(self) -> int:
        return sum(1 for p in self.out.rglob("*") if p.is_file())


class Orthanc(Server):
    name = "orthanc"

    def start(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": CALLED_AE,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "LuaScripts": [],
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self._spawn([ORTHANC, str(path)], self.preload_env())
        wait_listening(self.proc, [self.port, self.http_port], self.logfile)

    def count_received(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(url, timeout=30) as resp:
            return int(json.load(resp)["CountInstances"])


class DurableStoreScp(StoreScp):
    """storescp that fsyncs each received file and its directory before it
    acknowledges (benches/fsync_on_close.c): the cost of durability alone."""
    name = "storescp-sync"

    def preload_env(self) -> dict[str, str]:
        return {**base_env(), "LD_PRELOAD": f"{self.shim}:{DURABLE_SHIM_LIB}"}


SERVERS = {cls.name: cls for cls in (Gateway, StoreScp, DurableStoreScp, Orthanc)}


def orthancs() -> list[int]:
    return [p.pid for p in all_processes() if p.comm == "Orthanc"]


def ensure_no_system_orthanc() -> None:
    """The Debian package starts a service; it must not compete for the CPUs."""
    if orthancs() and shutil.which("service"):
        subprocess.run(["service", "orthanc", "stop"], capture_output=True)
        time.sleep(1)
    if pids := orthancs():
        raise BenchError(f"an Orthanc is already running (pids {pids}); stop it: service orthanc stop")


def check_tools(servers: list[str]) -> None:
    binary = {"gateway": str(GATEWAY_BIN), "storescp": STORESCP, "storescp-sync": STORESCP, "orthanc": ORTHANC}
    needed = [STORESCU] + [binary[s] for s in servers]
    missing = [t for t in needed if not os.access(t, os.X_OK)]
    if missing:
        raise BenchError(f"missing: {missing}; run `make bench` (install-deps --bench, release build)")


# --------------------------------------------------------------------------
# Sending and one measured run


@dataclass
class SendResult:
    wall_s: float
    client_cpu_s: float
    exit_codes: list[int]


def send(corpus: Corpus, port: int, parallelism: int, logdir: Path) -> SendResult:
    """Runs `parallelism` concurrent storescu processes over the split corpus."""
    env = base_env()
    parts = split_by_study(corpus, parallelism)
    procs = []
    start = time.perf_counter()
    for i, part in enumerate(parts):
        cmd = [STORESCU, "-aet", CALLING_AE, "-aec", CALLED_AE, "127.0.0.1", str(port), *part]
        with open(logdir / f"storescu-{i}.log", "wb") as out:
            procs.append(subprocess.Popen(cmd, cwd=corpus.root, env=env, stdout=out,
                                          stderr=subprocess.STDOUT))
    codes, cpu = [], 0.0
    for p in procs:
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        codes.append(p.returncode)
        cpu += ru.ru_utime + ru.ru_stime
    return SendResult(time.perf_counter() - start, cpu, codes)


@dataclass
class RunResult:
    server: str
    parallelism: int
    round: int
    instances: int
    bytes: int
    wall_s: float
    instances_per_s: float
    mb_per_s: float
    server_cpu_s: float  # user + system
    cpu_s_per_1k: float
    peak_rss_mb: float
    rss_note: str
    server_cpu_to_exit_s: float | None
    client_cpu_s: float
    loadavg_before: list[float] = field(default_factory=list)
    # Machine-wide busy CPU over the run minus server and storescu CPU: other
    # processes, plus kernel threads working for the run (jbd2, writeback).
    server_sys_cpu_s: float = 0.0  # the system (kernel) part of server_cpu_s
    other_cpu_s: float = 0.0
    other_cpu_pct: float = 0.0  # other_cpu_s as a share of all cores over the window
    steal_cpu_s: float = 0.0
    disk_written_mb: float = 0.0  # whole device, during the run
    other_processes: list[str] = field(default_factory=list)  # CPU >= 0.2 s during the run


def run_once(name: str, corpus: Corpus, parallelism: int, rnd: int, shim: Path) -> RunResult:
    fresh_page_cache(corpus)
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-p{parallelism}-", dir=WORK_ROOT))
    server = SERVERS[name](workdir, shim)
    sampler = None
    try:
        server.start()
        loadavg = [round(x, 2) for x in os.getloadavg()]
        sampler = RunSampler(server.proc.pid)
        sampler.start()
        sys0 = SystemSnapshot.take()
        ticks0 = tree_cpu_ticks(server.proc.pid)
        result = send(corpus, server.port, parallelism, workdir)
        wait_children_done(server.proc.pid)
        time.sleep(SETTLE_S)
        server.check_alive()
        ticks1 = tree_cpu_ticks(server.proc.pid)
        sys1 = SystemSnapshot.take()
        sampler.stop()
        own_kib = vm_hwm_kib(server.proc.pid) or 0
        received = server.count_received()
        server.stop()
        check_delivery(name, corpus, received, result, workdir)
        run = make_result(name, parallelism, rnd, corpus, result, sum(ticks1) - sum(ticks0), sum(ticks0),
                          own_kib, sampler.max_child_kib, server, loadavg)
        run.server_sys_cpu_s = round((ticks1[1] - ticks0[1]) / CLK_TCK, 2)
        busy_s = (sys1.busy_ticks - sys0.busy_ticks) / CLK_TCK
        own_s = sys1.own_cpu_s - sys0.own_cpu_s
        run.other_cpu_s = round(busy_s - run.server_cpu_s - run.client_cpu_s - own_s, 2)
        capacity_s = (sys1.at - sys0.at) * (os.cpu_count() or 1)
        run.other_cpu_pct = round(100 * max(0.0, run.other_cpu_s) / capacity_s, 1)
        run.steal_cpu_s = round((sys1.steal_ticks - sys0.steal_ticks) / CLK_TCK, 2)
        run.disk_written_mb = round((sys1.sectors_written - sys0.sectors_written) * 512 / 1e6, 1)
        run.other_processes = sampler.busy_others()
        return run
    finally:
        if sampler:
            sampler.stop()
        server.stop()
        RUN_DIRS.append(workdir)
        while RUN_DIRS and shutil.disk_usage(WORK_ROOT).free < MIN_FREE_BYTES:
            shutil.rmtree(RUN_DIRS.pop(0), ignore_errors=True)
        os.sync()


# Run data directories, deleted at the end (see "Method and caveats").
RUN_DIRS: list[Path] = []
MIN_FREE_BYTES = 8 << 30


def delete_run_dirs() -> None:
    while RUN_DIRS:
        shutil.rmtree(RUN_DIRS.pop(), ignore_errors=True)


def check_delivery(name: str, corpus: Corpus, received: int, result: SendResult, workdir: Path) -> None:
    expected = len(corpus.files)
    problems = []
    if any(result.exit_codes):
        problems.append(f"storescu exit codes {result.exit_codes}")
    if received != expected:
        problems.append(f"{name} holds {received} of {expected} instances")
    if problems:
        logs = "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(workdir.glob("*.log")))
        raise BenchError(f"{name}: " + "; ".join(problems) + "\n" + logs)


def make_result(name, parallelism, rnd, corpus, send_result, ticks, ticks0, own_kib, child_kib,
                server, loadavg) -> RunResult:
    n, wall = len(corpus.files), send_result.wall_s
    cpu = ticks / CLK_TCK
    to_exit = None
    if server.exit_rusage is not None:
        ru = server.exit_rusage
        to_exit = round(ru.ru_utime + ru.ru_stime - ticks0 / CLK_TCK, 3)
    note = "max(listener, per-association children)" if server.forks else "VmHWM"
    return RunResult(
        server=name,
        parallelism=parallelism,
        round=rnd,
        instances=n,
        bytes=corpus.total_bytes,
        wall_s=round(wall, 3),
        instances_per_s=round(n / wall, 1),
        mb_per_s=round(corpus.total_bytes / 1e6 / wall, 1),
        server_cpu_s=round(cpu, 2),
        cpu_s_per_1k=round(cpu / n * 1000, 3),
        peak_rss_mb=round(max(own_kib, child_kib) / 1024, 1),
        rss_note=note,
        server_cpu_to_exit_s=to_exit,
        client_cpu_s=round(send_result.client_cpu_s, 2),
        loadavg_before=loadavg,
    )


# --------------------------------------------------------------------------
# Schedule, summary, output


def schedule(servers: list[str], rounds: int) -> list[tuple[int, str, int]]:
    """(round, server, parallelism): server order rotates each round and the
    parallelism order alternates, so no server always runs first or last."""
    plan = []
    for r in range(rounds):
        k = r % len(servers)
        order = servers[k:] + servers[:k]
        pars = PARALLELISMS if r % 2 == 0 else PARALLELISMS[::-1]
        for s in order:
            for p in pars:
                plan.append((r + 1, s, p))
    return plan


def summarize(runs: list[RunResult]) -> list[dict]:
    rows = []
    keys = sorted({(r.server, r.parallelism) for r in runs}, key=lambda k: (k[1], ALL_SERVERS.index(k[0])))
    for server, par in keys:
        rs = [r for r in runs if r.server == server and r.parallelism == par]
        med = lambda attr: round(statistics.median(getattr(r, attr) for r in rs), 3)  # noqa: E731
        rows.append({
            "server": server,
            "parallelism": par,
            "runs": len(rs),
            "instances_per_s": med("instances_per_s"),
            "instances_per_s_min": min(r.instances_per_s for r in rs),
            "instances_per_s_max": max(r.instances_per_s for r in rs),
            "mb_per_s": med("mb_per_s"),
            "wall_s": med("wall_s"),
            "cpu_s_per_1k": med("cpu_s_per_1k"),
            "peak_rss_mb": med("peak_rss_mb"),
            "client_cpu_s": med("client_cpu_s"),
            "other_cpu_pct": med("other_cpu_pct"),
        })
    return rows


def ratios(summary: list[dict]) -> list[dict]:
    by_key = {(r["server"], r["parallelism"]): r["instances_per_s"] for r in summary}
    out = []
    for par in PARALLELISMS:
        ours = by_key.get(("gateway", par))
        for peer in ("orthanc", "storescp", "storescp-sync"):
            theirs = by_key.get((peer, par))
            if ours is None or not theirs:
                continue
            ratio = round(ours / theirs, 2)
            target = TARGETS.get((par, peer))
            out.append({
                "parallelism": par,
                "peer": peer,
                "ratio": ratio,
                "target": target,
                "met": None if target is None else ratio >= target,
            })
    return out


def format_table(summary: list[dict], ratio_rows: list[dict]) -> str:
    head = (f"{'server':<13} {'assoc':>5} {'runs':>4} {'inst/s':>8} {'(min-max)':>15} {'MB/s':>7} "
            f"{'wall s':>7} {'CPU s/1k':>9} {'peak RSS MB':>11} {'other CPU':>9}")
    lines = [head, "-" * len(head)]
    for r in summary:
        spread = f"{r['instances_per_s_min']:.0f}-{r['instances_per_s_max']:.0f}"
        lines.append(
            f"{r['server']:<13} {r['parallelism']:>5} {r['runs']:>4} {r['instances_per_s']:>8.1f} "
            f"{spread:>15} {r['mb_per_s']:>7.1f} {r['wall_s']:>7.2f} {r['cpu_s_per_1k']:>9.2f} "
            f"{r['peak_rss_mb']:>11.1f} {r['other_cpu_pct']:>8.0f}%"
        )
    if ratio_rows:
        lines += ["", "gateway instances/s relative to peers (medians):"]
        for r in ratio_rows:
            verdict = "no target" if r["target"] is None else (
                f"target >= {r['target']}x: {'MET' if r['met'] else 'MISSED'}")
            lines.append(f"  {r['parallelism']} assoc  vs {r['peer']:<13} {r['ratio']:>5.2f}x   ({verdict})")
    lines += [
        "",
        "CPU s/1k: server CPU (user+sys, incl. forked children) per 1,000 instances.",
        "peak RSS: VmHWM (storescp: largest of listener and per-association children).",
        "other CPU: machine-wide busy CPU during the run not used by the server, storescu or",
        "  this script, as a share of both cores (kernel threads such as jbd2 and writeback,",
        "  and anyone else on the machine).",
    ]
    return "\n".join(lines)


def tool_versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            text = (out.stdout or out.stderr).strip().splitlines()
            return text[0] if text else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    return {
        "storescu": first_line([STORESCU, "--version"]),
        "storescp": first_line([STORESCP, "--version"]),
        "orthanc": first_line([ORTHANC, "--version"]),
        "pacs_gateway_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(GATEWAY_BIN.stat().st_mtime))
        if GATEWAY_BIN.exists() else "?",
    }


def write_json(args, corpus: Corpus, runs: list[RunResult], summary, ratio_rows, started: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"ingest-{started}.json"
    doc = {
        "benchmark": "ingest",
        "started": started,
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release()},
        "options": {"rounds": args.rounds, "corpus_profile": args.corpus_profile, "servers": args.servers,
                    "warmup": args.warmup, "page_cache_dropped": f"before {sum(DROPPED_CACHES)} of {len(DROPPED_CACHES)} runs (warm-ups included)"},
        "corpus": {"root": str(corpus.root), "instances": len(corpus.files), "bytes": corpus.total_bytes},
        "tools": tool_versions(),
        "env": {"RUST_LOG": os.environ.get("RUST_LOG")},
        "method": {
            "cpu": "delta of utime+stime+cutime+cstime over the server process and its "
                   f"unreaped children, send start to {SETTLE_S} s after the last storescu exit",
            "peak_rss": "VmHWM; forking storescp: max over listener and children (0.1 s sampling)",
            "page_cache": "corpus read once before round 1; nothing dropped",
            "split": "4 associations: whole studies dealt to 4 senders, balancing bytes",
            "parts": [{"instances": len(p), "bytes": sum((corpus.root / f).stat().st_size for f in p)}
                      for p in split_by_study(corpus, max(PARALLELISMS))],
        },
        "targets": [{"parallelism": p, "peer": peer, "min_ratio": t} for (p, peer), t in TARGETS.items()],
        "runs": [asdict(r) for r in runs],
        "summary": summary,
        "ratios": ratio_rows,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per server and parallelism (default 3)")
    ap.add_argument("--corpus-profile", choices=("bench", "small"), default="bench")
    ap.add_argument("--servers", default=",".join(ALL_SERVERS), help="comma-separated subset of %(default)s")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="one untimed run per server (4 associations) before round 1 (default on)")
    args = ap.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(ALL_SERVERS)
    if unknown or not args.servers or args.rounds < 1:
        ap.error(f"bad --servers {unknown or ''} or --rounds")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y%m%dT%H%M%S")
    try:
        check_tools(args.servers)
        if "orthanc" in args.servers:
            ensure_no_system_orthanc()
        shim = build_shim()
        corpus = ensure_corpus(args.corpus_profile)
        log(f"corpus: {len(corpus.files)} instances, {corpus.total_bytes / 1e6:.0f} MB in {corpus.root}")
        warm_page_cache(corpus)
        if args.warmup:
            for name in args.servers:
                r = run_once(name, corpus, max(PARALLELISMS), 0, shim)
                log(f"warm-up {name:<8} x{max(PARALLELISMS)}: {r.instances_per_s:7.1f} inst/s (not counted)")
        runs = []
        plan = schedule(args.servers, args.rounds)
        for i, (rnd, name, par) in enumerate(plan, 1):
            r = run_once(name, corpus, par, rnd, shim)
            runs.append(r)
            log(f"[{i}/{len(plan)}] round {rnd} {name:<8} x{par}: {r.instances_per_s:7.1f} inst/s "
                f"{r.mb_per_s:6.1f} MB/s  cpu {r.cpu_s_per_1k:.2f} s/1k  rss {r.peak_rss_mb:.0f} MB  "
                f"other cpu {r.other_cpu_pct:.0f}%  disk {r.disk_written_mb:.0f} MB"
                + (f"\n      busy elsewhere: {', '.join(r.other_processes)}" if r.other_processes else ""))
    except BenchError as e:
        log(f"ingest benchmark FAILED: {e}")
        return 1
    finally:
        delete_run_dirs()
    summary = summarize(runs)
    ratio_rows = ratios(summary)
    print(f"Ingest: {len(corpus.files)} instances, {corpus.total_bytes / 1e6:.0f} MB "
          f"({args.corpus_profile} corpus), {args.rounds} round(s), medians")
    print(format_table(summary, ratio_rows))
    path = write_json(args, corpus, runs, summary, ratio_rows, started)
    print(f"\nresults: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
