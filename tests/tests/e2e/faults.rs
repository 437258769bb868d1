//! Faults on a node's disk: its artifact cache becomes unwritable (the directory replaced by a
//! file, which even root cannot write into), or fills up in the middle of a download (a 1 MiB
//! tmpfs over it). New models fail to fetch with an error that says why; the models already
//! loaded keep serving; once the disk is back, the next call loads.

use skein_proto::{DeploymentSettings, ErrorCode};
use skein_tests::{case, check, root_tests, wait_for, TestMesh, Tmpfs};
use std::time::Duration;

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
    let settings = DeploymentSettings {
        min_replicas: 0,
        ..Default::default()
    };
    mesh.deploy_with("silero_vad", settings).await?;
    let vad = case("silero_vad", "stream_step0");
    let e = mesh
        .client
        .infer("silero_vad", vad.inputs.clone())
        .await
        .expect_err("the artifact cannot be stored");
    assert_eq!(e.code(), Some(ErrorCode::ModelLoadFailed), "{e}");
    assert!(e.to_string().contains("cache"), "{e}");

    // What was loaded keeps serving.
    let cls = case("ppocr_cls", "single");
    for _ in 0..10 {
        let r = mesh.client.infer("ppocr_cls", cls.inputs.clone()).await?;
        check(&r.outputs, &cls);
    }

    // The disk comes back: a later call loads and serves.
    std::fs::remove_file(&cache)?;
    std::fs::create_dir(&cache)?;
    let r = wait_for(
        "silero_vad to load once the cache is writable",
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
    let settings = DeploymentSettings {
        min_replicas: 0,
        ..Default::default()
    };
    mesh.deploy_with("silero_vad", settings).await?;
    let vad = case("silero_vad", "stream_step0");
    let e = mesh
        .client
        .infer("silero_vad", vad.inputs.clone())
        .await
        .expect_err("the artifact does not fit");
    assert_eq!(e.code(), Some(ErrorCode::ModelLoadFailed), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("No space left on device") && text.contains("download"),
        "{e}"
    );
    // The part that fit stays (a later fetch resumes from it); nothing complete is claimed.
    let names: Vec<String> = std::fs::read_dir(&cache)?
        .filter_map(|d| d.ok()?.file_name().into_string().ok())
        .collect();
    assert!(
        names.iter().all(|n| n.ends_with(".partial")),
        "only partial downloads in the full cache: {names:?}"
    );

    // What was loaded keeps serving.
    let cls = case("ppocr_cls", "single");
    for _ in 0..10 {
        let r = mesh.client.infer("ppocr_cls", cls.inputs.clone()).await?;
        check(&r.outputs, &cls);
    }

    // Room again: the next call downloads, loads and serves.
    small.unmount()?;
    let r = wait_for(
        "silero_vad to load once there is room",
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
