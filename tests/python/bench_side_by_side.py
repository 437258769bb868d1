#!/usr/bin/env python3
"""Skein, PyTriton and Ray Serve side by side on ppocr_cls and ppocr_det: the same KServe V2
requests (JSON, and binary tensors where the system speaks them) from the same load generator at
concurrency 1, 4 and 16, beside onnxruntime in-process (the floor every system runs on).

Layout (one orchestrator; the load generator, the floor and the PyTriton server run as child
processes, so that no measurement shares an interpreter with a server or with Ray's driver):

  main            measures the onnxruntime floor while nothing serves; then, in the order
                  `--systems` gives: starts `skein up --backend ort`, measures its
                  Rust SDK (`skein bench`) and its HTTP gateway, stops it; starts PyTriton,
                  measures it, stops it; starts a local Ray cluster with a Serve app, measures
                  it, stops it. Prints markdown tables and the issue's goals. The SDK's goal
                  at concurrency 1 is also judged on adjacent pairs (`--pairs`: the floor,
                  then the SDK, seconds apart), because this kind of host drifts. Every start and
                  wait is bounded; every system is stopped in a `finally` (SIGTERM and SIGINT
                  included).
  load            the load generator: N keep-alive HTTP/1.1 connections on one asyncio loop
                  (uvloop when installed), each posting the same pre-built request back to back
                  for D seconds (closed loop); the first answers are checked against the
                  reference output. Prints latencies and its own CPU time as JSON.
  floor           onnxruntime in-process: N threads calling one session back to back.
  pytriton-serve  PyTriton (Triton's HTTP front end and core; the model in Python, on
                  onnxruntime): `--replicas` instances per model, one session each.

Every system runs the models on onnxruntime with one intra-op thread per instance, one instance
(`--replicas`; Skein: `skein up --nodes 1 --ort-threads 1`), pinned to one server core
(`--server-cpus 0`) while the load generator and Skein's SDK client run on the other
(`--client-cpus 1`): one server core each, the load generator beside it. Ray Serve
answers V2 JSON only (it has no V2 protocol of its own; the app here is the peer's best case:
orjson, access logs off, no dashboard).

Usage: bench_side_by_side.py --skein PATH --ort-lib LIB [--duration S] [--concurrency 1,4,16]
       [--models ppocr_cls,ppocr_det] [--encodings binary,json] [--systems skein,pytriton,ray]
       [--pairs N] [--pair-duration S] [--json OUT]
"""
import argparse
import asyncio
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180
# The models and the reference case each one is measured on (models/README.md).
MODELS = {
    "ppocr_cls": {"case": "single", "output": "save_infer_model/scale_0.tmp_1"},
    "ppocr_det": {"case": "single_256", "output": "sigmoid_0.tmp_0"},
}
# The reference cases' tolerance for onnxruntime (models/README.md), widened to another
# engine's where Skein runs tract.
ATOL, RTOL = 1e-3, 1e-2


def model_path(model):
    return REPO / "models" / model / "model.onnx"


def case_input(model):
    return np.load(REPO / "models" / model / "cases" / MODELS[model]["case"] / "input_0.npy")


def case_output(model):
    return np.load(REPO / "models" / model / "cases" / MODELS[model]["case"] / "output_0.npy")


def infer_path(model):
    return f"/v2/models/{model}/infer"


def percentile(sorted_us, p):
    """Nearest rank, as `skein bench`: element round((n - 1) * p)."""
    if not sorted_us:
        return 0
    return sorted_us[min(len(sorted_us) - 1, round((len(sorted_us) - 1) * p))]


def v2_json_body(model):
    """The V2 JSON request, float32 values in their shortest form (as skein's own encoder)."""
    x = case_input(model)
    data = ",".join(str(v) for v in x.astype(np.float32).ravel())
    shape = ",".join(str(d) for d in x.shape)
    return (
        '{"inputs":[{"name":"x","datatype":"FP32","shape":[%s],"data":[%s]}]}' % (shape, data)
    ).encode()


def v2_binary_body(model):
    """The V2 binary-tensor request (KServe's binary data extension): a JSON header that gives
    the tensor's byte size, then its raw little-endian bytes; the output asked for in binary
    too. Returns (body, length of the JSON header)."""
    x = np.ascontiguousarray(case_input(model).astype("<f4"))
    raw = x.tobytes()
    head = json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": MODELS[model]["output"], "parameters": {"binary_data": True}}],
    }, separators=(",", ":")).encode()
    return head + raw, len(head)


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
    length, chunked, headers = None, False, {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        headers[k] = v.strip()
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
                return status, headers, bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return status, headers, await reader.readexactly(length or 0)


def check_output(model, headers, body):
    """The served answer must be the reference output, within the tolerance, whether it came
    back as JSON or as binary tensors."""
    name = MODELS[model]["output"]
    hlen = headers.get(b"inference-header-content-length")
    if hlen is not None:
        head, raw = json.loads(body[: int(hlen)]), body[int(hlen):]
        offset = 0
        for o in head["outputs"]:
            size = o.get("parameters", {}).get("binary_data_size", 0)
            if o["name"] == name:
                got = np.frombuffer(raw[offset:offset + size], dtype="<f4")
            offset += size
    else:
        got = [o for o in json.loads(body)["outputs"] if o["name"] == name][0]["data"]
        got = np.array(got, dtype=np.float32)
    np.testing.assert_allclose(got.ravel(), case_output(model).ravel(), atol=ATOL, rtol=RTOL)


async def load_run(host, port, model, request, concurrency, duration):
    conns = []
    for _ in range(concurrency):
        conns.append(await asyncio.wait_for(asyncio.open_connection(host, port), 10))
    # Warm-up on every connection, and a check of the answer.
    for reader, writer in conns:
        for _ in range(3):
            writer.write(request)
            status, headers, body = await asyncio.wait_for(read_response(reader), 30)
            if status != 200:
                raise RuntimeError(f"warm-up answered {status}: {body[:300]!r}")
    check_output(model, headers, body)
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + duration

    async def worker(reader, writer):
        lat, errors = [], 0
        while time.perf_counter() < deadline:
            s = time.perf_counter_ns()
            writer.write(request)
            status, _, _ = await asyncio.wait_for(read_response(reader), 60)
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
    if a.encoding == "binary":
        body, hlen = v2_binary_body(a.model)
        extra = (f"Content-Type: application/octet-stream\r\n"
                 f"Inference-Header-Content-Length: {hlen}\r\n")
    else:
        body, extra = v2_json_body(a.model), "Content-Type: application/json\r\n"
    host, port = a.addr.rsplit(":", 1)
    head = (
        f"POST {infer_path(a.model)} HTTP/1.1\r\nHost: {a.addr}\r\n{extra}"
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
    print(json.dumps(asyncio.run(
        load_run(host, int(port), a.model, request, a.concurrency, a.duration))))


# ---------------------------------------------------------------------------------------------
# floor: onnxruntime in-process, the peers' floor (and the bar for Skein's SDK).


def ort_session(model, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_path(model)), so, providers=["CPUExecutionProvider"])


def mode_floor(a):
    sess = ort_session(a.model, 1)
    x = case_input(a.model)
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
# The Ray Serve app: V2 JSON only (Ray Serve has no V2 protocol of its own; this app is the
# peer's best case for JSON).


def ray_app(model, replicas):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    @serve.deployment(name=model, num_replicas=replicas, ray_actor_options={"num_cpus": 1})
    class Model:
        def __init__(self, model_name, model_file):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.name = model_name
            self.sess = ort.InferenceSession(model_file, so, providers=["CPUExecutionProvider"])
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
                "model_name": self.name,
                "model_version": "1",
                "outputs": [{
                    "name": self.out_name,
                    "datatype": "FP32",
                    "shape": list(y.shape),
                    "data": y.ravel().tolist(),
                }],
            }
            return Response(self.dumps(out), media_type="application/json")

    return Model.bind(model, str(model_path(model)))


# ---------------------------------------------------------------------------------------------
# pytriton-serve: PyTriton (NVIDIA's Triton Inference Server, its HTTP front end and core, with
# the model in Python) serving the models with onnxruntime, run as a child process.


def mode_pytriton_serve(a):
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_address="127.0.0.1", http_port=a.port, grpc_address="127.0.0.1",
                          grpc_port=a.grpc_port, metrics_port=a.metrics_port, log_verbose=0)

    def infer_fn(model, sess):
        out_name = MODELS[model]["output"]

        def infer(requests):
            return [{out_name: sess.run(None, {"x": r["x"]})[0]} for r in requests]

        return infer

    with Triton(config=config) as triton:
        for model in a.models.split(","):
            out = case_output(model)
            # One onnxruntime session per instance, one intra-op thread each: as the other
            # systems run them (one per core).
            triton.bind(
                model_name=model,
                infer_func=[infer_fn(model, ort_session(model, 1)) for _ in range(a.instances)],
                inputs=[Tensor(name="x", dtype=np.float32, shape=(-1, 3, -1, -1))],
                outputs=[Tensor(name=MODELS[model]["output"], dtype=np.float32,
                                shape=(-1,) * out.ndim)],
                config=ModelConfig(batching=False),
                strict=False,
            )
        print("PYTRITON READY", flush=True)
        triton.serve()


# ---------------------------------------------------------------------------------------------
# main: the orchestrator.


# Which cores the servers (and the in-process floor) run on, and which the load generator and
# the SDK client run on: set by main from --server-cpus / --client-cpus.
CPUS = {"server": None, "client": None}


def pinned(role):
    """A preexec_fn that pins the child to the role's cores (None: no pinning)."""
    cpus = CPUS[role]
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def child(mode, *args, timeout, role):
    out = subprocess.run(
        [sys.executable, __file__, mode, *map(str, args)],
        check=True, capture_output=True, text=True, timeout=timeout, preexec_fn=pinned(role),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_http(addr, key_file, model, encoding, conc, duration):
    args = ["--addr", addr, "--model", model, "--encoding", encoding, "--concurrency", conc,
            "--duration", duration]
    if key_file:
        args += ["--key-file", key_file]
    return child("load", *args, timeout=duration + 120, role="client")


def wait_for_line(proc, log_path, line, what):
    deadline = time.monotonic() + START_TIMEOUT_S
    while line not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n" + log_path.read_text()[-4000:])
        time.sleep(0.1)


def floors(models, concs, duration):
    """onnxruntime in-process for each model and concurrency, while no server runs."""
    return {(m, c): child("floor", "--model", m, "--concurrency", c, "--duration", duration,
                          timeout=duration + 120, role="server")
            for m in models for c in concs}


def sdk_bench(a, model, profile, duration, concurrency=1):
    """`skein bench` through the Rust SDK (the mesh, no HTTP), pinned to the client core."""
    out = subprocess.run(
        [a.skein, "--profile", profile, "bench", model, "--input",
         f"x={REPO / 'models' / model / 'cases' / MODELS[model]['case'] / 'input_0.npy'}",
         "--concurrency", str(concurrency), "--duration", f"{duration}s", "--output", "json",
         "--no-inprocess"],
        check=True, capture_output=True, text=True, timeout=4 * duration + 180,
        preexec_fn=pinned("client"),
    )
    return json.loads(out.stdout)


def sdk_pairs(a, model, profile):
    """The SDK's overhead at concurrency 1 from adjacent pairs: `--pairs` times, the
    in-process floor for `--pair-duration` s (the server idle) and right after it the SDK for
    as long. A host whose speed drifts (this development VM's floor moves between about 820
    and 1 140 µs from one few-second window to the next, nothing else running) makes a floor
    taken minutes before the SDK point a poor bar; a pair's two halves are seconds apart. The
    goal is judged on the median of the pairs' overheads; every pair is kept in the JSON."""
    pairs = []
    for _ in range(a.pairs):
        f = child("floor", "--model", model, "--concurrency", 1, "--duration", a.pair_duration,
                  timeout=a.pair_duration + 120, role="server")
        b = sdk_bench(a, model, profile, a.pair_duration)
        pairs.append({"floor_p50_us": f["p50_us"], "sdk_p50_us": b["p50_us"],
                      "overhead_us": b["p50_us"] - f["p50_us"]})
    # The true median (the mean of the middle two for an even count), not the nearest rank,
    # which would pick the lower middle pair.
    return {"pairs": pairs,
            "median_overhead_us": statistics.median(p["overhead_us"] for p in pairs)}


def skein_phase(a, models, encodings, concs, floor, tmp):
    port = free_port()
    data = tmp / "skein"
    profile = data / "profile.toml"
    log_path = tmp / "skein-up.log"
    log = open(log_path, "w")
    cmd = [a.skein, "up", "--data-dir", data / "data", "--listen", "127.0.0.1:0",
           "--http", f"127.0.0.1:{port}", "--profile", profile, "--backend", a.skein_backend,
           "--ort-threads", "1", "--nodes", str(a.replicas)]
    if a.ort_lib:
        cmd += ["--ort-lib", a.ort_lib]
    up = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                          preexec_fn=pinned("server"))
    rows = []
    try:
        wait_for_line(up, log_path, "KServe V2 HTTP gateway on", "skein up")
        key = data / "data/coordinator/admin-key"
        for m in models:
            for c in concs:
                # Through the Rust SDK (the mesh, no HTTP), then each HTTP encoding.
                b = sdk_bench(a, m, profile, a.duration, c)
                sdk = {"p50_us": b["p50_us"], "p99_us": b["p99_us"],
                       "throughput_rps": b["throughput_rps"], "errors": 0,
                       "client_cpu_us_per_req": float("nan")}
                rows.append({"system": "skein", "via": "sdk", "model": m, "concurrency": c,
                             "served": sdk, "floor": floor[(m, c)], "load_avg_1m": loadavg()})
                if c == 1 and a.pairs:
                    rows[-1]["pairs"] = sdk_pairs(a, m, profile)
                report_point(rows[-1])
                for enc in encodings:
                    load0 = loadavg()
                    served = measure_http(f"127.0.0.1:{port}", key, m, enc, c, a.duration)
                    rows.append({"system": "skein", "via": enc, "model": m, "concurrency": c,
                                 "served": served, "floor": floor[(m, c)], "load_avg_1m": load0})
                    report_point(rows[-1])
    finally:
        stop(up)
        log.close()
    return rows


def pytriton_phase(a, models, encodings, concs, floor, tmp):
    port = free_port()
    log_path = tmp / "pytriton.log"
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, __file__, "pytriton-serve", "--port", str(port),
         "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
         "--models", ",".join(models), "--instances", str(a.replicas)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=pinned("server"),
    )
    rows = []
    try:
        wait_for_line(server, log_path, "PYTRITON READY", "PyTriton")
        for m in models:
            for c in concs:
                for enc in encodings:
                    load0 = loadavg()
                    served = measure_http(f"127.0.0.1:{port}", None, m, enc, c, a.duration)
                    rows.append({"system": "pytriton", "via": enc, "model": m, "concurrency": c,
                                 "served": served, "floor": floor[(m, c)], "load_avg_1m": load0})
                    report_point(rows[-1])
    finally:
        # PyTriton starts tritonserver and its Python stubs: stop the whole process group.
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
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


def ray_phase(a, models, concs, floor, tmp):
    import ray
    from ray import serve

    port = free_port()
    rows = []
    # Ray's processes (raylet, proxy, replicas) inherit this driver's cores: the server's.
    # The load generator is pinned to the client's by `child`.
    everything = os.sched_getaffinity(0)
    if CPUS["server"]:
        os.sched_setaffinity(0, CPUS["server"])
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
        for m in models:
            serve.run(ray_app(m, a.replicas), name=m, route_prefix=f"/v2/models/{m}",
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
            for c in concs:
                load0 = loadavg()
                served = measure_http(f"127.0.0.1:{port}", None, m, "json", c, a.duration)
                rows.append({"system": "ray", "via": "json", "model": m, "concurrency": c,
                             "served": served, "floor": floor[(m, c)], "load_avg_1m": load0})
                report_point(rows[-1])
            serve.delete(m)
        # The orderly stop only on success: after an error or a signal (which `timeout` also
        # sends to Ray's own processes) serve.shutdown waits 30 s for a controller that may be
        # gone; ray.shutdown alone stops the local cluster this driver started.
        serve.shutdown()
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, everything)
    return rows


def report_point(r):
    s, f = r["served"], r["floor"]
    print(f"  {r['system']:<8} {r['model']} {r['via']:<6} c={r['concurrency']:<2} "
          f"p50 {s['p50_us']} µs, p99 {s['p99_us']} µs, {s['throughput_rps']:.1f} req/s, "
          f"errors {s['errors']}; onnxruntime in-process p50 {f['p50_us']} µs, "
          f"{f['throughput_rps']:.1f} req/s; load avg {r['load_avg_1m']:.2f}",
          file=sys.stderr, flush=True)


LABELS = {
    ("skein", "sdk"): "Skein, Rust SDK → mesh → node",
    ("skein", "binary"): "Skein, HTTP binary tensors → gateway → mesh → node",
    ("skein", "json"): "Skein, HTTP JSON → gateway → mesh → node",
    ("pytriton", "binary"): "PyTriton, HTTP binary tensors → Triton → Python model",
    ("pytriton", "json"): "PyTriton, HTTP JSON → Triton → Python model",
    ("ray", "json"): "Ray Serve, HTTP JSON → proxy → replica",
}


def table(rows, models, concs):
    """Markdown, ready to paste. The in-process p50 (and so the overhead) only at concurrency 1:
    with N > 1 Python threads the onnxruntime floor's waits for the GIL fall outside the timed
    call, so its p50 there is not comparable (its req/s is)."""
    by = {(r["system"], r["via"], r["model"], r["concurrency"]): r for r in rows}
    lines = []
    for m in models:
        lines += [
            f"**{m}**", "",
            "| path | concurrency | p50 µs | p99 µs | req/s | onnxruntime in-process p50 µs "
            "| in-process req/s | overhead p50 µs | req/s ÷ in-process req/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (system, via), label in LABELS.items():
            for c in concs:
                r = by.get((system, via, m, c))
                if not r:
                    continue
                s, f = r["served"], r["floor"]
                first = c == 1
                lines.append(
                    f"| {label} | {c} | {s['p50_us']} | {s['p99_us']} "
                    f"| {s['throughput_rps']:.1f} | {f['p50_us'] if first else '—'} "
                    f"| {f['throughput_rps']:.1f} | {s['p50_us'] - f['p50_us'] if first else '—'} "
                    f"| {s['throughput_rps'] / f['throughput_rps']:.2f} |")
        lines.append("")
    lines += ["| goal | model | measured | met |", "|---|---|---|---|"]
    for m in models:
        k1, t1 = by.get(("skein", "binary", m, 1)), by.get(("pytriton", "binary", m, 1))
        if k1 and t1:
            ratio = k1["served"]["p50_us"] / t1["served"]["p50_us"]
            lines.append(f"| HTTP binary p50 at c=1, Skein ÷ PyTriton ≤ 0.7 | {m} "
                         f"| {ratio:.2f} | {'yes' if ratio <= 0.7 else 'no'} |")
        c = max(concs)
        k, t = by.get(("skein", "binary", m, c)), by.get(("pytriton", "binary", m, c))
        if k and t:
            ratio = k["served"]["throughput_rps"] / t["served"]["throughput_rps"]
            lines.append(f"| HTTP binary req/s at c={c}, Skein ÷ PyTriton ≥ 1.5 | {m} "
                         f"| {ratio:.2f} | {'yes' if ratio >= 1.5 else 'no'} |")
        s1 = by.get(("skein", "sdk", m, 1))
        if s1:
            over = (s1["served"]["p50_us"] - s1["floor"]["p50_us"]) / 1000
            lines.append(f"| SDK p50 at c=1 ≤ onnxruntime in-process p50 + 0.5 ms "
                         f"(the floor measured first) | {m} "
                         f"| {over:+.2f} ms | {'yes' if over <= 0.5 else 'no'} |")
        if s1 and s1.get("pairs"):
            p = s1["pairs"]
            over = p["median_overhead_us"] / 1000
            each = ", ".join(f"{q['sdk_p50_us']}−{q['floor_p50_us']}" for q in p["pairs"])
            lines.append(f"| SDK p50 at c=1 ≤ onnxruntime in-process p50 + 0.5 ms "
                         f"(median of {len(p['pairs'])} adjacent pairs, SDK−floor µs: {each}) "
                         f"| {m} | {over:+.2f} ms | {'yes' if over <= 0.5 else 'no'} |")
    return "\n".join(lines)


def mode_main(a):
    concs = [int(c) for c in a.concurrency.split(",")]
    models = a.models.split(",")
    cpus = sorted(os.sched_getaffinity(0))
    if a.server_cpus != "all":
        CPUS["server"] = {int(c) for c in a.server_cpus.split(",")}
        CPUS["client"] = {int(c) for c in a.client_cpus.split(",")}
        for c in CPUS["server"] | CPUS["client"]:
            if c not in cpus:
                raise SystemExit(f"core {c} is not one this process may use ({cpus})")
    encodings = a.encodings.split(",")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r} ({', '.join(MODELS)})")
    rows = []
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="skein-sbs-"))
    print(f"== {', '.join(models)}; {', '.join(encodings)}; {a.duration} s per point, "
          f"concurrency {concs}; work dir {tmp}", file=sys.stderr, flush=True)
    try:
        print("== onnxruntime in-process (the floor), no server running", file=sys.stderr,
              flush=True)
        floor = floors(models, concs, a.duration)
        for system in a.systems.split(","):
            if system == "skein":
                print(f"== Skein: skein up --backend {a.skein_backend} --nodes {a.replicas} "
                      "(coordinator, nodes, gateway)", file=sys.stderr, flush=True)
                rows += skein_phase(a, models, encodings, concs, floor, tmp)
            elif system == "pytriton":
                print(f"== PyTriton: {a.replicas} instances per model, onnxruntime "
                      "intra_op_num_threads=1", file=sys.stderr, flush=True)
                rows += pytriton_phase(a, models, encodings, concs, floor, tmp)
            elif system == "ray":
                print(f"== Ray Serve: {a.replicas} replicas per model, onnxruntime "
                      "intra_op_num_threads=1", file=sys.stderr, flush=True)
                rows += ray_phase(a, models, concs, floor, tmp)
            else:
                raise SystemExit(f"unknown system {system!r} (skein, pytriton, ray)")
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    import onnxruntime

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "skein backend": a.skein_backend,
        "server cores": a.server_cpus,
        "load generator cores": a.client_cpus if a.server_cpus != "all" else "all",
        "instances per system": a.replicas,
        "python": sys.version.split()[0],
        "duration_s": a.duration,
        "load_avg_1m_at_end": loadavg(),
    }
    for pkg in ("ray", "pytriton"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except (ImportError, AttributeError):
            pass
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print(", ".join(f"{k} {v}" for k, v in meta.items()))
    print()
    print(table(rows, models, concs))


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
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the `finally` blocks stop every system.
    signal.signal(signal.SIGTERM, on_sigterm)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    m = sub.add_parser("main")
    m.add_argument("--skein", default=str(REPO / "target/release/skein"))
    m.add_argument("--skein-backend", default="ort", help="skein up --backend (ort, tract)")
    m.add_argument("--ort-lib", help="skein up --ort-lib: the libonnxruntime.so to load")
    m.add_argument("--duration", type=float, default=10.0)
    m.add_argument("--concurrency", default="1,4,16")
    m.add_argument("--models", default="ppocr_cls,ppocr_det")
    m.add_argument("--encodings", default="binary,json", help="HTTP bodies (binary, json)")
    m.add_argument("--systems", default="skein,pytriton,ray", help="which, in this order")
    m.add_argument("--replicas", type=int, default=1,
                   help="skein up --nodes, PyTriton instances and Ray replicas per model")
    m.add_argument("--server-cpus", default="0",
                   help="cores the servers and the in-process floor run on (or 'all')")
    m.add_argument("--client-cpus", default="1",
                   help="cores the load generator and the SDK client run on")
    m.add_argument("--pairs", type=int, default=5,
                   help="adjacent floor/SDK pairs for the SDK goal at c=1 (0: none)")
    m.add_argument("--pair-duration", type=float, default=3.0,
                   help="seconds of each half of a pair")
    m.add_argument("--json", help="also write every figure to this file")
    m.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    ld = sub.add_parser("load")
    ld.add_argument("--addr", required=True)
    ld.add_argument("--key-file")
    ld.add_argument("--model", required=True, choices=list(MODELS))
    ld.add_argument("--encoding", default="json", choices=["json", "binary"])
    ld.add_argument("--concurrency", type=int, required=True)
    ld.add_argument("--duration", type=float, required=True)
    fl = sub.add_parser("floor")
    fl.add_argument("--model", required=True, choices=list(MODELS))
    fl.add_argument("--concurrency", type=int, required=True)
    fl.add_argument("--duration", type=float, required=True)
    pt = sub.add_parser("pytriton-serve")
    pt.add_argument("--port", type=int, required=True)
    pt.add_argument("--grpc-port", type=int, required=True)
    pt.add_argument("--metrics-port", type=int, required=True)
    pt.add_argument("--models", required=True)
    pt.add_argument("--instances", type=int, default=2)
    modes = {"main": mode_main, "load": mode_load, "floor": mode_floor,
             "pytriton-serve": mode_pytriton_serve}
    a = p.parse_args(sys.argv[1:] if len(sys.argv) > 1 and sys.argv[1] in modes
                     else ["main", *sys.argv[1:]])
    modes[a.mode](a)


if __name__ == "__main__":
    main()
