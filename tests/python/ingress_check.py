#!/usr/bin/env python3
"""The real `tritonclient.http` client against a node's HTTP ingress (`skein-node --http`).

A mesh of an edge node (running the real `skein-node` binary with `--http`) where `ppocr_cls` is
loaded, and a cloud node where only `ppocr_det` is loaded. Checks, with tritonclient unmodified:
- `ppocr_cls` is served by the edge node itself (the answer's `parameters` say `skein_path:
  local` and name the edge node), outputs equal to the reference case;
- `ppocr_det` is forwarded to the cloud node (`skein_path: mesh`) and correct;
- a wrong key and no key get 401, and the node asks the coordinator once per key however often
  they come (the node's `skein_node_ingress_key_checks_total` on its metrics port);
- a key revoked at the coordinator (its admin REST API) is refused at the node within one
  heartbeat interval of the revocation (plus the call's own time), far below the key TTL.

Usage: ingress_check.py NODE_HOST:PORT NODE_METRICS_URL COORD_GATEWAY_URL ADMIN_KEY_FILE MODELS_DIR
       EDGE_NODE_ID CLOUD_NODE_ID HEARTBEAT_MS
"""
import json
import pathlib
import sys
import time
import urllib.request

import numpy as np
import tritonclient.http as httpclient

ATOL, RTOL = 1e-3, 1e-2
NP_TO_V2 = {np.float32: "FP32", np.int64: "INT64"}


def case_tensors(case_dir, kind):
    meta = json.loads((case_dir / "case.json").read_text())
    out = []
    for i, t in enumerate(meta[kind]):
        name = t["name"] if isinstance(t, dict) else t
        out.append((name, np.load(case_dir / f"{kind[:-1]}_{i}.npy")))
    return out


def infer(client, model, inputs, headers, binary=True):
    ins = []
    for name, arr in inputs:
        inp = httpclient.InferInput(name, list(arr.shape), NP_TO_V2[arr.dtype.type])
        inp.set_data_from_numpy(arr, binary_data=binary)
        ins.append(inp)
    return client.infer(model, ins, headers=dict(headers))


def check_case(client, models, model, case, headers):
    case_dir = models / model / "cases" / case
    res = infer(client, model, case_tensors(case_dir, "inputs"), headers)
    for name, want in case_tensors(case_dir, "outputs"):
        got = res.as_numpy(name)
        assert got is not None, f"{model}/{case}: no output {name}"
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"{model}/{case} {name}")
    return res.get_response().get("parameters", {})


def status_of(call):
    try:
        call()
    except httpclient.InferenceServerException as e:
        return str(e.status())
    return "200"


def key_checks(metrics_url):
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("skein_node_ingress_key_checks_total"):
            return int(float(line.split()[-1]))
    raise AssertionError("no skein_node_ingress_key_checks_total in the node's metrics")


def admin(url, key, method, path, body=None):
    req = urllib.request.Request(
        url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def main():
    (url, metrics_url, coord_url, admin_key_file, models, edge, cloud, hb_ms) = sys.argv[1:9]
    models, hb = pathlib.Path(models), int(hb_ms) / 1000.0
    admin_key = pathlib.Path(admin_key_file).read_text().strip()
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live() and client.is_server_ready()

    new = admin(coord_url, admin_key, "POST", "/admin/v1/keys", {"scopes": ["invoke"], "label": "py"})
    key_id, key = new["id"], new["key"]
    headers = {"Authorization": f"Bearer {key}"}

    # Loaded here: the edge node serves it itself.
    p = check_case(client, models, "ppocr_cls", "single", headers)
    assert p.get("skein_path") == "local" and p.get("skein_node") == edge, p
    # Loaded only in the cloud: forwarded over the mesh, and correct.
    p = check_case(client, models, "ppocr_det", "single_256", headers)
    assert p.get("skein_path") == "mesh" and p.get("skein_node") == cloud, p

    # Wrong and missing keys: 401, one check per key at the coordinator.
    before = key_checks(metrics_url)
    case = models / "ppocr_cls" / "cases" / "single"
    inputs = case_tensors(case, "inputs")
    wrong = {"Authorization": "Bearer skn_000000000000_" + "0" * 64}
    for _ in range(5):
        assert status_of(lambda: infer(client, "ppocr_cls", inputs, wrong)) == "401"
        assert status_of(lambda: infer(client, "ppocr_cls", inputs, {})) == "401"
    checks = key_checks(metrics_url) - before
    assert checks == 2, f"{checks} key checks for two keys used five times each"

    # Revoked at the coordinator: refused at the node within one heartbeat.
    admin(coord_url, admin_key, "DELETE", f"/admin/v1/keys/{key_id}")
    revoked = time.monotonic()
    while status_of(lambda: infer(client, "ppocr_cls", inputs, headers)) != "401":
        assert time.monotonic() - revoked < 30, "the revoked key is still served after 30 s"
        time.sleep(0.01)
    took = time.monotonic() - revoked
    # One heartbeat interval (±10 % jitter), plus the calls' own time on a loaded machine.
    assert took < 3 * hb + 1.0, f"revocation took {took:.3f} s, heartbeat every {hb:.3f} s"
    print(f"ingress check: local and forwarded calls correct, {checks} key checks for 2 keys, "
          f"revoked key refused after {took * 1000:.0f} ms (heartbeat {hb * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
