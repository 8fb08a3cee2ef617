#!/usr/bin/env python3
"""Rendered-frame benchmark: viewer-api against DCMTK dcmj2pnm and Orthanc,
same 512x512 CT files, same run.

- viewer-api: `ImageService/RenderFrame` (PNG, the file's window) and
  `GetThumbnail` (128 px) over one gRPC channel, Python grpcio client; by
  default the render cache is off (every request applies the window and
  encodes) and the decoded-frame cache is on, as Orthanc keeps its own cache
  of parsed files; `--frame-cache-mib 0` makes every request decode too.
- Orthanc (Debian 1.10): `/instances/{id}/frames/0/rendered` (and with
  `?width=128&height=128` for thumbnails) over a keep-alive HTTP connection.
- dcmj2pnm: one process per frame, `+Wi 1 +on` (thumbnails: `+Sxv 128`).

Rounds alternate the order of the three; latencies are medians over every
request of every round; throughput runs 2 client processes (2 cores here).
Each renderer's output is decoded and compared pixel by pixel with the
others on the same files. Results: printed, and JSON in target/bench/.

Nothing fails when a number is low: this is a measurement, not a test.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ingest  # noqa: E402

import grpc  # noqa: E402
from google.protobuf import descriptor_pool, message_factory  # noqa: E402
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: E402
    ProtoReflectionDescriptorDatabase,
)

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
DCMJ2PNM = "/usr/bin/dcmj2pnm"
SAMPLE_DICOM = RELEASE / "sample-dicom"
VIEWER = RELEASE / "viewer-api"
PASSWORD = "bench-password-1"
CACHE_MIB = 0
FRAME_CACHE_MIB = 256


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- PNG decode


def png_pixels(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw samples) of an 8-bit, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0, "8-bit non-interlaced only"
            channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    out = bytearray(stride * height)
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return width, height, channels, bytes(out)


def compare(a: bytes, b: bytes) -> dict:
    wa, ha, ca, pa = png_pixels(a)
    wb, hb, cb, pb = png_pixels(b)
    if (wa, ha, ca) != (wb, hb, cb):
        return {"same_size": False, "a": [wa, ha, ca], "b": [wb, hb, cb]}
    diffs = [abs(x - y) for x, y in zip(pa, pb)]
    return {
        "same_size": True,
        "max_diff": max(diffs),
        "mean_abs_diff": round(sum(diffs) / len(diffs), 3),
        "pixels_differing_pct": round(100 * sum(1 for d in diffs if d) / len(diffs), 3),
    }


# ----------------------------------------------------------------- servers


class Center:
    """pacs-gateway (to receive the files) and viewer-api (to render them)."""

    def __init__(self, work: Path, shim: Path):
        self.work = work
        self.gateway = ingest.Gateway(work / "gateway", shim)
        (work / "gateway").mkdir(parents=True)
        self.viewer_proc = None
        self.config = work / "center.toml"

    def start(self, files: list[Path]) -> None:
        self.gateway.start()
        ingest_files = [str(f) for f in files]
        subprocess.run(
            [ingest.STORESCU, "-aet", ingest.CALLING_AE, "-aec", ingest.CALLED_AE,
             "127.0.0.1", str(self.gateway.port), *ingest_files],
            env=ingest.base_env(), check=True, capture_output=True)
        gw_config = (self.gateway.workdir / "gateway.toml").read_text()
        self.config.write_text(
            gw_config.replace("[storage]", "[viewer]\nlisten = \"127.0.0.1:0\"\n"
                              f"render_cache_mib = {CACHE_MIB}\nframe_cache_mib = {FRAME_CACHE_MIB}\n"
                              "worklist_settle_s = 0\n\n[storage]")
            + '\n[[clinics]]\nid = "county"\nname = "County"\nae_titles = ["COUNTYWS1"]\nrole = "county"\n')
        out = self.work / "viewer.out"
        with open(out, "wb") as stdout, open(self.work / "viewer.log", "wb") as err:
            self.viewer_proc = subprocess.Popen([str(VIEWER), "--config", str(self.config)],
                                                stdout=stdout, stderr=err)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = out.read_text().strip()
            if line.startswith("listening on "):
                self.addr = line.removeprefix("listening on ")
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("viewer-api did not start")
        subprocess.run([str(VIEWER), "--config", str(self.config), "admin", "create-user", "bench",
                        "--role", "radiologist", "--clinic", "county"],
                       input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        self.connect_client(None)

    def client_spec(self) -> tuple:
        return ("viewer-api", self.addr, self.token)

    @classmethod
    def client(cls, addr: str, token: str) -> "Center":
        c = cls.__new__(cls)
        c.addr = addr
        c.connect_client(token)
        return c

    def connect_client(self, token: str | None) -> None:
        """Channel and calls; logs in first when no token is given."""
        self.channel = grpc.insecure_channel(self.addr, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))

        def method(path):
            service, name = path.rsplit("/", 1)
            m = pool.FindServiceByName(service).FindMethodByName(name)
            req = message_factory.GetMessageClass(m.input_type)
            resp = message_factory.GetMessageClass(m.output_type)
            call = self.channel.unary_unary(f"/{service}/{name}",
                                            request_serializer=req.SerializeToString,
                                            response_deserializer=resp.FromString)
            return req, call

        if token is None:
            login_req, login = method("consortium.v1.IdentityService/Login")
            token = login(login_req(username="bench", password=PASSWORD)).token
        self.token = token
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.render_req, self.render_call = method("consortium.v1.ImageService/RenderFrame")
        self.thumb_req, self.thumb_call = method("consortium.v1.ImageService/GetThumbnail")

    def render(self, sop_uid: str) -> bytes:
        return self.render_call(self.render_req(sop_instance_uid=sop_uid, frame_number=1),
                                metadata=self.metadata).data

    def thumbnail(self, sop_uid: str) -> bytes:
        return self.thumb_call(self.thumb_req(sop_instance_uid=sop_uid, size=128),
                               metadata=self.metadata).data

    def stop(self) -> None:
        if self.viewer_proc:
            self.viewer_proc.terminate()
            self.viewer_proc.wait(timeout=30)
        self.gateway.stop()


class OrthancRenderer:
    def __init__(self, work: Path, shim: Path):
        (work / "orthanc").mkdir(parents=True)
        self.server = ingest.Orthanc(work / "orthanc", shim)
        self.local = threading.local()

    def client_spec(self) -> tuple:
        return ("orthanc", self.server.http_port, self.ids)

    @classmethod
    def client(cls, http_port: int, ids: dict) -> "OrthancRenderer":
        c = cls.__new__(cls)
        c.local = threading.local()
        c.port, c.ids = http_port, ids
        return c

    def conn(self) -> http.client.HTTPConnection:
        if not hasattr(self.local, "conn"):
            port = self.server.http_port if hasattr(self, "server") else self.port
            self.local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        return self.local.conn

    def start(self, files: list[Path]) -> dict[str, str]:
        self.server.start()
        ids = {}
        for f in files:
            c = self.conn()
            c.request("POST", "/instances", body=f.read_bytes())
            r = c.getresponse()
            body = json.loads(r.read())
            c.request("GET", f"/instances/{body['ID']}/simplified-tags")
            tags = json.loads(c.getresponse().read())
            ids[tags["SOPInstanceUID"]] = body["ID"]
        self.ids = ids
        return ids

    def get(self, path: str) -> bytes:
        try:
            c = self.conn()
            c.request("GET", path, headers={"Accept": "image/png"})
            r = c.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            # Orthanc closes idle keep-alive connections: reconnect once.
            del self.local.conn
            c = self.conn()
            c.request("GET", path, headers={"Accept": "image/png"})
            r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"Orthanc {path}: HTTP {r.status}")
        return data

    def render(self, sop_uid: str) -> bytes:
        return self.get(f"/instances/{self.ids[sop_uid]}/frames/0/rendered")

    def thumbnail(self, sop_uid: str) -> bytes:
        return self.get(f"/instances/{self.ids[sop_uid]}/frames/0/rendered?width=128&height=128")

    def stop(self) -> None:
        self.server.stop()


class Dcmj2pnm:
    def __init__(self, work: Path, files: dict[str, Path]):
        self.out = work / "dcmj2pnm"
        self.out.mkdir(parents=True)
        self.files = files

    def client_spec(self) -> tuple:
        return ("dcmj2pnm", str(self.out), {k: str(v) for k, v in self.files.items()})

    @classmethod
    def client(cls, out: str, files: dict) -> "Dcmj2pnm":
        c = cls.__new__(cls)
        c.out, c.files = Path(out), files
        return c

    def run(self, sop_uid: str, extra: list[str]) -> bytes:
        target = self.out / f"{os.getpid()}-{threading.get_ident()}.png"
        subprocess.run([DCMJ2PNM, "+Wi", "1", "+on", "-il", *extra, str(self.files[sop_uid]), str(target)],
                       check=True, capture_output=True)
        return target.read_bytes()

    def render(self, sop_uid: str) -> bytes:
        return self.run(sop_uid, [])

    def thumbnail(self, sop_uid: str) -> bytes:
        return self.run(sop_uid, ["+Sxv", "128"])


# ----------------------------------------------------------------- measuring


def latencies(fn, uids: list[str], n: int) -> list[float]:
    out = []
    for i in range(n):
        uid = uids[i % len(uids)]
        t = time.perf_counter()
        fn(uid)
        out.append((time.perf_counter() - t) * 1000)
    return out


def make_client(spec: tuple):
    """A renderer in a fresh process, from `client_spec()` (clients are not shared)."""
    kind = spec[0]
    if kind == "viewer-api":
        return Center.client(*spec[1:])
    if kind == "orthanc":
        return OrthancRenderer.client(*spec[1:])
    return Dcmj2pnm.client(*spec[1:])


def _worker(spec, kind, uids, n, offset, barrier, results):
    r = make_client(spec)
    fn = getattr(r, kind)
    fn(uids[0])
    barrier.wait()
    start = time.time()
    for i in range(n):
        fn(uids[(offset + i) % len(uids)])
    results.put((start, time.time()))


def throughput(spec: tuple, kind: str, uids: list[str], n: int, clients: int = 2) -> float:
    """Frames per second with `clients` client processes (no shared GIL)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(clients), ctx.Queue()
    per = max(1, n // clients)
    procs = [ctx.Process(target=_worker, args=(spec, kind, uids, per, k * 7, barrier, results))
             for k in range(clients)]
    for p in procs:
        p.start()
    spans = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return per * clients / (max(e for _, e in spans) - min(s for s, _ in spans))


def corpus(work: Path, count: int) -> dict[str, Path]:
    """`count` 512x512 CT files (explicit/implicit VR LE) from the demo profile."""
    out = work / "samples"
    subprocess.run([str(SAMPLE_DICOM), "--out", str(out), "--seed", "2026", "--profile", "demo"],
                   check=True, capture_output=True)
    chosen = {}
    for path in sorted(out.rglob("CT-*.dcm")):
        dump = subprocess.run(["/usr/bin/dcmdump", "-q", "+P", "0008,0018", "+P", "0028,0010",
                               "+P", "0002,0010", str(path)], capture_output=True, text=True).stdout
        if "512" not in dump or not ("1.2.840.10008.1.2.1" in dump or "=LittleEndianImplicit" in dump
                                     or "=LittleEndianExplicit" in dump):
            continue
        uid = dump.split("[", 1)[1].split("]", 1)[0]
        chosen[uid] = path
        if len(chosen) == count:
            break
    return chosen


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=150, help="requests per server per round")
    p.add_argument("--files", type=int, default=30)
    p.add_argument("--cache-mib", type=int, default=0,
                   help="viewer-api render cache (0: every request renders; 64 is its default)")
    p.add_argument("--frame-cache-mib", type=int, default=256,
                   help="viewer-api decoded-frame cache (256, its default, is like Orthanc's own "
                        "cache of parsed files; 0: every request decodes)")
    args = p.parse_args(argv)
    global CACHE_MIB, FRAME_CACHE_MIB
    CACHE_MIB, FRAME_CACHE_MIB = args.cache_mib, args.frame_cache_mib
    for tool in (VIEWER, SAMPLE_DICOM, Path(DCMJ2PNM), Path(ingest.ORTHANC), Path(ingest.STORESCU)):
        if not os.access(tool, os.X_OK):
            log(f"missing {tool}: run `make bench`")
            return 2
    ingest.ensure_no_system_orthanc()
    shim = ingest.build_shim()
    with tempfile.TemporaryDirectory(prefix="render-bench-") as tmp:
        work = Path(tmp)
        files = corpus(work, args.files)
        uids = list(files)
        log(f"{len(uids)} CT files of 512x512 (uncompressed)")
        center, orthanc = Center(work / "center", shim), OrthancRenderer(work, shim)
        try:
            center.start(list(files.values()))
            orthanc.start(list(files.values()))
            dcmtk = Dcmj2pnm(work, files)
            renderers = {"viewer-api": center, "orthanc": orthanc, "dcmj2pnm": dcmtk}

            # Same pixels? Compare each pair on the first files.
            agreement = {}
            for kind in ("render", "thumbnail"):
                for a, b in (("viewer-api", "dcmj2pnm"), ("viewer-api", "orthanc"), ("dcmj2pnm", "orthanc")):
                    worst = {"max_diff": 0, "mean_abs_diff": 0.0, "pixels_differing_pct": 0.0,
                             "same_size": True}
                    for uid in uids[:5]:
                        c = compare(getattr(renderers[a], kind)(uid), getattr(renderers[b], kind)(uid))
                        if not c["same_size"]:
                            worst = c
                            break
                        worst["max_diff"] = max(worst["max_diff"], c["max_diff"])
                        worst["mean_abs_diff"] = max(worst["mean_abs_diff"], c["mean_abs_diff"])
                        worst["pixels_differing_pct"] = max(worst["pixels_differing_pct"],
                                                            c["pixels_differing_pct"])
                    agreement[f"{kind}: {a} vs {b}"] = worst

            lat = {name: {"render": [], "thumbnail": []} for name in renderers}
            tput = {name: {"render": [], "thumbnail": []} for name in renderers}
            order = list(renderers)
            for rnd in range(args.rounds):
                for name in (order if rnd % 2 == 0 else order[::-1]):
                    r = renderers[name]
                    n = args.requests if name != "dcmj2pnm" else max(20, args.requests // 5)
                    for kind in ("render", "thumbnail"):
                        fn = getattr(r, kind)
                        fn(uids[0])  # warm connection
                        lat[name][kind] += latencies(fn, uids, n)
                        tput[name][kind].append(throughput(r.client_spec(), kind, uids, n))
                log(f"round {rnd + 1}/{args.rounds} done")
        finally:
            center.stop()
            orthanc.stop()

    summary = {name: {kind: {"median_ms": round(statistics.median(lat[name][kind]), 2),
                             "p90_ms": round(statistics.quantiles(lat[name][kind], n=10)[-1], 2),
                             "frames_per_s": round(statistics.median(tput[name][kind]), 1)}
                      for kind in ("render", "thumbnail")} for name in lat}
    print(f"\nrendered frames, 512x512 CT -> 8-bit PNG ({len(uids)} files, {args.rounds} rounds, medians, "
          f"viewer-api render cache {args.cache_mib} MiB, frame cache {args.frame_cache_mib} MiB)")
    print(f"{'':<12}{'renderer':<12}{'median ms':>10}{'p90 ms':>9}{'frames/s (2 client processes)':>31}")
    for kind in ("render", "thumbnail"):
        for name in summary:
            s = summary[name][kind]
            print(f"{kind:<12}{name:<12}{s['median_ms']:>10}{s['p90_ms']:>9}{s['frames_per_s']:>31}")
    ratios = {}
    for kind in ("render", "thumbnail"):
        ours = summary["viewer-api"][kind]
        for peer in ("orthanc", "dcmj2pnm"):
            theirs = summary[peer][kind]
            ratios[f"{kind} vs {peer}"] = {
                "latency": round(theirs["median_ms"] / ours["median_ms"], 2),
                "throughput": round(ours["frames_per_s"] / theirs["frames_per_s"], 2),
            }
    print("\nratios (how many times faster viewer-api is per frame; target 2x):")
    for k, v in ratios.items():
        print(f"  {k:<26} latency {v['latency']}x   throughput {v['throughput']}x")
    print("\npixel agreement (worst of 5 files; thumbnails differ by design: each scales its own way):")
    for k, v in agreement.items():
        print(f"  {k:<36} {v}")
    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"render-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"summary": summary, "ratios": ratios, "agreement": agreement,
                                "cache_mib": args.cache_mib, "frame_cache_mib": args.frame_cache_mib,
                                "files": len(uids), "rounds": args.rounds}, indent=2))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
