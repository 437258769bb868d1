//! Versions side by side and traffic splits: a 90/10 canary over 1000 calls, sticky keys, the
//! default version as a pointer, pinned versions, and bad splits refused.

use skein_client::{Client, ClientConfig, InferOptions};
use skein_proto::{ErrorCode, VersionWeight};
use skein_tests::{case, model_bytes, TestMesh};

fn w(version: &str, weight: u32) -> VersionWeight {
    VersionWeight {
        version: version.into(),
        weight,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_lands_within_bounds_and_sticky_keys_stick() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    let bytes = model_bytes("ppocr_cls");
    for v in ["1", "2"] {
        mesh.client
            .deploy("ppocr_cls", Some(v), &bytes, |_| {})
            .await?;
    }
    let single = case("ppocr_cls", "single");
    let version_on = |client: &Client, opts: InferOptions| {
        let (client, inputs) = (client.clone(), single.inputs.clone());
        async move {
            let r = client.infer_with("ppocr_cls", inputs, opts).await?;
            anyhow::Ok(r.version)
        }
    };
    // Without a split the latest version takes every call.
    assert_eq!(
        version_on(&mesh.client, InferOptions::default()).await?,
        "2"
    );

    let split = mesh
        .client
        .set_traffic("ppocr_cls", vec![w("1", 90), w("2", 10)])
        .await?;
    assert_eq!(split, vec![w("1", 90), w("2", 10)]);
    assert_eq!(mesh.client.traffic("ppocr_cls").await?, split);
    // The resolve's default version is the pointer: the heaviest one.
    assert_eq!(mesh.client.resolve("ppocr_cls", None).await?.version, "1");
    // From here on, a client made after the split was set (no route cached from before it),
    // whose SDK draws each call's version with a generator seeded here: the same calls land on
    // the same versions on every run.
    let seeded = Client::from_profile_with(
        &mesh.profile,
        ClientConfig {
            split_seed: Some(0x5ca1e),
            ..ClientConfig::default()
        },
    )
    .await?;
    let mut to_v2 = 0;
    for _ in 0..1000 {
        if version_on(&seeded, InferOptions::default()).await? == "2" {
            to_v2 += 1;
        }
    }
    eprintln!("{to_v2} of 1000 calls went to version 2");
    // Binomial(1000, 0.1): mean 100, sd 9.5; ±4 sd (the seeded draw gives the same count
    // every run; the bound says the split is the one set, whatever the seed).
    assert!(
        (62..=138).contains(&to_v2),
        "{to_v2} of 1000 calls went to version 2"
    );

    // The same sticky key always gets the same version; different keys spread.
    let mut seen = std::collections::HashSet::new();
    for user in 0..40 {
        let key = format!("user-{user}");
        let opts = || InferOptions {
            sticky_key: Some(key.clone()),
            ..Default::default()
        };
        let first = version_on(&seeded, opts()).await?;
        for _ in 0..3 {
            assert_eq!(version_on(&seeded, opts()).await?, first, "{key} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "40 keys all landed on one version");

    // A pinned version ignores the split.
    let pinned = InferOptions {
        version: Some("2".into()),
        ..Default::default()
    };
    assert_eq!(version_on(&seeded, pinned).await?, "2");

    // Bad splits are refused; clearing restores "latest".
    for bad in [vec![w("3", 1)], vec![w("1", 0)], vec![w("1", 1), w("1", 2)]] {
        let e = mesh.client.set_traffic("ppocr_cls", bad.clone()).await;
        let code = e.expect_err("a bad split").code();
        assert!(
            matches!(code, Some(ErrorCode::UnknownVersion | ErrorCode::Malformed)),
            "{bad:?}: {code:?}"
        );
    }
    assert!(mesh
        .client
        .set_traffic("ppocr_cls", vec![])
        .await?
        .is_empty());
    assert_eq!(mesh.client.resolve("ppocr_cls", None).await?.version, "2");
    Ok(())
}
