#!/usr/bin/env python3
"""Query and retrieve benchmark: pacs-gateway against Orthanc, same run.

1. Large index (ours only): 100,000 studies / 1,000,000 instances written
   straight into a fresh index (the gateway creates the schema; rows are
   bulk-inserted, no pixel data), then study-level C-FIND by Patient ID, by
   name wildcard, by date range with modality, and series/image-level
   queries inside a study: median and p99 over one open association, with
   two clients: pynetdicom, and a minimal socket client (benches/rawscu.py)
   whose own cost per query is small enough not to hide the servers'; and
   per findscu process.
2. Shared size: the same 10,000 one-instance studies sent to both servers
   (storescu, 4 associations); the same queries against both; our ratio.
3. Retrieval: a 60-slice CT study from the bench corpus, sent to both;
   whole-study C-GET (getscu) and C-MOVE to a DCMTK storescp (movescu, and
   the socket client over an open association, which leaves out movescu's
   own start); MB/s and our ratio, rounds alternating between the servers.
Order alternates between the servers; medians. Orthanc runs with its
shipped defaults plus the AE declarations C-GET/C-MOVE need, loopback only
(see ingest.py for the bind shim). Results: table on stdout and
target/bench-results/query-<timestamp>.json.

usage: python3 benches/query.py [--large-studies N] [--shared-studies N] [--repeats N]
"""
import argparse
import json
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402
import rawscu  # noqa: E402

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # noqa: E402

# pynetdicom leaves Nagle's algorithm on: each request (command PDU, then
# identifier PDU) would wait ~40 ms for a delayed ACK, for either server.
# Like TCP_NODELAY=1 for DCMTK, take the instrument out of the measurement.
_connect = socket.socket.connect


def _connect_nodelay(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _connect(sock, address)


socket.socket.connect = _connect_nodelay

CT = "1.2.840.10008.5.1.4.1.1.2"
FAMILY = ["WANG", "LI", "ZHANG", "LIU", "CHEN", "YANG", "HUANG", "ZHAO", "WU", "ZHOU"]
FAMILY_HAN = ["王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周"]
GIVEN = ["WEI", "FANG", "NA", "MIN", "JING", "LEI", "QIANG", "YAN", "JUN", "YONG", "JIE", "TAO", "MING", "CHAO"]
MODALITIES = ["CT", "MR", "DX", "CR", "US"]
# The large index's owner: a township clinic, whose own AE queries it as
# well (its answers scoped to what it sent) besides the county's.
TOWNSHIP, TOWNSHIP_AE = "township", "BENCHTWP"


class Orthanc(ingest.Orthanc):
    """Orthanc allowing query/retrieve from the bench AEs."""

    def __init__(self, workdir, shim, dests=None):
        super().__init__(workdir, shim)
        self.dests = dests or {}

    def start(self):
        self.port, self.http_port = ingest.free_port(), ingest.free_port()
        config = {
            "Name": "bench", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "DicomAet": ingest.CALLED_AE,
            "DicomPort": self.port, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [], "LuaScripts": [],
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "DicomModalities": {"bench": [ingest.CALLING_AE, "127.0.0.1", 104],
                                **{ae.lower(): [ae, "127.0.0.1", port] for ae, port in self.dests.items()}},
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self._spawn([ingest.ORTHANC, str(path)], self.preload_env())
        ingest.wait_listening(self.proc, [self.port, self.http_port], self.logfile)


class Gateway(ingest.Gateway):
    """The gateway, registering the bench AE as a county station."""

    def __init__(self, workdir, shim, dests=None, data=None):
        super().__init__(workdir, shim)
        self.dests, self.data = dests or {}, data or workdir / "data"

    def start(self):
        config = self.workdir / "gateway.toml"
        config.write_text(f"""[gateway]
ae_title = "{ingest.CALLED_AE}"
listen = "127.0.0.1:0"
max_find_results = 1000000

[storage]
data_dir = "{self.data}"

[[clinics]]
id = "bench"
name = "Bench"
ae_titles = ["{ingest.CALLING_AE}"]
role = "county"

[[clinics]]
id = "{TOWNSHIP}"
name = "Bench township clinic"
ae_titles = ["{TOWNSHIP_AE}"]
""" + "".join(f"""
[[destinations]]
ae_title = "{ae}"
host = "127.0.0.1"
port = {port}
""" for ae, port in self.dests.items()))
        out = self.workdir / "gateway.out"
        with open(out, "wb") as stdout:
            self._spawn([str(ingest.GATEWAY_BIN), "--config", str(config)], ingest.base_env(), stdout=stdout)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check_alive()
            line = out.read_text().strip()
            if line.startswith("listening on "):
                self.port = int(line.rpartition(":")[2])
                return
            time.sleep(0.05)
        raise ingest.BenchError("gateway did not start")


def fill_index(db: Path, studies: int, per_study_series: int = 2, per_series: int = 5, seed: int = 7):
    """Bulk-inserts a synthetic hierarchy; returns sample keys for queries."""
    rnd = random.Random(seed)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    patients = max(1, studies // 5)
    now = "2026-11-24T00:00:00.000000Z"
    pat_rows, names = [], []
    for p in range(1, patients + 1):
        f, g = rnd.randrange(10), rnd.choice(GIVEN) + rnd.choice(GIVEN)
        name = f"{FAMILY[f]}^{g}={FAMILY_HAN[f]}^{g.lower()}"
        names.append(name)
        pat_rows.append((p, TOWNSHIP, f"P{p:07d}", "bench", name, name.upper(), "ISO_IR 192",
                         f"19{rnd.randrange(40, 99)}0101", rnd.choice("MF")))
    conn.executemany("INSERT INTO patients (pk, clinic_id, patient_id, issuer, name, name_search, name_charset,"
                     " birth_date, sex) VALUES (?,?,?,?,?,?,?,?,?)", pat_rows)
    study_rows, series_rows, inst_rows = [], [], []
    se_pk = inst_pk = 0
    for s in range(1, studies + 1):
        date = f"20{rnd.randrange(22, 26)}{rnd.randrange(1, 13):02d}{rnd.randrange(1, 29):02d}"
        study_rows.append((s, f"2.25.9{s}", rnd.randrange(1, patients + 1), TOWNSHIP, date, "101010",
                           f"ACC{s:08d}", f"S{s}", "bench study", "", "", "", now, now))
        modality = rnd.choice(MODALITIES)
        for _ in range(per_study_series):
            se_pk += 1
            series_rows.append((se_pk, f"2.25.8{se_pk}", s, modality, se_pk % 100, "series"))
            for n in range(per_series):
                inst_pk += 1
                inst_rows.append((inst_pk, f"2.25.7{inst_pk}", se_pk, CT, n + 1,
                                  "1.2.840.10008.1.2.1", "instances/00/none.dcm", "0" * 64, 1, 0, TOWNSHIP, TOWNSHIP_AE, now))
        if len(inst_rows) >= 200_000:
            flush(conn, study_rows, series_rows, inst_rows)
    flush(conn, study_rows, series_rows, inst_rows)
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    given = names[0].split("=")[0].split("^")[1]
    return {"patient_id": f"P{rnd.randrange(1, patients + 1):07d}",
            "name_prefix": names[0].split("^")[0] + "^" + given[:len(given) - 1] + "*",
            "study": f"2.25.9{rnd.randrange(1, studies + 1)}"}


def flush(conn, study_rows, series_rows, inst_rows):
    conn.executemany("INSERT INTO studies (pk, study_uid, patient_pk, clinic_id, study_date, study_time,"
                     " accession_number, study_id, description, referring_physician, institution, character_set,"
                     " first_received_at, last_received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", study_rows)
    conn.executemany("INSERT INTO series (pk, series_uid, study_pk, modality, series_number, description)"
                     " VALUES (?,?,?,?,?,?)", series_rows)
    conn.executemany("INSERT INTO instances (pk, sop_instance_uid, series_pk, sop_class_uid, instance_number,"
                     " transfer_syntax, blob_key, sha256, size, dataset_offset, clinic_id, calling_ae, received_at)"
                     " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", inst_rows)
    # Who sent each version, as the gateway records it: a clinic's queries
    # see only instances whose current bytes it sent.
    conn.executemany("INSERT INTO instance_versions (sop_instance_uid, blob_key, sha256, size, transfer_syntax,"
                     " clinic_id, calling_ae, received_at, sop_class_uid) VALUES (?,?,?,?,?,?,?,?,?)",
                     [(r[1], r[6], r[7], r[8], r[5], r[10], r[11], r[12], r[3]) for r in inst_rows])
    conn.executemany("INSERT INTO instance_senders (sop_instance_uid, sha256, clinic_id, calling_ae,"
                     " first_received_at) VALUES (?,?,?,?,?)",
                     [(r[1], r[7], r[10], r[11], r[12]) for r in inst_rows])
    study_rows.clear(), series_rows.clear(), inst_rows.clear()


def queries(keys):
    """(name, dataset) pairs, Study Root."""
    def q(level, **kv):
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for k, v in kv.items():
            setattr(ds, k, v)
        return ds
    return [
        ("study by PatientID", q("STUDY", PatientID=keys["patient_id"], StudyInstanceUID="", PatientName="")),
        ("study by name wildcard", q("STUDY", PatientName=keys["name_prefix"], StudyInstanceUID="")),
        ("study by date range + CT", q("STUDY", StudyDate="20240301-20240307", ModalitiesInStudy="CT",
                                       StudyInstanceUID="")),
        ("series in a study", q("SERIES", StudyInstanceUID=keys["study"], SeriesInstanceUID="", Modality="")),
        ("images in a study", q("IMAGE", StudyInstanceUID=keys["study"], SOPInstanceUID="")),
    ]


def time_queries(port, keys, repeats):
    ae = AE(ae_title=ingest.CALLING_AE)
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=ingest.CALLED_AE)
    if not assoc.is_established:
        raise ingest.BenchError("C-FIND association refused")
    out = {}
    for name, ds in queries(keys):
        times, matches = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            matches = sum(1 for status, ident in assoc.send_c_find(ds, FIND) if ident is not None)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        if matches == 0:
            raise ingest.BenchError(f"{name}: no match (the keys must name indexed studies)")
        out[name] = {"median_ms": round(statistics.median(times), 2),
                     "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2), "matches": matches}
    assoc.release()
    return out


def time_queries_raw(port, keys, repeats, calling=ingest.CALLING_AE):
    """Like time_queries, with the minimal socket client (identifiers encoded
    before the clock starts, for both servers alike)."""
    out = {}
    with rawscu.RawScu(port, calling, ingest.CALLED_AE) as f:
        for name, ds in queries(keys):
            identifier = rawscu.encode(ds)
            f.find(identifier)  # warm
            times, matches = [], 0
            for _ in range(repeats):
                start = time.perf_counter()
                matches = f.find(identifier)
                times.append((time.perf_counter() - start) * 1000)
            if matches == 0:
                raise ingest.BenchError(f"{name}: no match (the keys must name indexed studies)")
            times.sort()
            out[name] = {"median_ms": round(statistics.median(times), 3),
                         "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
                         "matches": matches}
    return out


def time_findscu(port, keys, runs=20, nagle=False):
    """Median ms per findscu process. With `nagle`, findscu runs as Debian
    ships it, without TCP_NODELAY=1: a server that delays its ACKs makes
    each request wait for them."""
    env = ingest.base_env()
    if nagle:
        del env["TCP_NODELAY"]
    cmd = ["/usr/bin/findscu", "-S", "-aet", ingest.CALLING_AE, "-aec", ingest.CALLED_AE,
           "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={keys['patient_id']}", "-k", "StudyInstanceUID",
           "127.0.0.1", str(port)]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 1)


def write_shared_corpus(root: Path, studies: int):
    """One small instance per study, written with pydicom."""
    if (root / ".complete").exists():
        return sorted(root.glob("*.dcm"))
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(11)
    for s in range(studies):
        # Five studies per patient, one name per patient.
        who = random.Random(s // 5)
        f, g = who.randrange(10), who.choice(GIVEN) + who.choice(GIVEN)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
        ds.PatientName = f"{FAMILY[f]}^{g}={FAMILY_HAN[f]}^{g.lower()}"
        ds.PatientID = f"P{s // 5:07d}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.StudyDate = f"20{rnd.randrange(22, 26)}{rnd.randrange(1, 13):02d}{rnd.randrange(1, 29):02d}"
        ds.StudyTime, ds.Modality, ds.AccessionNumber = "101010", rnd.choice(MODALITIES), f"A{s:08d}"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = bytes(128)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(root / f"{s:06d}.dcm", write_like_original=False)
    (root / ".complete").write_text("ok\n")
    return sorted(root.glob("*.dcm"))


def send(files, port):
    parts = [files[i::4] for i in range(4)]
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", ingest.CALLING_AE, "-aec", ingest.CALLED_AE,
                               "127.0.0.1", str(port), *map(str, p)], env=ingest.base_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in parts]
    if any(p.wait() for p in procs):
        raise ingest.BenchError("storescu failed")


class NullScp(ingest.StoreScp):
    """A storescp that receives every byte and acknowledges, but writes nothing."""

    def start(self) -> None:
        self.out = self.workdir / "received"
        self.out.mkdir()
        self.port = ingest.free_port()
        cmd = [ingest.STORESCP, "--fork", "--ignore", "-aet", ingest.CALLED_AE, str(self.port)]
        self._spawn(cmd, self.preload_env())
        ingest.wait_listening(self.proc, [self.port], self.logfile)


def _timed(cmd, what, check=True):
    start = time.perf_counter()
    r = subprocess.run(cmd, env=ingest.base_env(), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise ingest.BenchError(f"{what} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - start, r.stdout + r.stderr


def check_retrieval(port, study_uid, workdir, dest: ingest.StoreScp):
    """One whole-study C-GET (getscu -od) and one C-MOVE to a storescp that
    writes files: both must deliver the 60 instances. Seconds of each."""
    got = workdir / "got"
    got.mkdir(exist_ok=True)
    get_s, _ = _timed(GET + ["-od", str(got)] + _keys(study_uid, port), "getscu")
    move_s, _ = _timed(MOVE + ["-aem", "BENCHDEST"] + _keys(study_uid, port), "movescu")
    if len(list(got.iterdir())) != 60:
        raise ingest.BenchError(f"C-GET delivered {len(list(got.iterdir()))} of 60")
    if dest.count_received() != 60:
        raise ingest.BenchError(f"C-MOVE delivered {dest.count_received()} of 60")
    return get_s, move_s


GET = ["/usr/bin/getscu", "-S", "-aet", ingest.CALLING_AE, "-aec", ingest.CALLED_AE]
MOVE = ["/usr/bin/movescu", "-v", "-S", "-aet", ingest.CALLING_AE, "-aec", ingest.CALLED_AE]
NO_STUDY = "2.25.1"


def _keys(study_uid, port):
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)]


def retrieval_round(port, study_uid, raw_moves=2):
    """One round of timed retrievals of the whole study, receivers taking
    every byte but writing nothing (getscu --ignore, storescp --ignore as
    BENCHNULL), so the receiving side's disk does not hide the servers' own
    speed. Seconds for: getscu, movescu; the same tools on a study matching
    nothing (process start, association, query, release: their fixed cost);
    and `raw_moves` C-MOVEs from the socket client over one open
    association (the server's time from request to final response)."""
    out = {}
    out["get"], _ = _timed(GET + ["--ignore"] + _keys(study_uid, port), "getscu --ignore")
    out["move"], text = _timed(MOVE + ["-aem", "BENCHNULL"] + _keys(study_uid, port), "movescu to BENCHNULL")
    # Success (not 0xB000) means no sub-operation failed.
    if "Received Final Move Response (Success)" not in text:
        raise ingest.BenchError(f"C-MOVE to BENCHNULL did not succeed:\n{text[-1500:]}")
    # (Orthanc answers a move of nothing with 0xC000; the time is what counts.)
    out["get_fixed"] = _timed(GET + ["--ignore"] + _keys(NO_STUDY, port), "getscu (no match)", check=False)[0]
    out["move_fixed"] = _timed(MOVE + ["-aem", "BENCHNULL"] + _keys(NO_STUDY, port), "movescu (no match)",
                               check=False)[0]
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", study_uid
    identifier = rawscu.encode(ds)
    out["raw_move"] = []
    with rawscu.RawScu(port, ingest.CALLING_AE, ingest.CALLED_AE, rawscu.RawScu.MOVE) as m:
        for _ in range(raw_moves):
            start = time.perf_counter()
            completed, failed, warning = m.move(identifier, "BENCHNULL")
            out["raw_move"].append(time.perf_counter() - start)
            if (completed, failed, warning) != (60, 0, 0):
                raise ingest.BenchError(f"socket C-MOVE: {completed} completed, {failed} failed, {warning} warning")
    return out


def retrieval_summary(rounds, nbytes, writes):
    """MB/s of the median run of each kind, from `retrieval_round` results."""
    mb, med = nbytes / 1e6, statistics.median
    times = {k: med([t for r in rounds for t in (r[k] if isinstance(r[k], list) else [r[k]])])
             for k in rounds[0]}
    return {"get_mb_s": round(mb / times["get"], 1), "move_mb_s": round(mb / times["move"], 1),
            "get_fixed_ms": round(times["get_fixed"] * 1000, 1), "move_fixed_ms": round(times["move_fixed"] * 1000, 1),
            "get_net_mb_s": round(mb / max(1e-6, times["get"] - times["get_fixed"]), 1),
            "move_net_mb_s": round(mb / max(1e-6, times["move"] - times["move_fixed"]), 1),
            "move_raw_mb_s": round(mb / times["raw_move"], 1), "move_raw_ms": round(times["raw_move"] * 1000, 1),
            "get_mb_s_receiver_writes": round(mb / writes[0], 1), "move_mb_s_receiver_writes": round(mb / writes[1], 1)}


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large-studies", type=int, default=100_000)
    p.add_argument("--shared-studies", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--retrieve-rounds", type=int, default=7)
    args = p.parse_args(argv)
    ingest.WORK_ROOT.mkdir(parents=True, exist_ok=True)
    shim = ingest.build_shim()
    results = {}
    work = Path(tempfile.mkdtemp(prefix="query-", dir=ingest.WORK_ROOT))
    try:
        # 1. Large index, ours only.
        gw = Gateway(work / "large", shim)
        (work / "large").mkdir()
        gw.start(), gw.stop()  # creates the schema
        t0 = time.perf_counter()
        keys = fill_index(gw.data / "index.sqlite", args.large_studies)
        ingest.log(f"index of {args.large_studies} studies / {args.large_studies * 10} instances "
                   f"written in {time.perf_counter() - t0:.0f} s")
        gw = Gateway(work / "large", shim, data=gw.data)
        gw.start()
        try:
            results["large"] = {"queries": time_queries(gw.port, keys, args.repeats),
                                "raw_queries": time_queries_raw(gw.port, keys, args.repeats),
                                "raw_queries_township": time_queries_raw(gw.port, keys, args.repeats,
                                                                         calling=TOWNSHIP_AE),
                                "findscu_median_ms": time_findscu(gw.port, keys)}
        finally:
            gw.stop()
        ingest.log(f"large: {json.dumps(results['large'])}")
        large = results["large"]
        for q, r in large["raw_queries"].items():
            if large["raw_queries_township"][q]["matches"] != r["matches"]:
                raise ingest.BenchError(f"{q}: the township clinic, which sent everything, "
                                        f"found {large['raw_queries_township'][q]['matches']} of {r['matches']}")

        # 2 and 3. Shared size and retrieval, both servers, alternating.
        files = write_shared_corpus(ingest.TARGET / f"bench-corpus-query-{args.shared_studies}", args.shared_studies)
        study_dir = ingest.TARGET / "bench-corpus" / "county" / "study-0006"
        ct = sorted(study_dir.glob("CT-*.dcm"))[:60]
        ct_bytes = sum(f.stat().st_size for f in ct)
        ct_study = subprocess.run(["/usr/bin/dcmdump", "+P", "0020,000d", str(ct[0])], capture_output=True,
                                  text=True).stdout.split("[")[1].split("]")[0]
        shared_keys = {"patient_id": "P0000042", "name_prefix": "WANG^WEIF*", "study": ct_study}
        # Both servers run side by side (each with its own move
        # destinations), so retrieval rounds can alternate between them.
        servers, helpers = {}, []
        try:
            for name in ("gateway", "orthanc"):
                dest = ingest.StoreScp(work / f"dest-{name}", shim)
                null = NullScp(work / f"null-{name}", shim)
                for d in (f"dest-{name}", f"null-{name}", name):
                    (work / d).mkdir()
                # Registered before starting, so one that fails to start
                # after spawning is stopped too.
                for helper in (dest, null):
                    helpers.append(helper)
                    helper.start()
                server = (Gateway if name == "gateway" else Orthanc)(
                    work / name, shim, dests={"BENCHDEST": dest.port, "BENCHNULL": null.port})
                helpers.append(server)
                server.start()
                servers[name] = (server, dest)
                t0 = time.perf_counter()
                send(files, server.port)
                send(ct, server.port)
                ingest.log(f"{name}: {len(files) + len(ct)} instances loaded in {time.perf_counter() - t0:.0f} s")
            for name, (server, dest) in servers.items():
                results[name] = {"queries": time_queries(server.port, shared_keys, args.repeats),
                                 "raw_queries": time_queries_raw(server.port, shared_keys, args.repeats),
                                 "findscu_median_ms": time_findscu(server.port, shared_keys),
                                 "findscu_nagle_median_ms": time_findscu(server.port, shared_keys, nagle=True)}
            writes = {name: check_retrieval(server.port, ct_study, work / name, dest)
                      for name, (server, dest) in servers.items()}
            rounds = {name: [] for name in servers}
            for r in range(args.retrieve_rounds):
                for name in (("gateway", "orthanc") if r % 2 == 0 else ("orthanc", "gateway")):
                    rounds[name].append(retrieval_round(servers[name][0].port, ct_study))
            for name in servers:
                results[name]["retrieve"] = retrieval_summary(rounds[name], ct_bytes, writes[name])
                ingest.log(f"{name}: {json.dumps(results[name])}")
        finally:
            for helper in reversed(helpers):
                helper.stop()
    except (ingest.BenchError, RuntimeError, OSError) as e:
        ingest.log(f"query benchmark FAILED: {e}")
        return 1
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)

    for client, key in (("pynetdicom", "queries"), ("socket client, benches/rawscu.py", "raw_queries")):
        print(f"C-FIND latency ({client}, one association, {args.repeats} repeats; ms median / p99)")
        print(f"{'query':<28}{'ours @' + str(args.large_studies):>18}{'ours @' + str(args.shared_studies):>18}"
              f"{'Orthanc @' + str(args.shared_studies):>18}{'ratio':>8}")
        for q in results["large"][key]:
            big, ours, theirs = (results[k][key][q] for k in ("large", "gateway", "orthanc"))
            print(f"{q:<28}{big['median_ms']:>9.2f} /{big['p99_ms']:>6.1f}{ours['median_ms']:>11.2f} /{ours['p99_ms']:>5.1f}"
                  f"{theirs['median_ms']:>11.2f} /{theirs['p99_ms']:>5.1f}{theirs['median_ms'] / ours['median_ms']:>7.1f}x")
    print(f"The same at {args.large_studies} studies as the township clinic that sent them "
          f"(answers scoped to its own instances), socket client; ms median / p99")
    for q, r in results["large"]["raw_queries_township"].items():
        county = results["large"]["raw_queries"][q]
        print(f"{q:<28}{r['median_ms']:>9.2f} /{r['p99_ms']:>6.1f}   (county: {county['median_ms']:.2f})")
    print("targets: study-level queries < 10 ms median at the large size; >= 10x Orthanc at the shared size")
    print(f"findscu per process (ms): ours {results['gateway']['findscu_median_ms']} "
          f"(at {args.large_studies}: {results['large']['findscu_median_ms']}), "
          f"Orthanc {results['orthanc']['findscu_median_ms']}")
    print(f"findscu per process as Debian ships it (Nagle on, no TCP_NODELAY=1), ms: "
          f"ours {results['gateway']['findscu_nagle_median_ms']}, Orthanc {results['orthanc']['findscu_nagle_median_ms']}")
    ours, theirs = results["gateway"]["retrieve"], results["orthanc"]["retrieve"]
    print(f"60-slice CT study ({ct_bytes / 1e6:.1f} MB), MB/s (target >= 2.0x Orthanc):")
    print(f"{'':<6}{'ours':>8}{'Orthanc':>9}{'ratio':>7}   measured how")
    n = args.retrieve_rounds
    rows = [("get", "_mb_s_receiver_writes", "getscu, one run, the receiver writes files"),
            ("get", "_mb_s", f"getscu, median of {n} rounds, receiver discards (--ignore)"),
            ("get", "_net_mb_s", f"same, less getscu's run on a study matching nothing "
                                 f"(ours {ours['get_fixed_ms']} ms, Orthanc {theirs['get_fixed_ms']} ms)"),
            ("move", "_mb_s_receiver_writes", "movescu, one run, storescp writes files"),
            ("move", "_mb_s", f"movescu, median of {n} rounds, storescp --ignore"),
            ("move", "_net_mb_s", f"same, less movescu's run on a study matching nothing "
                                  f"(ours {ours['move_fixed_ms']} ms, Orthanc {theirs['move_fixed_ms']} ms)"),
            ("move", "_raw_mb_s", f"socket client over an open association, median of {2 * n} "
                                  f"(ours {ours['move_raw_ms']} ms, Orthanc {theirs['move_raw_ms']} ms)")]
    for k, suffix, how in rows:
        a, b = ours[k + suffix], theirs[k + suffix]
        print(f"{k.upper():<6}{a:>8}{b:>9}{a / b:>6.1f}x   {how}")
    print("(rounds alternate between the servers, which run side by side)")
    ingest.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = ingest.RESULTS_DIR / f"query-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out.relative_to(ingest.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
