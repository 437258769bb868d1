#!/usr/bin/env python3
"""Write NumPy .npy copies (input_<i>.npy, output_<i>.npy) of every reference case's raw .bin
tensors, so that `skein infer --input NAME=FILE.npy` can use them. Standard library only.

    python3 models/tools/cases_to_npy.py models
"""
import json, pathlib, struct, sys

DESCR = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8", "int32": "<i4",
         "int16": "<i2", "int8": "|i1", "uint8": "|u1", "uint16": "<u2", "uint32": "<u4",
         "uint64": "<u8", "bool": "|b1"}

def npy(dtype, shape, raw):
    dims = ", ".join(str(d) for d in shape)
    if len(shape) == 1:
        dims += ","
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (DESCR[dtype], dims)
    pad = (64 - (10 + len(header) + 1) % 64) % 64
    header = header + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + raw

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "models")
for case in sorted(root.glob("*/cases/*/case.json")):
    meta = json.loads(case.read_text())
    for kind in ("inputs", "outputs"):
        for i, t in enumerate(meta[kind]):
            raw = (case.parent / t["file"]).read_bytes()
            out = case.parent / f"{kind[:-1]}_{i}.npy"
            out.write_bytes(npy(t["dtype"], t["shape"], raw))
            print(out, t["name"], t["shape"])
