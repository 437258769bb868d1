#!/usr/bin/env python3
"""Skein and Ray Serve side by side on ppocr_cls: the same KServe V2 JSON request, the same load
generator, concurrency 1, 4 and 16, and each system's own in-process floor.

Layout (one orchestrator, three helper modes run as child processes so that no system's
measurement shares an interpreter with Ray's driver):

  main   starts `skein up`, measures it, stops it; starts a local Ray cluster with a Serve app,
         measures it, stops it (in the order `--systems` gives); prints markdown tables. Every
         start and wait is bounded, and both systems are stopped in `finally` blocks (SIGTERM
         and SIGINT included).
  load   the load generator: N keep-alive HTTP/1.1 connections on one asyncio loop (uvloop when
         installed), each posting the same pre-built request back to back for D seconds
         (closed loop). Prints latencies and its own CPU time as JSON.
  floor  onnxruntime in-process (the peer's floor): N threads calling one session back to back.

Skein's floor is in-process tract, measured by `skein bench` (its in-process half) in the same
run; at concurrency 1 that run also takes `--http`, so skein's own Rust HTTP client measures the
same gateway as a cross-check of what the Python load generator adds. The Ray Serve app is one deployment with 2 replicas (one per core, as `skein up` runs 2
nodes), each an onnxruntime session with intra_op_num_threads=1, answering V2 JSON on
POST /v2/models/ppocr_cls/infer; its JSON is parsed with orjson when installed (the fastest
Python parser, the peer's best case), access logs off, no dashboard, a 100 MB object store.

Usage: bench_side_by_side.py --skein PATH [--duration S] [--concurrency 1,4,16] [--json OUT]
"""
import argparse
import asyncio
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = REPO / "models/ppocr_cls/model.onnx"
INPUT = REPO / "models/ppocr_cls/cases/single/input_0.npy"
EXPECTED = REPO / "models/ppocr_cls/cases/single/output_0.npy"
INFER_PATH = "/v2/models/ppocr_cls/infer"
OUTPUT_NAME = "save_infer_model/scale_0.tmp_1"
START_TIMEOUT_S = 180


def percentile(sorted_us, p):
    """Nearest rank, as `skein bench`: element round((n - 1) * p)."""
    if not sorted_us:
        return 0
    return sorted_us[min(len(sorted_us) - 1, round((len(sorted_us) - 1) * p))]


def v2_json_body():
    """The V2 JSON request, float32 values in their shortest form (as skein's own encoder)."""
    x = np.load(INPUT)
    data = ",".join(str(v) for v in x.astype(np.float32).ravel())
    shape = ",".join(str(d) for d in x.shape)
    return (
        '{"inputs":[{"name":"x","datatype":"FP32","shape":[%s],"data":[%s]}]}' % (shape, data)
    ).encode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg():
    return os.getloadavg()[0]


# ---------------------------------------------------------------------------------------------
# load: the one load generator both systems get.


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = None, False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if chunked:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected: the final CRLF
                return status, bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return status, await reader.readexactly(length or 0)


def check_output(body):
    """The served answer must be the reference output (argmax and values)."""
    out = json.loads(body)["outputs"]
    got = [o for o in out if o["name"] == OUTPUT_NAME][0]
    want = np.load(EXPECTED).ravel()
    np.testing.assert_allclose(np.array(got["data"], dtype=np.float32), want, atol=1e-3, rtol=1e-2)


async def load_run(host, port, request, concurrency, duration):
    conns = []
    for _ in range(concurrency):
        conns.append(await asyncio.wait_for(asyncio.open_connection(host, port), 10))
    # Warm-up on every connection, and a check of the answer.
    for reader, writer in conns:
        for _ in range(3):
            writer.write(request)
            status, body = await asyncio.wait_for(read_response(reader), 30)
            if status != 200:
                raise RuntimeError(f"warm-up answered {status}: {body[:300]!r}")
    check_output(body)
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + duration

    async def worker(reader, writer):
        lat, errors = [], 0
        while time.perf_counter() < deadline:
            s = time.perf_counter_ns()
            writer.write(request)
            status, _ = await asyncio.wait_for(read_response(reader), 60)
            if status == 200:
                lat.append((time.perf_counter_ns() - s) // 1000)
            else:
                errors += 1
        return lat, errors

    results = await asyncio.gather(*(worker(r, w) for r, w in conns))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for _, w in conns:
        w.close()
    lat = sorted(x for r in results for x in r[0])
    return {
        "requests": len(lat),
        "errors": sum(r[1] for r in results),
        "p50_us": percentile(lat, 0.5),
        "p99_us": percentile(lat, 0.99),
        "throughput_rps": len(lat) / elapsed,
        "client_cpu_us_per_req": cpu * 1e6 / max(1, len(lat)),
        "client_cpu_share": cpu / elapsed,
    }


def mode_load(a):
    body = v2_json_body()
    host, port = a.addr.rsplit(":", 1)
    head = (
        f"POST {INFER_PATH} HTTP/1.1\r\nHost: {a.addr}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if a.key_file:
        head += f"Authorization: Bearer {pathlib.Path(a.key_file).read_text().strip()}\r\n"
    request = head.encode() + b"\r\n" + body
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(load_run(host, int(port), request, a.concurrency, a.duration))))


# ---------------------------------------------------------------------------------------------
# floor: onnxruntime in-process, the peer's floor.


def ort_session(threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])


def mode_floor(a):
    sess = ort_session(1)
    x = np.load(INPUT)
    for _ in range(8):
        sess.run(None, {"x": x})
    lats = [[] for _ in range(a.concurrency)]
    t0 = time.perf_counter()
    deadline = t0 + a.duration

    def worker(out):
        while time.perf_counter() < deadline:
            s = time.perf_counter_ns()
            sess.run(None, {"x": x})
            out.append((time.perf_counter_ns() - s) // 1000)

    threads = [threading.Thread(target=worker, args=(l,)) for l in lats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = sorted(v for l in lats for v in l)
    print(json.dumps({
        "p50_us": percentile(lat, 0.5),
        "p99_us": percentile(lat, 0.99),
        "throughput_rps": len(lat) / elapsed,
    }))


# ---------------------------------------------------------------------------------------------
# The Ray Serve app.


def ray_app(replicas):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1})
    class PpocrCls:
        def __init__(self, model_path):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
            self.out_name = self.sess.get_outputs()[0].name
            try:
                import orjson

                self.loads, self.dumps = orjson.loads, orjson.dumps
            except ImportError:
                self.loads, self.dumps = json.loads, lambda v: json.dumps(v).encode()

        async def __call__(self, request: Request):
            if request.method != "POST" or not request.url.path.endswith("/infer"):
                return JSONResponse({"error": "not found"}, status_code=404)
            req = self.loads(await request.body())
            inp = req["inputs"][0]
            x = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
            (y,) = self.sess.run(None, {inp["name"]: x})
            out = {
                "model_name": "ppocr_cls",
                "model_version": "1",
                "outputs": [{
                    "name": self.out_name,
                    "datatype": "FP32",
                    "shape": list(y.shape),
                    "data": y.ravel().tolist(),
                }],
            }
            return Response(self.dumps(out), media_type="application/json")

    return PpocrCls.bind(str(MODEL))


# ---------------------------------------------------------------------------------------------
# main: the orchestrator.


def child(mode, *args, timeout):
    out = subprocess.run(
        [sys.executable, __file__, mode, *map(str, args)],
        check=True, capture_output=True, text=True, timeout=timeout,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_http(addr, key_file, conc, duration):
    args = ["--addr", addr, "--concurrency", conc, "--duration", duration]
    if key_file:
        args += ["--key-file", key_file]
    return child("load", *args, timeout=duration + 120)


def skein_phase(skein, concs, duration, tmp):
    port = free_port()
    data = tmp / "skein"
    profile = data / "profile.toml"
    log = open(tmp / "skein-up.log", "w")
    up = subprocess.Popen(
        [skein, "up", "--data-dir", data / "data", "--listen", "127.0.0.1:0",
         "--http", f"127.0.0.1:{port}", "--profile", profile],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    rows = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "KServe V2 HTTP gateway on" not in (tmp / "skein-up.log").read_text():
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("skein up did not start:\n" + (tmp / "skein-up.log").read_text())
            time.sleep(0.1)
        key = data / "data/coordinator/admin-key"
        for c in concs:
            load0 = loadavg()
            served = measure_http(f"127.0.0.1:{port}", key, c, duration)
            # At concurrency 1 also `--http`: skein bench's own Rust HTTP client on the same
            # gateway, a cross-check of what the Python load generator adds.
            http = ["--http", f"127.0.0.1:{port}"] if c == 1 else []
            out = subprocess.run(
                [skein, "--profile", profile, "bench", "ppocr_cls", "--input", f"x={INPUT}",
                 "--concurrency", str(c), "--duration", f"{duration}s", "--output", "json", *http],
                check=True, capture_output=True, text=True, timeout=4 * duration + 180,
            )
            b = json.loads(out.stdout)
            floor = {"p50_us": b["inprocess_p50_us"], "p99_us": b["inprocess_p99_us"],
                     "throughput_rps": b["inprocess_throughput_rps"]}
            sdk = {"p50_us": b["p50_us"], "p99_us": b["p99_us"],
                   "throughput_rps": b["throughput_rps"]}
            rows.append({"system": "skein", "concurrency": c, "served": served, "floor": floor,
                         "sdk": sdk, "rust_http_json": b.get("http_json"), "load_avg_1m": load0})
            report_point(rows[-1])
    finally:
        stop(up)
        log.close()
    return rows


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def ray_phase(concs, duration, tmp, replicas):
    # The peer's floor first, while no server runs (skein's floor runs beside an idle skein up).
    floors = {}
    for c in concs:
        floors[c] = child("floor", "--concurrency", c, "--duration", duration,
                          timeout=duration + 120)
    import ray
    from ray import serve

    port = free_port()
    rows = []
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp / "ray"),
    )
    # ray.init installs its own SIGTERM handler (it aborts the driver); take it back so that
    # SIGTERM still unwinds through the `finally` below.
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        serve.run(ray_app(replicas), name="ppocr_cls", route_prefix="/v2/models/ppocr_cls",
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
        for c in concs:
            load0 = loadavg()
            served = measure_http(f"127.0.0.1:{port}", None, c, duration)
            rows.append({"system": "ray", "concurrency": c, "served": served,
                         "floor": floors[c], "load_avg_1m": load0})
            report_point(rows[-1])
        # The orderly stop only on success: after an error or a signal (which `timeout` also
        # sends to Ray's own processes) serve.shutdown waits 30 s for a controller that may be
        # gone; ray.shutdown alone stops the local cluster this driver started.
        serve.shutdown()
    finally:
        ray.shutdown()
    return rows


def report_point(r):
    s, f = r["served"], r["floor"]
    print(f"  {r['system']:<5} c={r['concurrency']:<2} p50 {s['p50_us']} µs, p99 {s['p99_us']} µs, "
          f"{s['throughput_rps']:.1f} req/s, errors {s['errors']}; floor p50 {f['p50_us']} µs, "
          f"{f['throughput_rps']:.1f} req/s; client CPU {s['client_cpu_us_per_req']:.0f} µs/req "
          f"({100 * s['client_cpu_share']:.0f} % of a core); load avg {r['load_avg_1m']:.2f}",
          file=sys.stderr, flush=True)


def table(rows, concs):
    """Markdown, ready to paste. In-process p50, and so the overhead, only at concurrency 1: with
    N > 1 Python threads the onnxruntime floor's waits for the GIL fall outside the timed call,
    so its p50 there is not comparable (its req/s is)."""
    by = {(r["system"], r["concurrency"]): r for r in rows}
    lines = [
        "| system | concurrency | p50 µs | p99 µs | req/s | in-process p50 µs | in-process req/s "
        "| overhead p50 µs | req/s ÷ in-process req/s | load generator CPU µs/req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sys_name, label in [("skein", "Skein: gateway → mesh → tract"),
                            ("ray", "Ray Serve: proxy → replica → onnxruntime")]:
        for c in concs:
            r = by.get((sys_name, c))
            if not r:
                continue
            s, f = r["served"], r["floor"]
            first = c == 1
            lines.append(
                f"| {label} | {c} | {s['p50_us']} | {s['p99_us']} | {s['throughput_rps']:.1f} "
                f"| {f['p50_us'] if first else '—'} | {f['throughput_rps']:.1f} "
                f"| {s['p50_us'] - f['p50_us'] if first else '—'} "
                f"| {s['throughput_rps'] / f['throughput_rps']:.2f} "
                f"| {s['client_cpu_us_per_req']:.0f} |")
        r = by.get((sys_name, 1))
        if r and r.get("rust_http_json"):
            h = r["rust_http_json"]
            lines.append(
                f"| (cross-check) Skein, `skein bench --http` Rust client | 1 | {h['p50_us']} "
                f"| {h['p99_us']} | {h['throughput_rps']:.1f} | {r['floor']['p50_us']} "
                f"| {r['floor']['throughput_rps']:.1f} | {h['p50_us'] - r['floor']['p50_us']} "
                f"| {h['throughput_rps'] / r['floor']['throughput_rps']:.2f} | — |")
    lines += ["", "| concurrency | overhead p50, Ray ÷ Skein (goal ≥ 5) "
              "| req/s ÷ in-process req/s, Skein ÷ Ray | served req/s, Skein ÷ Ray |",
              "|---|---|---|---|"]
    for c in concs:
        k, r = by.get(("skein", c)), by.get(("ray", c))
        if not (k and r):
            continue
        ratio = "—"
        if c == 1:
            ok = k["served"]["p50_us"] - k["floor"]["p50_us"]
            orr = r["served"]["p50_us"] - r["floor"]["p50_us"]
            ratio = f"**{orr / ok:.1f}**" if ok > 0 else "n/a (Skein overhead ≤ 0)"
        kr = k["served"]["throughput_rps"] / k["floor"]["throughput_rps"]
        rr = r["served"]["throughput_rps"] / r["floor"]["throughput_rps"]
        lines.append(f"| {c} | {ratio} | {kr / rr:.2f} | "
                     f"{k['served']['throughput_rps'] / r['served']['throughput_rps']:.2f} |")
    return "\n".join(lines)


def mode_main(a):
    concs = [int(c) for c in a.concurrency.split(",")]
    rows = []
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="skein-sbs-"))
    print(f"== ppocr_cls, V2 JSON body {len(v2_json_body())} bytes, {a.duration} s per point, "
          f"concurrency {concs}; work dir {tmp}", file=sys.stderr, flush=True)
    try:
        for system in a.systems.split(","):
            if system == "skein":
                print("== Skein: skein up (coordinator + 2 nodes + gateway)", file=sys.stderr,
                      flush=True)
                rows += skein_phase(a.skein, concs, a.duration, tmp)
            elif system == "ray":
                print(f"== Ray Serve: {a.ray_replicas} replicas, onnxruntime "
                      "intra_op_num_threads=1", file=sys.stderr, flush=True)
                rows += ray_phase(concs, a.duration, tmp, a.ray_replicas)
            else:
                raise SystemExit(f"unknown system {system!r} (skein, ray)")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    import onnxruntime
    import ray

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ray": ray.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
        "duration_s": a.duration,
        "load_avg_1m_at_end": loadavg(),
    }
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print(", ".join(f"{k} {v}" for k, v in meta.items()))
    print()
    print(table(rows, concs))


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def on_sigterm(_signum, _frame):
    raise KeyboardInterrupt("SIGTERM")


def main():
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the `finally` blocks stop both systems.
    signal.signal(signal.SIGTERM, on_sigterm)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    m = sub.add_parser("main")
    m.add_argument("--skein", default=str(REPO / "target/release/skein"))
    m.add_argument("--duration", type=float, default=10.0)
    m.add_argument("--concurrency", default="1,4,16")
    m.add_argument("--systems", default="skein,ray", help="which, in this order")
    m.add_argument("--ray-replicas", type=int, default=2)
    m.add_argument("--json", help="also write every figure to this file")
    m.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    ld = sub.add_parser("load")
    ld.add_argument("--addr", required=True)
    ld.add_argument("--key-file")
    ld.add_argument("--concurrency", type=int, required=True)
    ld.add_argument("--duration", type=float, required=True)
    fl = sub.add_parser("floor")
    fl.add_argument("--concurrency", type=int, required=True)
    fl.add_argument("--duration", type=float, required=True)
    a = p.parse_args(sys.argv[1:] if len(sys.argv) > 1 and sys.argv[1] in ("load", "floor", "main")
                     else ["main", *sys.argv[1:]])
    {"main": mode_main, "load": mode_load, "floor": mode_floor}[a.mode](a)


if __name__ == "__main__":
    main()
