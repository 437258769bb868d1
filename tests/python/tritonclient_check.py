#!/usr/bin/env python3
"""The real `tritonclient.http` client against a `skein up` gateway: health, metadata, JSON and
binary inference on the bundled models, compared to the reference cases.

The mesh is secure by default: every call but the health probes carries the API key, as a
`Bearer` header on the everyday client and through tritonclient's own `BasicAuth` plugin (the key
as password) on a second one; without it the gateway answers 401.

Usage: tritonclient_check.py HOST:PORT MODELS_DIR API_KEY_FILE
"""
import json
import pathlib
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.http.auth import BasicAuth

ATOL, RTOL = 1e-3, 1e-2
NP_TO_V2 = {np.float32: "FP32", np.int64: "INT64", np.float64: "FP64", np.int32: "INT32"}


def case_tensors(case_dir, kind):
    meta = json.loads((case_dir / "case.json").read_text())
    out = []
    for i, t in enumerate(meta[kind]):
        name = t["name"] if isinstance(t, dict) else t
        out.append((name, np.load(case_dir / f"{kind[:-1]}_{i}.npy")))
    return out


def infer(client, model, inputs, binary, headers):
    # tritonclient writes Inference-Header-Content-Length into the dict it is given: a copy
    # per call, or the next call carries the previous call's length.
    headers = dict(headers)
    ins = []
    for name, arr in inputs:
        inp = httpclient.InferInput(name, list(arr.shape), NP_TO_V2[arr.dtype.type])
        inp.set_data_from_numpy(arr, binary_data=binary)
        ins.append(inp)
    if binary:
        # tritonclient's everyday call: binary inputs, all outputs asked for in binary.
        return client.infer(model, ins, headers=headers)
    meta = client.get_model_metadata(model, headers=headers)
    outs = [httpclient.InferRequestedOutput(o["name"], binary_data=False) for o in meta["outputs"]]
    return client.infer(model, ins, outputs=outs, request_id="py-1", headers=headers)


def status_of(call):
    try:
        call()
    except httpclient.InferenceServerException as e:
        return str(e.status())
    raise AssertionError("the call must fail")


def main():
    url, models = sys.argv[1], pathlib.Path(sys.argv[2])
    key = pathlib.Path(sys.argv[3]).read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    client = httpclient.InferenceServerClient(url=url)
    # Probes need no key; everything else does.
    assert client.is_server_live(), "server live"
    assert client.is_server_ready(), "server ready"
    assert status_of(lambda: client.get_server_metadata()) == "401"
    assert status_of(lambda: client.get_model_metadata("ppocr_cls")) == "401"
    bad = {"Authorization": "Bearer skn_000000000000_" + "0" * 64}
    assert status_of(lambda: client.get_model_metadata("ppocr_cls", headers=bad)) == "401"
    meta = client.get_server_metadata(headers=headers)
    assert "binary_tensor_data" in meta["extensions"], meta
    # tritonclient's own auth plugin: HTTP Basic, the API key as password.
    basic = httpclient.InferenceServerClient(url=url)
    basic.register_plugin(BasicAuth("skein", key))
    assert basic.get_model_metadata("ppocr_cls")["name"] == "ppocr_cls"
    checked = 0
    for model in ["ppocr_cls", "ppocr_det", "silero_vad"]:
        assert client.is_model_ready(model, headers=headers), model
        md = client.get_model_metadata(model, headers=headers)
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
                res = infer(client, model, inputs, binary, headers)
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
        client.get_model_metadata("no_such_model", headers=headers)
        raise AssertionError("unknown model must fail")
    except httpclient.InferenceServerException as e:
        assert str(e.status()) == "404", (e.status(), str(e))
    print(f"tritonclient check: {checked} passed, 0 failed")


if __name__ == "__main__":
    main()
