//! Faults on a node's disk: its artifact cache becomes unwritable (the directory replaced by a
//! file, which even root cannot write into), or fills up in the middle of a download (a 1 MiB
//! tmpfs over it). New models fail to fetch with an error that says why; the models already
//! loaded keep serving; once the disk is back, the next call loads, and a download cut by the
//! full disk resumes where it stopped.

use skein_node::Node;
use skein_proto::{DeploymentSettings, ErrorCode};
use skein_tests::{case, check, model_bytes, model_info, root_tests, wait_for, TestMesh, Tmpfs};
use std::time::Duration;

/// Deploy `silero_vad` (not provisioned) and call it: the call fails with `model_load_failed`,
/// whose message is returned.
async fn a_new_model_fails_to_load(mesh: &TestMesh) -> anyhow::Result<String> {
    let settings = DeploymentSettings {
        min_replicas: 0,
        ..Default::default()
    };
    mesh.deploy_with("silero_vad", settings).await?;
    let e = mesh
        .client
        .infer("silero_vad", case("silero_vad", "stream_step0").inputs)
        .await
        .expect_err("the artifact cannot be stored");
    assert_eq!(e.code(), Some(ErrorCode::ModelLoadFailed), "{e}");
    Ok(e.to_string())
}

/// What was loaded keeps serving: ten calls of `ppocr_cls` with reference outputs.
async fn the_loaded_model_keeps_serving(mesh: &TestMesh) -> anyhow::Result<()> {
    let cls = case("ppocr_cls", "single");
    for _ in 0..10 {
        let r = mesh.client.infer("ppocr_cls", cls.inputs.clone()).await?;
        check(&r.outputs, &cls);
    }
    Ok(())
}

/// Once the disk is back, a later call of `silero_vad` loads and serves.
async fn the_new_model_loads_once_the_disk_is_back(mesh: &TestMesh) -> anyhow::Result<()> {
    let vad = case("silero_vad", "stream_step0");
    let r = wait_for(
        "silero_vad to load once the disk is back",
        Duration::from_secs(30),
        || {
            let (c, inputs) = (&mesh.client, vad.inputs.clone());
            async move { c.infer("silero_vad", inputs).await.ok() }
        },
    )
    .await?;
    check(&r.outputs, &vad);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_cache_fails_new_loads_clearly_and_loaded_models_keep_serving(
) -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let cache = mesh.node_config(0).data_dir.join("cache");
    std::fs::remove_dir_all(&cache)?;
    std::fs::write(&cache, b"not a directory")?;
    // A new model cannot be fetched: the call fails with the reason, not a hang.
    let e = a_new_model_fails_to_load(&mesh).await?;
    assert!(e.contains("cache"), "{e}");
    the_loaded_model_keeps_serving(&mesh).await?;
    std::fs::remove_file(&cache)?;
    std::fs::create_dir(&cache)?;
    the_new_model_loads_once_the_disk_is_back(&mesh).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_mid_download_fails_clearly_and_loaded_models_keep_serving(
) -> anyhow::Result<()> {
    if !root_tests("tmpfs mounts", &["mount", "--version"]) {
        return Ok(());
    }
    let mesh = TestMesh::start(1).await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    // 1 MiB of disk for a 2.3 MB model: the download starts and runs out of space.
    let cache = mesh.node_config(0).data_dir.join("cache");
    let small = Tmpfs::mount(&cache, 1024)?;
    let e = a_new_model_fails_to_load(&mesh).await?;
    assert!(
        e.contains("No space left on device") && e.contains("download"),
        "{e}"
    );
    // The part that fit stays (a later fetch resumes from it: see
    // `a_download_cut_by_a_full_disk_resumes_from_its_partial_file`); nothing complete is
    // claimed.
    let names: Vec<String> = std::fs::read_dir(&cache)?
        .filter_map(|d| d.ok()?.file_name().into_string().ok())
        .collect();
    assert!(
        names.iter().all(|n| n.ends_with(".partial")),
        "only partial downloads in the full cache: {names:?}"
    );
    the_loaded_model_keeps_serving(&mesh).await?;
    small.unmount()?;
    the_new_model_loads_once_the_disk_is_back(&mesh).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_a_full_disk_resumes_from_its_partial_file() -> anyhow::Result<()> {
    if !root_tests("tmpfs mounts", &["mount", "--version"]) {
        return Ok(());
    }
    let mut mesh = TestMesh::start(1).await?;
    // 1.5 MiB of disk for the 2.3 MB `silero_vad` (chunks of 1 MiB, 1 MiB and 0.3 MB, fetched
    // in any order): one or two chunks fit, then its download is cut when the disk is full.
    let cache = mesh.node_config(0).data_dir.join("cache");
    let disk = Tmpfs::mount(&cache, 1536)?;
    let e = a_new_model_fails_to_load(&mesh).await?;
    assert!(e.contains("No space left on device"), "{e}");
    let info = model_info(&mesh, "silero_vad")
        .await
        .expect("silero_vad deployed");
    // Stop the node, so that nothing fetches while the disk is full and the partial file
    // stays as the cut left it.
    let node = mesh.nodes[0].take().expect("node running");
    node.shutdown().await;
    let partial = cache.join(format!("{}.partial", info.sha256));
    // Verified chunks are written at their offsets in the partial file; count the ones that
    // are the artifact's (the rest of the file is holes or a cut chunk).
    let want = model_bytes("silero_vad");
    let on_disk = std::fs::read(&partial)?;
    let chunk = skein_net::artifact::chunk_size_for(info.size) as usize;
    let have: u64 = want
        .chunks(chunk)
        .zip(on_disk.chunks(chunk))
        .filter(|(w, d)| w == d)
        .map(|(w, _)| w.len() as u64)
        .sum();
    assert!(
        have > 0 && have < info.size,
        "the cut left {have} of {} bytes",
        info.size
    );

    // Room again, the partial file kept; the node restarts and the next call loads the model.
    disk.resize(16 * 1024)?;
    let sent_before = mesh.coordinator().artifact_bytes_sent();
    let mut config = mesh.node_config(0);
    config.join_token = None;
    mesh.nodes[0] = Some(Node::start(config).await?);
    the_new_model_loads_once_the_disk_is_back(&mesh).await?;
    // The fetch kept the verified chunks: the coordinator sent the missing ones only.
    let sent = mesh.coordinator().artifact_bytes_sent() - sent_before;
    eprintln!(
        "cut at {have} of {} bytes; resumed, {sent} bytes sent",
        info.size
    );
    assert_eq!(sent, info.size - have, "only the missing part is sent");
    // The whole artifact is stored under its hash, and checks against it.
    let stored = std::fs::read(cache.join(&info.sha256))?;
    assert_eq!(stored.len() as u64, info.size);
    assert_eq!(
        skein_coordinator::artifacts::sha256_hex(&stored),
        info.sha256
    );
    assert!(!partial.exists(), "the partial file became the artifact");
    disk.unmount()
}
