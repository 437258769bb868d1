//! Reference cases (`models/<model>/cases/<case>/case.json`, format `onnx-reference-case/1`) and
//! the tolerance check of `models/README.md`: `|actual - expected| <= atol + rtol * |expected|`
//! element-wise, with exact shape and datatype.

use skein_proto::{DataType, Tensor};
use std::path::{Path, PathBuf};

/// Why a case could not be read, or a result is out of tolerance.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReferenceError(pub String);

/// One reference case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Case name (its directory).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Inputs in the model's order.
    pub inputs: Vec<Tensor>,
    /// Expected outputs in the model's order.
    pub outputs: Vec<Tensor>,
    /// The case's own (onnxruntime) tolerance.
    pub atol: f64,
    /// The case's own (onnxruntime) relative tolerance.
    pub rtol: f64,
    /// The whole case.json, for case-specific fields (`sequence`, `expected_argmax`...).
    pub json: serde_json::Value,
}

fn tensors(dir: &Path, list: &serde_json::Value) -> Result<Vec<Tensor>, ReferenceError> {
    let err = |m: String| ReferenceError(format!("{}: {m}", dir.display()));
    let mut out = Vec::new();
    for t in list
        .as_array()
        .ok_or_else(|| err("tensor list missing".into()))?
    {
        let name = t["name"]
            .as_str()
            .ok_or_else(|| err("tensor without name".into()))?;
        let datatype: DataType = t["datatype"]
            .as_str()
            .ok_or_else(|| err(format!("`{name}` has no datatype")))?
            .parse()
            .map_err(|e| err(format!("{e}")))?;
        let shape = t["shape"]
            .as_array()
            .ok_or_else(|| err(format!("`{name}` has no shape")))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .ok_or_else(|| err(format!("`{name}`: bad dimension")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let file = t["file"]
            .as_str()
            .ok_or_else(|| err(format!("`{name}` has no file")))?;
        let bytes = std::fs::read(dir.join(file)).map_err(|e| err(format!("{file}: {e}")))?;
        out.push(Tensor::new(name, datatype, shape, bytes).map_err(|e| err(e.to_string()))?);
    }
    Ok(out)
}

/// Every case under `<model_dir>/cases`, sorted by name.
pub fn load_cases(model_dir: &Path) -> Result<Vec<Case>, ReferenceError> {
    let cases = model_dir.join("cases");
    let rd = std::fs::read_dir(&cases)
        .map_err(|e| ReferenceError(format!("{}: {e}", cases.display())))?;
    let mut out = Vec::new();
    for e in rd {
        let dir = e.map_err(|e| ReferenceError(e.to_string()))?.path();
        let path = dir.join("case.json");
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ReferenceError(format!("{}: {e}", path.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ReferenceError(format!("{}: {e}", path.display())))?;
        out.push(Case {
            name: dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string(),
            inputs: tensors(&dir, &json["inputs"])?,
            outputs: tensors(&dir, &json["outputs"])?,
            atol: json["tolerance"]["atol"].as_f64().unwrap_or(1e-4),
            rtol: json["tolerance"]["rtol"].as_f64().unwrap_or(1e-3),
            dir,
            json,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Check `actual` against `expected`: same name, datatype and shape, values within tolerance.
pub fn compare(
    actual: &Tensor,
    expected: &Tensor,
    atol: f64,
    rtol: f64,
) -> Result<(), ReferenceError> {
    let name = expected.name();
    if actual.datatype() != expected.datatype() || actual.shape() != expected.shape() {
        return Err(ReferenceError(format!(
            "`{name}`: got {} {:?}, expected {} {:?}",
            actual.datatype(),
            actual.shape(),
            expected.datatype(),
            expected.shape()
        )));
    }
    let (Some(a), Some(e)) = (actual.to_f64_vec(), expected.to_f64_vec()) else {
        return if actual.data() == expected.data() {
            Ok(())
        } else {
            Err(ReferenceError(format!("`{name}`: BYTES differ")))
        };
    };
    let mut worst: Option<(usize, f64)> = None;
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let diff = (x - y).abs();
        let out_of_tolerance = diff.is_nan() || diff > atol + rtol * y.abs();
        if out_of_tolerance && worst.is_none_or(|(_, d)| diff > d || diff.is_nan()) {
            worst = Some((i, diff));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, d)) => Err(ReferenceError(format!(
            "`{name}`: element {i} is {} but {} was expected (|diff| {d:e} > atol {atol:e} + rtol {rtol:e} × |expected|)",
            a[i], e[i]
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_elementwise_atol_plus_rtol() {
        let e = Tensor::from_f32("y", vec![2], &[1.0, 100.0]).unwrap();
        let ok = Tensor::from_f32("y", vec![2], &[1.0005, 100.9]).unwrap();
        assert!(compare(&ok, &e, 1e-3, 1e-2).is_ok());
        let bad = Tensor::from_f32("y", vec![2], &[1.0, 102.0]).unwrap();
        assert!(compare(&bad, &e, 1e-3, 1e-2).is_err());
        let nan = Tensor::from_f32("y", vec![2], &[f32::NAN, 100.0]).unwrap();
        assert!(compare(&nan, &e, 1e-3, 1e-2).is_err());
        let shape = Tensor::from_f32("y", vec![1, 2], &[1.0, 100.0]).unwrap();
        assert!(compare(&shape, &e, 1e-3, 1e-2).is_err());
    }
}
