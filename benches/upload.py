#!/usr/bin/env python3
"""Upload benchmark: consortium-upload against DCMTK storescu, same corpus,
same gateway, same run.

Each run starts a fresh pacs-gateway (release build, fresh data dir) and
sends the bench corpus (sample-dicom --profile bench, ~2,500 instances,
850 MB) with one client over 1 and 4 parallel associations:
  - storescu: one process per association (whole studies dealt out by bytes,
    as in benches/ingest.py), TCP_NODELAY=1; it has no storage commitment,
    so its time is the send alone;
  - consortium-upload --associations N, with a fresh local record, so its
    time includes scanning, sending, hashing what it sent, and waiting for
    the center's storage commitment report for every instance.
Order alternates every round; medians over --rounds (default 4: an even
number, so each client runs first as often as the other). Besides walls,
the client's and the gateway's CPU seconds per run: the tool's run does
more work (two more SHA-256 passes over the corpus, its own and the
center's re-verification), so on 2 cores it is CPU-bound where storescu's
is not, and a host busy elsewhere slows it more. Delivery is checked
(index count). Run data is deleted at the end (see ingest.py on
ext4's recently-deleted inode scans). Results: a table on stdout and
target/bench-results/upload-<timestamp>.json.

usage: python3 benches/upload.py [--rounds N] [--corpus-profile bench|small]
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402  (shared corpus, gateway and sender helpers)

UPLOAD_BIN = ingest.RELEASE / "consortium-upload"


def run_upload(corpus, port, parallelism, workdir):
    cmd = [str(UPLOAD_BIN), "--port", str(port), "--calling-ae", ingest.CALLING_AE,
           "--associations", str(parallelism), "--record", str(workdir / "record.sqlite"),
           str(corpus.root)]
    start = time.perf_counter()
    with open(workdir / "upload.log", "wb") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=ingest.base_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise ingest.BenchError(f"consortium-upload failed:\n{ingest.tail(workdir / 'upload.log')}")
    return wall


def run_storescu(corpus, port, parallelism, workdir):
    result = ingest.send(corpus, port, parallelism, workdir)
    if any(result.exit_codes):
        raise ingest.BenchError(f"storescu failed: {result.exit_codes}")
    return result.wall_s


CLIENTS = {"upload": run_upload, "storescu": run_storescu}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Run(NamedTuple):
    """One run: wall seconds, and CPU seconds of the client and of the
    gateway while it ran (the tool's run includes the center's re-hashing
    for commitment). A run whose CPU is near twice its wall is CPU-bound on
    2 cores; one well below is waiting (on fsync, on the network)."""
    wall: float
    client_cpu: float
    gateway_cpu: float


def run_once(client, corpus, parallelism, run_dirs):
    ingest.fresh_page_cache(corpus)
    ingest.WORK_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"upload-{client}-p{parallelism}-", dir=ingest.WORK_ROOT))
    run_dirs.append(workdir)
    server = ingest.Gateway(workdir, None)
    try:
        server.start()
        gateway0 = sum(ingest.tree_cpu_ticks(server.proc.pid))
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = CLIENTS[client](corpus, server.port, parallelism, workdir)
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        gateway_cpu = (sum(ingest.tree_cpu_ticks(server.proc.pid)) - gateway0) / CLOCK_TICKS
        # The gateway is not reaped yet: the children's CPU is the client's alone.
        client_cpu = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
        received = server.count_received()
        if received < len(corpus.files):
            raise ingest.BenchError(f"{client}: the gateway holds {received} of {len(corpus.files)}")
        return Run(wall, client_cpu, gateway_cpu)
    finally:
        server.stop()
        os.sync()


def median(runs, field):
    return statistics.median(getattr(r, field) for r in runs)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--corpus-profile", choices=["bench", "small"], default="bench")
    args = p.parse_args(argv)
    if args.rounds % 2:
        ingest.log(f"{args.rounds} rounds: one client runs first more often than the other "
                   "(the first run of a pair is often the slower); prefer an even number")
    for binary in (ingest.GATEWAY_BIN, UPLOAD_BIN):
        if not binary.exists():
            ingest.log(f"{binary} missing: run `cargo build --release --bins`")
            return 1
    corpus = ingest.ensure_corpus(args.corpus_profile)
    ingest.warm_page_cache(corpus)
    n, mb = len(corpus.files), corpus.total_bytes / 1e6
    ingest.log(f"corpus: {n} instances, {mb:.0f} MB")
    walls = {}
    run_dirs = []
    try:
        for rnd in range(1, args.rounds + 1):
            order = list(CLIENTS) if rnd % 2 else list(reversed(CLIENTS))
            for parallelism in (1, 4):
                for client in order:
                    run = run_once(client, corpus, parallelism, run_dirs)
                    walls.setdefault((client, parallelism), []).append(run)
                    ingest.log(f"round {rnd} {client:<8} x{parallelism}: {n / run.wall:7.1f} inst/s "
                               f"{mb / run.wall:6.1f} MB/s ({run.wall:.2f} s; CPU s: client "
                               f"{run.client_cpu:.2f}, gateway {run.gateway_cpu:.2f})")
    except ingest.BenchError as e:
        ingest.log(f"upload benchmark FAILED: {e}")
        return 1
    finally:
        for d in run_dirs:
            shutil.rmtree(d, ignore_errors=True)
    print(f"Upload to pacs-gateway: {n} instances, {mb:.0f} MB, {args.rounds} round(s), medians")
    print(f"{'client':<10}{'assoc':>6}{'inst/s':>10}{'MB/s':>9}{'wall s':>9}"
          f"{'client CPU s':>14}{'gateway CPU s':>15}")
    rows = []
    for (client, par), runs in sorted(walls.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med, client_cpu, gateway_cpu = (median(runs, f) for f in Run._fields)
        rows.append({"client": client, "parallelism": par, "wall_s": round(med, 3),
                     "instances_per_s": round(n / med, 1), "mb_per_s": round(mb / med, 1),
                     "client_cpu_s": round(client_cpu, 2), "gateway_cpu_s": round(gateway_cpu, 2),
                     "walls": [round(r.wall, 3) for r in runs]})
        print(f"{client:<10}{par:>6}{n / med:>10.1f}{mb / med:>9.1f}{med:>9.2f}"
              f"{client_cpu:>14.2f}{gateway_cpu:>15.2f}")
    for par in (1, 4):
        ratio = median(walls[("storescu", par)], "wall") / median(walls[("upload", par)], "wall")
        met = "MET" if ratio >= 1.0 else "MISSED"
        print(f"  {par} assoc: consortium-upload (incl. commitment) vs storescu {ratio:.2f}x "
              f"(target >= 1.0x: {met})")
    ingest.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = ingest.RESULTS_DIR / f"upload-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"corpus": {"instances": n, "bytes": corpus.total_bytes},
                               "rounds": args.rounds, "medians": rows,
                               "page_cache_dropped": f"before {sum(ingest.DROPPED_CACHES)} of "
                                                     f"{len(ingest.DROPPED_CACHES)} runs"}, indent=2))
    print(f"results: {out.relative_to(ingest.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
