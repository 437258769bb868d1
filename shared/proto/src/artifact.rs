//! [`ArtifactId`]: the name of a model artifact, its sha256 as 64 lower-case hex digits.
//!
//! Artifacts are content-addressed: the id is both the hash every download is checked against
//! and the file name in the coordinator's store and the node's cache, so a valid id is also a
//! safe file name (no `/`, no `..`). On the wire it is the plain string (serde as a string),
//! so messages that carry it are byte-identical to those that carried a `String`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A model artifact's sha256, validated: exactly 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactId(String);

/// Why a string is not an [`ArtifactId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}` is not a sha256 (64 lower-case hex digits)")]
pub struct InvalidArtifactId {
    /// The refused string, cut to 80 characters.
    shown: String,
}

impl ArtifactId {
    /// Length of the hex form.
    pub const HEX_LEN: usize = 64;

    /// The id of a 32-byte sha256 digest.
    pub fn from_digest(digest: &[u8; 32]) -> ArtifactId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(Self::HEX_LEN);
        for b in digest {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        ArtifactId(s)
    }

    /// The 64 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` is a valid id.
    pub fn is_valid(s: &str) -> bool {
        s.len() == Self::HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

impl FromStr for ArtifactId {
    type Err = InvalidArtifactId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if Self::is_valid(s) {
            Ok(ArtifactId(s.to_string()))
        } else {
            Err(InvalidArtifactId {
                shown: s.chars().take(80).collect(),
            })
        }
    }
}

impl TryFrom<String> for ArtifactId {
    type Error = InvalidArtifactId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if Self::is_valid(&s) {
            Ok(ArtifactId(s))
        } else {
            Err(InvalidArtifactId {
                shown: s.chars().take(80).collect(),
            })
        }
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ArtifactId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ArtifactId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ArtifactId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for ArtifactId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl Serialize for ArtifactId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ArtifactId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ArtifactId::try_from(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn parses_lower_case_hex_sha256_only() {
        let id: ArtifactId = ABC.parse().unwrap();
        assert_eq!(id.as_str(), ABC);
        assert_eq!(id.to_string(), ABC);
        for bad in [
            "",
            "abc",
            &ABC.to_ascii_uppercase(),
            &ABC[..63],
            &format!("{ABC}0"),
            &format!("{}g", &ABC[..63]),
            "../../../../../../../../../../../../../../../../../../../../etc/passwd/../..",
        ] {
            let e = bad.parse::<ArtifactId>().unwrap_err();
            assert!(e.to_string().contains("is not a sha256"), "{e}");
            assert!(!ArtifactId::is_valid(bad));
        }
    }

    #[test]
    fn from_digest_is_the_hex_form() {
        let mut d = [0u8; 32];
        d[0] = 0xba;
        d[1] = 0x78;
        d[31] = 0x0f;
        let id = ArtifactId::from_digest(&d);
        assert!(id.as_str().starts_with("ba78"));
        assert!(id.as_str().ends_with("0f"));
        assert!(ArtifactId::is_valid(id.as_str()));
    }

    #[test]
    fn serialises_exactly_like_the_string() {
        let id: ArtifactId = ABC.parse().unwrap();
        let cfg = bincode::config::standard();
        let as_id = bincode::serde::encode_to_vec(&id, cfg).unwrap();
        let as_string = bincode::serde::encode_to_vec(ABC.to_string(), cfg).unwrap();
        assert_eq!(as_id, as_string);
        let (back, _): (ArtifactId, usize) =
            bincode::serde::decode_from_slice(&as_string, cfg).unwrap();
        assert_eq!(back, id);
        // A string that is not a sha256 does not decode as an id.
        let bad = bincode::serde::encode_to_vec("ABC".to_string(), cfg).unwrap();
        assert!(bincode::serde::decode_from_slice::<ArtifactId, _>(&bad, cfg).is_err());
    }
}
