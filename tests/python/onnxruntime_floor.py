#!/usr/bin/env python3
"""The in-process floor of the peer: onnxruntime (one thread) on ppocr_cls's reference input,
p50 and throughput over SECONDS, as JSON.

Usage: onnxruntime_floor.py MODEL.onnx INPUT.npy SECONDS
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort

model, x, secs = sys.argv[1], np.load(sys.argv[2]), float(sys.argv[3])
so = ort.SessionOptions()
so.intra_op_num_threads = 1
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
for _ in range(20):
    sess.run(None, {name: x})
lat = []
t0 = time.perf_counter()
while time.perf_counter() - t0 < secs:
    t = time.perf_counter()
    sess.run(None, {name: x})
    lat.append(time.perf_counter() - t)
elapsed = time.perf_counter() - t0
lat.sort()
print(json.dumps({
    "p50_us": int(lat[len(lat) // 2] * 1e6),
    "p99_us": int(lat[int(len(lat) * 0.99)] * 1e6),
    "throughput_rps": len(lat) / elapsed,
}))
