//! The JSON bodies of the admin REST API (`/admin/v1`) whose types travel on to the coordinator:
//! a settings patch (`POST .../scale`), a traffic split (`PUT .../traffic`) and a quota
//! (`PUT .../tenants/{name}/quota`). What serde_json accepts must print and parse back to the
//! same value, encode for the wire and decode to the same value, and (a patch) apply to the
//! defaults and be judged by `DeploymentSettings::problem` without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use skein_proto::frame::encode_header;
use skein_proto::security::Quota;
use skein_proto::{DeploymentSettings, Frame, SettingsPatch, VersionWeight, PROTOCOL_VERSION};
use std::fmt::Debug;

/// `body` as a `T`, checked both ways through JSON and through the wire encoding.
fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(body: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(body).ok()?;
    let json = serde_json::to_vec(&value).expect("printing a parsed body");
    let again: T = serde_json::from_slice(&json).expect("parsing a printed body");
    assert_eq!(
        again,
        value,
        "JSON round trip of {}",
        String::from_utf8_lossy(&json)
    );
    let header = encode_header(&value).expect("encoding for the wire");
    let mut frame = Vec::with_capacity(6 + header.len());
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
    frame.extend_from_slice(&header);
    let wired: T = Frame::parse(frame)
        .and_then(|f| f.header())
        .expect("decoding what was encoded");
    assert_eq!(wired, value, "wire round trip");
    Some(value)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the body's type.
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    match pick % 3 {
        0 => {
            if let Some(patch) = check::<SettingsPatch>(body) {
                let _ = patch.apply(&DeploymentSettings::default()).problem();
            }
        }
        1 => {
            let _ = check::<Vec<VersionWeight>>(body);
        }
        _ => {
            let _ = check::<Quota>(body);
        }
    }
});
