//! `skein infer`: inputs from `.npy` files or literals; outputs as JSON, a table, or `.npy` files.

use crate::output::{json, table, tensor_json, JsonTensor};
use crate::OutputFormat;
use anyhow::{bail, Context};
use serde::Serialize;
use skein_proto::{DataType, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub(crate) struct InferArgs {
    /// Model name.
    model: String,
    /// Model version (latest when omitted).
    #[arg(long)]
    version: Option<String>,
    /// An input, repeatable: NAME=FILE.npy, or a literal NAME=DTYPE:V1,V2,...[@D1xD2] such as
    /// `sr=int64:16000` (a rank-0 scalar) or `x=fp32:1,2,3,4@2x2`.
    #[arg(long = "input", short = 'i', required = true)]
    inputs: Vec<String>,
    /// Only return these outputs (repeatable).
    #[arg(long = "want")]
    want: Vec<String>,
    /// Write each output as DIR/output_<i>.npy (tensor names never touch the file system).
    #[arg(long)]
    save_dir: Option<PathBuf>,
    /// Deadline, e.g. 30s.
    #[arg(long, value_parser = crate::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
    /// LAN discovery: when the coordinator does not answer within 2 s, call the nodes on this
    /// LAN (mDNS) that serve the model, with the route ticket of this profile's last `--lan`
    /// resolve of it (kept in PROFILE.lan-tickets.json, mode 0600).
    #[arg(long)]
    lan: bool,
}

/// Parse one `--input` argument.
pub(crate) fn parse_input(arg: &str) -> anyhow::Result<Tensor> {
    let (name, value) = arg
        .split_once('=')
        .with_context(|| format!("input `{arg}` is not NAME=FILE.npy or NAME=DTYPE:VALUES"))?;
    if name.is_empty() {
        bail!("input `{arg}` has an empty name");
    }
    let path = std::path::Path::new(value);
    if value.ends_with(".npy") || path.is_file() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {value}"))?;
        return skein_proto::npy::decode(name, &bytes)
            .with_context(|| format!("{value} is not a usable .npy file"));
    }
    let (dtype, rest) = value.split_once(':').with_context(|| {
        format!("input `{arg}`: `{value}` is neither a file nor DTYPE:VALUES (e.g. int64:16000)")
    })?;
    let datatype: DataType = dtype.parse()?;
    let (values, shape) = match rest.split_once('@') {
        Some((v, s)) => (
            v,
            Some(
                s.split('x')
                    .map(|d| {
                        d.trim()
                            .parse::<u64>()
                            .with_context(|| format!("bad dimension `{d}` in `{s}`"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?,
            ),
        ),
        None => (rest, None),
    };
    let items: Vec<&str> = values
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let shape = shape.unwrap_or_else(|| {
        if items.len() == 1 {
            vec![]
        } else {
            vec![items.len() as u64]
        }
    });
    let mut data = Vec::new();
    for it in &items {
        let bad = || format!("`{it}` is not a {datatype} value");
        match datatype {
            DataType::Fp32 => data.extend(it.parse::<f32>().with_context(bad)?.to_le_bytes()),
            DataType::Fp64 => data.extend(it.parse::<f64>().with_context(bad)?.to_le_bytes()),
            DataType::Fp16 => {
                data.extend(half::f16::from_f32(it.parse::<f32>().with_context(bad)?).to_le_bytes())
            }
            DataType::Bf16 => data
                .extend(half::bf16::from_f32(it.parse::<f32>().with_context(bad)?).to_le_bytes()),
            DataType::Int8 => data.extend(it.parse::<i8>().with_context(bad)?.to_le_bytes()),
            DataType::Int16 => data.extend(it.parse::<i16>().with_context(bad)?.to_le_bytes()),
            DataType::Int32 => data.extend(it.parse::<i32>().with_context(bad)?.to_le_bytes()),
            DataType::Int64 => data.extend(it.parse::<i64>().with_context(bad)?.to_le_bytes()),
            DataType::Uint8 => data.extend(it.parse::<u8>().with_context(bad)?.to_le_bytes()),
            DataType::Uint16 => data.extend(it.parse::<u16>().with_context(bad)?.to_le_bytes()),
            DataType::Uint32 => data.extend(it.parse::<u32>().with_context(bad)?.to_le_bytes()),
            DataType::Uint64 => data.extend(it.parse::<u64>().with_context(bad)?.to_le_bytes()),
            DataType::Bool => data.push(match *it {
                "true" | "1" => 1,
                "false" | "0" => 0,
                _ => bail!(bad()),
            }),
            DataType::Bytes => {
                data.extend((it.len() as u32).to_le_bytes());
                data.extend(it.as_bytes());
            }
            _ => bail!("datatype {datatype} cannot be given as a literal"),
        }
    }
    Ok(Tensor::new(name, datatype, shape, data)?)
}

#[derive(Serialize)]
struct Meta {
    node: String,
    cold_start: bool,
    queue_us: u64,
    compute_us: u64,
    latency_us: u64,
    /// `reused`, `fresh` (a full handshake) or `0rtt`.
    connection: String,
    /// The node connection's smoothed RTT, µs.
    rtt_us: u64,
}

#[derive(Serialize)]
struct Out {
    model: String,
    version: String,
    outputs: BTreeMap<String, JsonTensor>,
    metadata: Meta,
}

pub(crate) async fn run(args: InferArgs, profile: &Option<PathBuf>) -> anyhow::Result<()> {
    let inputs = args
        .inputs
        .iter()
        .map(|a| parse_input(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = if args.lan {
        crate::lan_client(profile).await?
    } else {
        crate::client(profile).await?
    };
    let t0 = tokio::time::Instant::now();
    let r = client
        .infer_with(
            &args.model,
            inputs,
            skein_client::InferOptions {
                version: args.version.clone(),
                outputs: args.want.clone(),
                timeout: args.timeout,
                sticky_key: None,
                api_key: None,
                trace: None,
            },
        )
        .await
        .with_context(|| format!("running `{}`", args.model))?;
    let latency_us = t0.elapsed().as_micros() as u64;
    if let Some(dir) = &args.save_dir {
        std::fs::create_dir_all(dir)?;
        for (i, t) in r.outputs.iter().enumerate() {
            let p = dir.join(format!("output_{i}.npy"));
            std::fs::write(&p, skein_proto::npy::encode(t)?)
                .with_context(|| format!("writing {}", p.display()))?;
        }
    }
    match args.output {
        OutputFormat::Json => json(&Out {
            model: r.model.clone(),
            version: r.version.clone(),
            outputs: r
                .outputs
                .iter()
                .map(|t| (t.name().to_string(), tensor_json(t)))
                .collect(),
            metadata: Meta {
                node: r.meta.node.clone(),
                cold_start: r.meta.cold_start,
                queue_us: r.meta.queue_us,
                compute_us: r.meta.compute_us,
                latency_us,
                connection: r.connection.kind.to_string(),
                rtt_us: r.connection.rtt.as_micros() as u64,
            },
        })?,
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = r
                .outputs
                .iter()
                .map(|t| {
                    let v = t.to_f64_vec().unwrap_or_default();
                    let preview: Vec<String> =
                        v.iter().take(8).map(|x| format!("{x:.6}")).collect();
                    vec![
                        t.name().to_string(),
                        t.datatype().to_string(),
                        format!("{:?}", t.shape()),
                        format!(
                            "{}{}",
                            preview.join(", "),
                            if v.len() > 8 { ", ..." } else { "" }
                        ),
                    ]
                })
                .collect();
            println!("{} version {}", r.model, r.version);
            table(&["OUTPUT", "DATATYPE", "SHAPE", "DATA"], &rows);
            println!(
                "node {}  cold_start {}  queue {} µs  compute {} µs  round trip {} µs",
                r.meta.node, r.meta.cold_start, r.meta.queue_us, r.meta.compute_us, latency_us
            );
            println!(
                "connection {}  rtt {:.1} ms",
                r.connection.kind,
                r.connection.rtt.as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_parse() {
        let sr = parse_input("sr=int64:16000").unwrap();
        assert_eq!(sr.shape(), &[] as &[u64]);
        assert_eq!(sr.data(), 16000i64.to_le_bytes());
        let x = parse_input("x=fp32:1,2,3,4@2x2").unwrap();
        assert_eq!(x.shape(), &[2, 2]);
        assert!(parse_input("x=fp32:1,2,3@2x2").is_err());
        assert!(parse_input("x=int8:300").is_err());
        assert!(parse_input("noequals").is_err());
        assert!(parse_input("x=missing.npy").is_err());
    }
}
