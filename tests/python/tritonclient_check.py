#!/usr/bin/env python3
"""The real `tritonclient.http` client against a `skein up` gateway: health, metadata, JSON and
binary inference on the bundled models, compared to the reference cases.

Usage: tritonclient_check.py HOST:PORT MODELS_DIR
"""
import json
import pathlib
import sys

import numpy as np
import tritonclient.http as httpclient

ATOL, RTOL = 1e-3, 1e-2
NP_TO_V2 = {np.float32: "FP32", np.int64: "INT64", np.float64: "FP64", np.int32: "INT32"}


def case_tensors(case_dir, kind):
    meta = json.loads((case_dir / "case.json").read_text())
    out = []
    for i, t in enumerate(meta[kind]):
        name = t["name"] if isinstance(t, dict) else t
        out.append((name, np.load(case_dir / f"{kind[:-1]}_{i}.npy")))
    return out


def infer(client, model, inputs, binary):
    ins = []
    for name, arr in inputs:
        inp = httpclient.InferInput(name, list(arr.shape), NP_TO_V2[arr.dtype.type])
        inp.set_data_from_numpy(arr, binary_data=binary)
        ins.append(inp)
    if binary:
        # tritonclient's everyday call: binary inputs, all outputs asked for in binary.
        return client.infer(model, ins)
    meta = client.get_model_metadata(model)
    outs = [httpclient.InferRequestedOutput(o["name"], binary_data=False) for o in meta["outputs"]]
    return client.infer(model, ins, outputs=outs, request_id="py-1")


def main():
    url, models = sys.argv[1], pathlib.Path(sys.argv[2])
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server live"
    assert client.is_server_ready(), "server ready"
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"], meta
    checked = 0
    for model in ["ppocr_cls", "ppocr_det", "silero_vad"]:
        assert client.is_model_ready(model), model
        md = client.get_model_metadata(model)
        assert md["name"] == model and md["inputs"] and md["outputs"], md
        if model == "silero_vad":
            sr = [i for i in md["inputs"] if i["name"] == "sr"][0]
            assert sr["datatype"] == "INT64" and sr["shape"] == [], sr
        for case_dir in sorted((models / model / "cases").iterdir()):
            if not (case_dir / "case.json").is_file():
                continue
            inputs = case_tensors(case_dir, "inputs")
            expected = case_tensors(case_dir, "outputs")
            for binary in (False, True):
                res = infer(client, model, inputs, binary)
                for name, want in expected:
                    got = res.as_numpy(name)
                    assert got is not None, f"{model}/{case_dir.name}: no output {name}"
                    assert got.shape == want.shape, f"{model}/{case_dir.name} {name}: {got.shape} vs {want.shape}"
                    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL,
                                               err_msg=f"{model}/{case_dir.name} {name} binary={binary}")
                if not binary:
                    assert res.get_response()["id"] == "py-1"
                checked += 1
    # An error is an exception with the server's message, not a hang or a 500.
    try:
        client.get_model_metadata("no_such_model")
        raise AssertionError("unknown model must fail")
    except httpclient.InferenceServerException as e:
        assert str(e.status()) == "404", (e.status(), str(e))
    print(f"tritonclient check: {checked} passed, 0 failed")


if __name__ == "__main__":
    main()
