#!/usr/bin/env python3
"""ppocr_cls served by NVIDIA PyTriton (Triton Inference Server from the PyPI wheel, CPU only),
with onnxruntime on one thread, under the same V2 name and input as Skein serves it, so that one
load generator (`skein bench --http`) drives both.

Usage: pytriton_server.py MODEL.onnx HTTP_PORT     (prints `ready` when serving)
"""
import sys

import numpy as np
import onnxruntime as ort
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main():
    model, port = sys.argv[1], int(sys.argv[2])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    out = sess.get_outputs()[0].name

    def infer(requests):
        return [{"y": sess.run([out], {inp: r[inp]})[0]} for r in requests]

    cfg = TritonConfig(http_port=port, grpc_port=port + 1, metrics_port=port + 2)
    with Triton(config=cfg) as triton:
        triton.bind(
            model_name="ppocr_cls",
            infer_func=infer,
            inputs=[Tensor(name=inp, dtype=np.float32, shape=(-1, 3, 48, 192))],
            outputs=[Tensor(name="y", dtype=np.float32, shape=(-1, 2))],
            config=ModelConfig(batching=False),
        )
        print("ready", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
