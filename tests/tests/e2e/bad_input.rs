//! Every kind of bad input gets a typed error a user can act on, and the mesh stays up.

use skein_client::{Error, InferOptions};
use skein_net::endpoint::{client_config, connect, TransportLimits};
use skein_proto::{
    Capacity, CtlRequest, DataType, DeployRequest, ErrorCode, Heartbeat, InferRequest,
    InferResponse, Tensor, TensorDesc, ALPN_INFER,
};
use skein_tests::{model_bytes, models_dir, wire_error, TestMesh};
use std::time::Duration;

fn code(r: Result<impl std::fmt::Debug, Error>) -> ErrorCode {
    match r {
        Err(e) => e.code().unwrap_or_else(|| panic!("untyped error: {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

fn cls_input() -> Tensor {
    let bytes =
        std::fs::read(models_dir().join("ppocr_cls/cases/single/input_0.npy")).expect("case input");
    skein_proto::npy::decode("x", &bytes).expect("npy")
}

fn zeros(name: &str, shape: Vec<u64>) -> Tensor {
    let n: u64 = shape.iter().product();
    Tensor::from_f32(name, shape, &vec![0.0; n as usize]).expect("tensor")
}

/// Node frames limited to 1 MiB so that oversized frames are cheap to produce.
const NODE_MAX_FRAME: u32 = 1 << 20;

async fn mesh() -> anyhow::Result<TestMesh> {
    let mesh = TestMesh::start_with(
        1,
        |c| c.max_upload_bytes = 2 << 20,
        |n| n.max_frame_len = NODE_MAX_FRAME,
    )
    .await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    Ok(mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_errors_are_typed() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let c = &mesh.client;

    assert_eq!(
        code(c.infer("no_such_model", vec![cls_input()]).await),
        ErrorCode::UnknownModel
    );
    let v99 = InferOptions {
        version: Some("99".into()),
        ..Default::default()
    };
    assert_eq!(
        code(c.infer_with("ppocr_cls", vec![cls_input()], v99).await),
        ErrorCode::UnknownVersion
    );

    // Wrong input name, datatype, rank, fixed dimension; missing and extra inputs.
    let mut renamed = cls_input();
    renamed.set_name("y");
    assert_eq!(
        code(c.infer("ppocr_cls", vec![renamed]).await),
        ErrorCode::InvalidInput
    );
    let as_f64 = Tensor::new(
        "x",
        DataType::Fp64,
        vec![1, 3, 48, 96],
        vec![0; 3 * 48 * 96 * 8],
    )?;
    assert_eq!(
        code(c.infer("ppocr_cls", vec![as_f64]).await),
        ErrorCode::InvalidInput
    );
    assert_eq!(
        code(
            c.infer("ppocr_cls", vec![zeros("x", vec![3, 48, 192])])
                .await
        ),
        ErrorCode::InvalidInput
    );
    assert_eq!(
        code(
            c.infer("ppocr_cls", vec![zeros("x", vec![1, 4, 48, 192])])
                .await
        ),
        ErrorCode::InvalidInput
    );
    assert_eq!(
        code(c.infer("ppocr_cls", vec![]).await),
        ErrorCode::InvalidInput
    );
    assert_eq!(
        code(
            c.infer("ppocr_cls", vec![cls_input(), zeros("extra", vec![1])])
                .await
        ),
        ErrorCode::InvalidInput
    );
    let bad_output = InferOptions {
        outputs: vec!["nope".into()],
        ..Default::default()
    };
    assert_eq!(
        code(
            c.infer_with("ppocr_cls", vec![cls_input()], bad_output)
                .await
        ),
        ErrorCode::InvalidInput
    );

    // Oversized frame: 2.4 MB of input against the node's 1 MiB limit.
    assert_eq!(
        code(
            c.infer("ppocr_cls", vec![zeros("x", vec![1, 3, 48, 4096])])
                .await
        ),
        ErrorCode::FrameTooLarge
    );

    // The same node still answers a good request.
    let r = c.infer("ppocr_cls", vec![cls_input()]).await?;
    assert_eq!(r.outputs[0].shape(), &[1, 2]);
    Ok(())
}

/// Send a hand-made frame straight to the node, bypassing the SDK's checks.
async fn raw_infer(
    mesh: &TestMesh,
    req: &InferRequest,
    payload: &[u8],
) -> anyhow::Result<InferResponse> {
    let r = mesh.client.resolve("ppocr_cls", None).await?;
    let cand = &r.candidates[0];
    let ep = skein_net::client_endpoint("127.0.0.1:0".parse()?)?;
    let cfg = client_config(
        &mesh.profile.credentials(),
        ALPN_INFER,
        &TransportLimits::default(),
    )?;
    let conn = connect(
        &ep,
        cfg,
        cand.addr.parse()?,
        &skein_net::node_server_name(&cand.node_id),
        Duration::from_secs(5),
    )
    .await?;
    let frame = skein_net::stream::call(
        &conn,
        req,
        &[skein_proto::Bytes::copy_from_slice(payload)],
        skein_proto::DEFAULT_MAX_FRAME_LEN,
    )
    .await?;
    Ok(frame.header()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tensors_on_the_wire_are_refused() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let base = InferRequest {
        id: 1,
        model: "ppocr_cls".into(),
        version: None,
        inputs: vec![],
        outputs: vec![],
        timeout_ms: Some(5_000),
        // Tensors are checked as the frame is read, before the route ticket.
        ticket: Default::default(),
        trace: None,
        kind: skein_proto::RequestKind::Infer,
    };
    // A descriptor whose byte length disagrees with its shape.
    let lying = InferRequest {
        inputs: vec![TensorDesc {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 3, 48, 192],
            byte_len: 16,
        }],
        ..base.clone()
    };
    match raw_infer(&mesh, &lying, &[0u8; 16]).await? {
        InferResponse::Err(e) => assert_eq!(e.code, ErrorCode::InvalidTensor, "{e}"),
        other => panic!("{other:?}"),
    }
    // An absurd declared shape (element count overflows) never allocates.
    let huge = InferRequest {
        inputs: vec![TensorDesc {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![u64::MAX, u64::MAX, 2, 2],
            byte_len: 8,
        }],
        ..base.clone()
    };
    match raw_infer(&mesh, &huge, &[0u8; 8]).await? {
        InferResponse::Err(e) => assert_eq!(e.code, ErrorCode::InvalidTensor, "{e}"),
        other => panic!("{other:?}"),
    }
    // Payload shorter than the descriptors announce.
    let short = InferRequest {
        inputs: vec![TensorDesc {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![4],
            byte_len: 16,
        }],
        ..base
    };
    match raw_infer(&mesh, &short, &[0u8; 8]).await? {
        InferResponse::Err(e) => assert_eq!(e.code, ErrorCode::Malformed, "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(mesh
        .client
        .infer("ppocr_cls", vec![cls_input()])
        .await
        .is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_nothing_is_stored() -> anyhow::Result<()> {
    let mesh = mesh().await?;
    let c = &mesh.client;
    // Not ONNX at all.
    assert_eq!(
        code(c.deploy("junk", None, b"this is not a model", |_| {}).await),
        ErrorCode::InvalidModel
    );
    // A real model cut short (its hash matches what is sent, so only the content is wrong).
    let cls = model_bytes("ppocr_cls");
    assert_eq!(
        code(c.deploy("cut", None, &cls[..cls.len() / 2], |_| {}).await),
        ErrorCode::InvalidModel
    );
    // Bytes that do not hash to what the request announced.
    let lie = CtlRequest::Deploy(DeployRequest {
        name: "lie".into(),
        version: None,
        size: cls.len() as u64,
        sha256: "0".repeat(64),
        settings: Default::default(),
    });
    assert_eq!(
        code(c.deploy_raw(&lie, &cls, &mut |_| {}).await),
        ErrorCode::HashMismatch
    );
    // Larger than the coordinator accepts (2 MiB in this mesh).
    assert_eq!(
        code(
            c.deploy("big", None, &model_bytes("ppocr_det"), |_| {})
                .await
        ),
        ErrorCode::UploadTooLarge
    );
    // The upload ends before the announced size.
    let short = CtlRequest::Deploy(DeployRequest {
        name: "short".into(),
        version: None,
        size: cls.len() as u64,
        sha256: "0".repeat(64),
        settings: Default::default(),
    });
    assert_eq!(
        code(c.deploy_raw(&short, &cls[..1000], &mut |_| {}).await),
        ErrorCode::Malformed
    );
    // Bad names, and a version that exists with other content.
    assert_eq!(
        code(c.deploy("../etc", None, &cls, |_| {}).await),
        ErrorCode::Malformed
    );
    let v1 = c
        .models()
        .await?
        .into_iter()
        .find(|m| m.name == "ppocr_cls")
        .expect("deployed");
    // Refused before the bytes are even read: the announced hash differs from the stored one.
    assert_eq!(
        code(
            c.deploy("ppocr_cls", Some(&v1.version), &cls[..1000], |_| {})
                .await
        ),
        ErrorCode::VersionConflict
    );

    let names: Vec<String> = c.models().await?.into_iter().map(|m| m.name).collect();
    assert_eq!(names, vec!["ppocr_cls".to_string()]);
    assert!(c.infer("ppocr_cls", vec![cls_input()]).await.is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_errors_are_typed() -> anyhow::Result<()> {
    let mesh = TestMesh::start(0).await?;
    // A heartbeat from a certificate that belongs to no node.
    let hb = CtlRequest::Heartbeat(Heartbeat {
        addr: "127.0.0.1:9".into(),
        capacity: Capacity::default(),
        labels: Default::default(),
        models: vec![],
        seq: 0,
        draining: false,
        coordinate: None,
        ingress: None,
        usage_unsent: 0,
        peer: None,
        cached: Vec::new(),
    });
    // The test client has no certificate at all: who is heartbeating?
    assert_eq!(
        code(mesh.client.control(&hb).await),
        ErrorCode::Unauthenticated
    );
    let creds = mesh.coordinator().issue_client_credentials("not-a-node")?;
    let with_cert =
        skein_client::Client::connect(&mesh.coordinator().addr().to_string(), creds).await?;
    assert_eq!(code(with_cert.control(&hb).await), ErrorCode::UnknownNode);

    // An expired join token.
    let expired = mesh.coordinator().mint_join_token(Some(Duration::ZERO))?;
    let mut cfg = mesh.node_config(1);
    cfg.join_token = Some(expired);
    let e = skein_node::Node::start(cfg)
        .await
        .expect_err("expired token");
    assert_eq!(
        wire_error(&e).map(|w| w.code),
        Some(ErrorCode::ExpiredJoinToken),
        "{e:#}"
    );

    // A token this coordinator never issued, and one for another mesh's CA.
    let good = mesh.coordinator().mint_join_token(None)?;
    let forged = format!(
        "skein1-{}-{}",
        "0".repeat(32),
        good.rsplit('-').next().expect("fp")
    );
    let mut cfg = mesh.node_config(2);
    cfg.join_token = Some(forged);
    let e = skein_node::Node::start(cfg)
        .await
        .expect_err("unknown token");
    assert_eq!(
        wire_error(&e).map(|w| w.code),
        Some(ErrorCode::InvalidJoinToken),
        "{e:#}"
    );
    let mut cfg = mesh.node_config(3);
    cfg.join_token = Some(format!("skein1-{}-{}", "0".repeat(32), "a".repeat(64)));
    let e = skein_node::Node::start(cfg).await.expect_err("other CA");
    assert!(format!("{e:#}").contains("fingerprint"), "{e:#}");

    // No node was admitted, and a good token still works.
    assert!(mesh.client.nodes().await?.is_empty());
    let node = skein_node::Node::start(mesh.node_config(4)).await?;
    assert_eq!(mesh.client.nodes().await?.len(), 1);
    node.shutdown().await;
    Ok(())
}
