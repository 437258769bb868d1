//! The JSON part of a V2 inference request, as both of its readers build it: serde_json (the
//! reference, through these types' `Deserialize`) and the fast reader, `fastjson`. `codec`
//! turns it into tensors.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;

/// `parameters` of a request, input or output. Unknown parameters (`sequence_id`, `priority`,
/// `timeout`, ...) are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Parameters {
    pub(crate) binary_data_size: Option<u64>,
    pub(crate) binary_data: Option<bool>,
    pub(crate) binary_data_output: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct InputJson {
    pub(crate) name: String,
    pub(crate) shape: Vec<u64>,
    pub(crate) datatype: String,
    #[serde(default)]
    pub(crate) parameters: Option<Parameters>,
    #[serde(default)]
    pub(crate) data: Option<Scalars>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct OutputJson {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) parameters: Option<Parameters>,
}

/// The JSON part of a request, as serde_json or `fastjson` reads it.
#[derive(Debug, Deserialize)]
pub(crate) struct RequestJson {
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) parameters: Option<Parameters>,
    pub(crate) inputs: Vec<InputJson>,
    #[serde(default)]
    pub(crate) outputs: Option<Vec<OutputJson>>,
}

/// One JSON scalar of a `data` array, flattened.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
}

/// Integers up to this magnitude are exact in an `f64`.
const EXACT_INT: f64 = 9_007_199_254_740_992.0; // 2^53

/// The scalars of a (flat or nested) `data` array, in row-major order, gathered in one pass of
/// the JSON parser. Plain numbers (the everyday case: a large array of floats) are kept
/// compactly as `f64`, exact for every float and for integers up to 2^53; the first element
/// that is anything else (a string such as `"nan"`, a boolean, a larger integer) turns the list
/// into general scalars.
#[derive(Debug, PartialEq)]
pub(crate) enum Scalars {
    Numbers(Vec<f64>),
    Mixed(Vec<Scalar>),
}

impl Default for Scalars {
    fn default() -> Self {
        Scalars::Numbers(Vec::new())
    }
}

impl Scalars {
    pub(crate) fn len(&self) -> usize {
        match self {
            Scalars::Numbers(v) => v.len(),
            Scalars::Mixed(v) => v.len(),
        }
    }

    fn push_number(&mut self, v: f64) {
        match self {
            Scalars::Numbers(n) => n.push(v),
            Scalars::Mixed(m) => m.push(Scalar::Float(v)),
        }
    }

    fn push(&mut self, s: Scalar) {
        if let Scalars::Numbers(n) = self {
            let mixed = std::mem::take(n)
                .into_iter()
                .map(|v| {
                    if v.fract() == 0.0 && v.abs() <= EXACT_INT {
                        Scalar::Int(v as i64)
                    } else {
                        Scalar::Float(v)
                    }
                })
                .collect();
            *self = Scalars::Mixed(mixed);
        }
        if let Scalars::Mixed(m) = self {
            m.push(s);
        }
    }

    pub(crate) fn into_mixed(mut self) -> Vec<Scalar> {
        if let Scalars::Numbers(n) = &mut self {
            if let Some(last) = n.pop() {
                // Converts the others, then re-adds the last one as a general scalar.
                self.push(Scalar::Float(last));
            }
        }
        match self {
            Scalars::Mixed(m) => m,
            Scalars::Numbers(_) => Vec::new(),
        }
    }
}

impl<'de> Deserialize<'de> for Scalars {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Scalars::default();
        d.deserialize_any(Flatten(&mut out))?;
        Ok(out)
    }
}

/// Visits nested arrays, pushing every scalar (serde_json bounds the nesting depth).
struct Flatten<'a>(&'a mut Scalars);

impl<'de> de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, boolean, string, or a (nested) array of them")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.push(Scalar::Bool(v));
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        if (v as f64).abs() <= EXACT_INT {
            self.0.push_number(v as f64);
        } else {
            self.0.push(Scalar::Int(v));
        }
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        if (v as f64) <= EXACT_INT {
            self.0.push_number(v as f64);
        } else {
            self.0.push(Scalar::Uint(v));
        }
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.push_number(v);
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.push(Scalar::Str(v.to_string()));
        Ok(())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.0.push(Scalar::Str(v));
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let (Scalars::Numbers(n), Some(hint)) = (&mut *self.0, seq.size_hint()) {
            n.reserve(hint.min(1 << 20));
        }
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}
