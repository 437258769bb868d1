//! Clusters and workloads: regions with coordinates, node classes, models, and the arrival
//! streams of each named scenario (generated once, replayed for every policy).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skein_policy::routing::{estimate_rtt, Position};
use skein_policy::vivaldi::{Coordinate, CoordinateExt};

/// One second in µs.
pub const S: u64 = 1_000_000;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A region: a name and where its callers sit.
#[derive(Debug, Clone)]
pub struct Region {
    /// Label, e.g. `eu-west`.
    pub name: String,
    /// Callers' position (settled coordinate + labels).
    pub caller: Position,
}

/// A kind of machine.
#[derive(Debug, Clone)]
pub struct NodeClass {
    /// Label, e.g. `edge-cpu`.
    pub name: &'static str,
    /// Service time multiplier against the model's reference time.
    pub service_mult: f64,
    /// Price per warm replica-second.
    pub price_per_s: f64,
    /// Memory for models, bytes.
    pub memory_bytes: u64,
    /// Has a GPU.
    pub accelerator: bool,
    /// Link bandwidth, bits/s.
    pub bandwidth_bps: f64,
}

/// A node.
#[derive(Debug, Clone)]
pub struct Node {
    /// Index into [`Scenario::classes`].
    pub class: u8,
    /// Index into [`Scenario::regions`].
    pub region: u16,
    /// Coordinate and labels.
    pub position: Position,
}

/// A model (or, in `azure`, a function app).
#[derive(Debug, Clone)]
pub struct Model {
    /// Name.
    pub name: String,
    /// Reference service time (on an edge CPU, multiplier 1), µs.
    pub service_us: f64,
    /// Memory when loaded, bytes.
    pub memory_bytes: u64,
    /// Artifact size, bytes.
    pub artifact_bytes: u64,
    /// Load time once the artifact is on disk, µs.
    pub load_us: u64,
    /// Requests per replica at once.
    pub concurrency: u32,
    /// Needs a GPU.
    pub accelerator: bool,
}

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// When, µs.
    pub t_us: u64,
    /// Model index.
    pub model: u32,
    /// Caller region index.
    pub region: u16,
}

/// A cluster plus a workload.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Scenario name.
    pub name: String,
    /// Regions.
    pub regions: Vec<Region>,
    /// Node classes.
    pub classes: Vec<NodeClass>,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// RTT from each region's callers to each node, µs: `rtt[node × regions + region]`,
    /// from [`estimate_rtt`] on the coordinates.
    pub rtt_us: Vec<f32>,
    /// Models.
    pub models: Vec<Model>,
    /// Requests, sorted by time.
    pub arrivals: Vec<Arrival>,
    /// Simulated span, µs.
    pub horizon_us: u64,
    /// Request plus response bytes.
    pub payload_bytes: u64,
    /// Human-readable notes on the workload.
    pub notes: String,
}

/// Scenario names accepted by [`Scenario::build`].
pub const SCENARIOS: &[&str] = &[
    "steady",
    "geo",
    "geo-spike",
    "diurnal",
    "diurnal-spike",
    "flash",
    "azure",
];

const REGIONS: &[(&str, f64, f64)] = &[
    // name, x, y (µs): distances approximate RTTs between the regions.
    ("us-east", 0.0, 0.0),
    ("us-west", -30_000.0, 8_000.0),
    ("eu-west", 38_000.0, 6_000.0),
    ("eu-central", 45_000.0, 14_000.0),
    ("ap-south", 100_000.0, 50_000.0),
    ("ap-east", -75_000.0, 70_000.0),
];
/// Caller weight per region.
const REGION_WEIGHT: &[f64] = &[0.28, 0.14, 0.2, 0.12, 0.1, 0.16];

fn coord(x: f64, y: f64, z: f64, height: f64) -> Coordinate {
    let mut c = Coordinate::origin();
    c.vec[0] = x;
    c.vec[1] = y;
    c.vec[2] = z;
    c.height = height;
    c.error = 0.1;
    c
}

fn classes() -> Vec<NodeClass> {
    vec![
        NodeClass {
            name: "edge-cpu",
            service_mult: 1.0,
            price_per_s: 1.0,
            memory_bytes: 8 * GIB,
            accelerator: false,
            bandwidth_bps: 1e9,
        },
        NodeClass {
            name: "cloud-gpu",
            service_mult: 0.25,
            price_per_s: 10.0,
            memory_bytes: 80 * GIB,
            accelerator: true,
            bandwidth_bps: 10e9,
        },
    ]
}

fn cluster(n_nodes: usize, rng: &mut StdRng) -> (Vec<Region>, Vec<Node>, Vec<f32>) {
    let regions: Vec<Region> = REGIONS
        .iter()
        .map(|(name, x, y)| Region {
            name: (*name).to_string(),
            caller: Position {
                coordinate: Some(coord(*x, *y, 0.0, 2_000.0)),
                region: Some((*name).to_string()),
                zone: None,
            },
        })
        .collect();
    let gpu_regions = [0usize, 2, 5];
    let mut nodes = Vec::with_capacity(n_nodes);
    for i in 0..n_nodes.max(1) {
        // Every seventh node is a cloud GPU in one of the cloud regions; the rest are edge CPUs
        // spread by caller weight (at least one of each in every region when there are enough).
        let (class, region) = if i % 7 == 6 {
            (1u8, gpu_regions[(i / 7) % gpu_regions.len()])
        } else if i < REGIONS.len() {
            (0u8, i)
        } else {
            (0u8, pick_weighted(REGION_WEIGHT, rng))
        };
        let (name, x, y) = REGIONS[region];
        let zone = rng.gen_range(0..3u8);
        let c = coord(
            x + rng.gen_range(-1_500.0..1_500.0),
            y + rng.gen_range(-1_500.0..1_500.0),
            zone as f64 * 800.0,
            rng.gen_range(300.0..1_500.0),
        );
        nodes.push(Node {
            class,
            region: region as u16,
            position: Position {
                coordinate: Some(c),
                region: Some(name.to_string()),
                zone: Some(format!("{name}-{}", (b'a' + zone) as char)),
            },
        });
    }
    let mut rtt = Vec::with_capacity(nodes.len() * regions.len());
    for n in &nodes {
        for r in &regions {
            rtt.push(estimate_rtt(&r.caller, &n.position) as f32);
        }
    }
    (regions, nodes, rtt)
}

fn pick_weighted(w: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = w.iter().sum();
    let mut x = rng.gen_range(0.0..total.max(f64::MIN_POSITIVE));
    for (i, v) in w.iter().enumerate() {
        if x < *v {
            return i;
        }
        x -= v;
    }
    w.len() - 1
}

fn inference_models() -> Vec<Model> {
    let m = |name: &str, svc_ms: f64, mem_mb: u64, art_mb: u64, load_ms: u64, c: u32, gpu| Model {
        name: name.to_string(),
        service_us: svc_ms * 1e3,
        memory_bytes: mem_mb * MIB,
        artifact_bytes: art_mb * MIB,
        load_us: load_ms * 1_000,
        concurrency: c,
        accelerator: gpu,
    };
    vec![
        m("resnet50", 50.0, 400, 100, 800, 2, false),
        m("bert-base", 100.0, 900, 420, 1_500, 1, false),
        m("whisper-s", 250.0, 1_200, 480, 2_000, 1, false),
        m("mobilenet", 15.0, 100, 15, 300, 4, false),
        m("llama-7b", 400.0, 14_000, 13_000, 8_000, 8, true),
        m("sd-turbo", 300.0, 6_000, 5_000, 5_000, 4, true),
    ]
}

/// A rate shape over time (multiplier of a stream's base rate).
#[derive(Debug, Clone, Copy)]
enum Shape {
    Constant,
    /// 24 h cycle shifted by a phase, from `floor` to 1.
    Diurnal {
        phase_s: f64,
        floor: f64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Spike {
    start_s: f64,
    ramp_s: f64,
    hold_s: f64,
    factor: f64,
}

impl Spike {
    fn mult(&self, t: f64) -> f64 {
        let a = t - self.start_s;
        let up = if a < 0.0 {
            0.0
        } else if a < self.ramp_s {
            a / self.ramp_s
        } else if a < self.ramp_s + self.hold_s {
            1.0
        } else if a < 2.0 * self.ramp_s + self.hold_s {
            1.0 - (a - self.ramp_s - self.hold_s) / self.ramp_s
        } else {
            0.0
        };
        1.0 + (self.factor - 1.0) * up
    }
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    model: u32,
    region: u16,
    base: f64,
    shape: Shape,
    spike: Option<Spike>,
    day_s: f64,
}

impl Stream {
    fn rate(&self, t: f64) -> f64 {
        let s = match self.shape {
            Shape::Constant => 1.0,
            Shape::Diurnal { phase_s, floor } => {
                let x = (std::f64::consts::TAU * (t + phase_s) / self.day_s).cos();
                let day = (0.5 - 0.5 * x).powi(2);
                floor + (1.0 - floor) * day
            }
        };
        self.base * s * self.spike.map_or(1.0, |k| k.mult(t))
    }
}

const STEP_S: f64 = 1.0;

fn expected(streams: &[Stream], horizon_s: f64) -> f64 {
    let steps = (horizon_s / STEP_S).ceil() as u64;
    let mut total = 0.0;
    for s in streams {
        for k in 0..steps {
            total += s.rate((k as f64 + 0.5) * STEP_S) * STEP_S;
        }
    }
    total
}

/// Non-homogeneous Poisson arrivals with the rate held constant over 1 s steps (exact for
/// piecewise-constant rates: the exponential is memoryless at step boundaries).
fn generate(streams: &[Stream], horizon_s: f64, rng: &mut StdRng, out: &mut Vec<Arrival>) {
    for s in streams {
        let mut t = 0.0f64;
        while t < horizon_s {
            let step_end = ((t / STEP_S).floor() + 1.0) * STEP_S;
            let lambda = s.rate((t / STEP_S).floor() * STEP_S + 0.5 * STEP_S);
            if lambda <= 0.0 {
                t = step_end;
                continue;
            }
            let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
            let dt = -u.ln() / lambda;
            if t + dt < step_end {
                t += dt;
                if t < horizon_s {
                    out.push(Arrival {
                        t_us: (t * 1e6) as u64,
                        model: s.model,
                        region: s.region,
                    });
                }
            } else {
                t = step_end;
            }
        }
    }
}

impl Scenario {
    /// Build scenario `name` with about `requests` requests on `nodes` nodes.
    pub fn build(name: &str, nodes: usize, requests: usize, seed: u64) -> Result<Self, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (regions, node_list, rtt) = cluster(nodes, &mut rng);
        let requests = requests.max(1) as f64;
        let all_regions = || 0..REGIONS.len() as u16;
        let mut models = inference_models();
        let mut streams = Vec::new();
        let horizon_s;
        let notes;
        let mut day = 86_400.0;
        match name {
            "steady" | "geo" | "geo-spike" => {
                // About 300 requests/s: the span follows the request count (10 min .. 1 h).
                horizon_s = (requests / 300.0).clamp(600.0, 3_600.0);
                let n_models = models.len() as u32;
                for m in 0..n_models {
                    for r in all_regions() {
                        // steady: every caller in us-east; geo: callers everywhere.
                        let w = if name == "steady" {
                            if r == 0 {
                                1.0
                            } else {
                                continue;
                            }
                        } else {
                            REGION_WEIGHT[r as usize]
                        };
                        let model_share = [0.3, 0.25, 0.1, 0.25, 0.04, 0.06][m as usize];
                        streams.push(Stream {
                            model: m,
                            region: r,
                            base: w * model_share,
                            shape: Shape::Constant,
                            spike: None,
                            day_s: 86_400.0,
                        });
                    }
                }
                if name == "geo-spike" {
                    // Flash crowd: bert-base from ap-south ×100 for 5 minutes at 25 min.
                    for s in &mut streams {
                        if s.model == 1 && s.region == 4 {
                            s.spike = Some(Spike {
                                start_s: horizon_s * 0.4,
                                ramp_s: horizon_s / 120.0,
                                hold_s: horizon_s / 12.0,
                                factor: 100.0,
                            });
                        }
                    }
                }
                let span = format!("{:.0} min", horizon_s / 60.0);
                notes = match name {
                    "steady" => format!("constant Poisson load from us-east, {span}"),
                    "geo" => format!("constant Poisson load from 6 regions, {span}"),
                    _ => format!(
                        "geo + flash crowd: bert-base from ap-south x100 for {:.0} s at 40% of \
                         {span}",
                        horizon_s / 12.0
                    ),
                };
            }
            "diurnal" | "diurnal-spike" | "flash" => {
                // One "day" of about 50 requests/s on average, 2 h .. 24 h long.
                horizon_s = (requests / 50.0).clamp(7_200.0, 86_400.0);
                day = horizon_s;
                for m in 0..4u32 {
                    for r in all_regions() {
                        // Regions an hour apart (of a 24 h day): the night overlaps.
                        let phase_s = -(r as f64) * horizon_s / 24.0;
                        streams.push(Stream {
                            model: m,
                            region: r,
                            base: REGION_WEIGHT[r as usize] * [0.4, 0.3, 0.1, 0.2][m as usize],
                            shape: if name == "flash" {
                                Shape::Constant
                            } else {
                                Shape::Diurnal {
                                    phase_s,
                                    floor: 0.0,
                                }
                            },
                            spike: (name != "diurnal" && m == 1).then_some(Spike {
                                start_s: horizon_s * 14.0 / 24.0,
                                ramp_s: horizon_s / 1_440.0,
                                hold_s: horizon_s / 144.0,
                                factor: 100.0,
                            }),
                            day_s: 86_400.0,
                        });
                    }
                }
                let span = format!("{:.1} h", horizon_s / 3_600.0);
                notes = match name {
                    "diurnal" => format!("one diurnal cycle over {span} per region"),
                    "flash" => format!("constant load over {span}, bert-base x100 at 58%"),
                    _ => format!(
                        "one diurnal cycle over {span} per region + bert-base x100 for 1/144 of \
                         it at 58%"
                    ),
                };
            }
            "azure" => return Ok(Self::azure(regions, node_list, rtt, requests, &mut rng)),
            other => {
                return Err(format!(
                    "unknown scenario `{other}` (expected one of: {})",
                    SCENARIOS.join(", ")
                ))
            }
        }
        for s in &mut streams {
            s.day_s = day;
        }
        let scale = requests / expected(&streams, horizon_s).max(1e-9);
        for s in &mut streams {
            s.base *= scale;
        }
        let mut arrivals = Vec::with_capacity(requests as usize + 1024);
        generate(&streams, horizon_s, &mut rng, &mut arrivals);
        arrivals.sort_by_key(|a| (a.t_us, a.model, a.region));
        models.truncate(
            streams
                .iter()
                .map(|s| s.model as usize + 1)
                .max()
                .unwrap_or(1),
        );
        Ok(Scenario {
            name: name.to_string(),
            regions,
            classes: classes(),
            nodes: node_list,
            rtt_us: rtt,
            models,
            arrivals,
            horizon_us: (horizon_s * 1e6) as u64,
            payload_bytes: 16 * 1024,
            notes,
        })
    }

    /// Azure-Functions-like population over 24 h: 45 % of apps below one call per hour, the
    /// rest log-uniform above that (span solved so the total is about `requests`); a third
    /// timer-triggered (periodic, common periods), a third Poisson, a third heavy-tailed
    /// (Pareto inter-arrivals, α = 1.5).
    fn azure(
        regions: Vec<Region>,
        nodes: Vec<Node>,
        rtt: Vec<f32>,
        requests: f64,
        rng: &mut StdRng,
    ) -> Scenario {
        let horizon_s = 86_400.0;
        let apps = ((requests / 2_000.0) as usize).clamp(60, 600);
        let rare = (apps as f64 * 0.45).round() as usize;
        let hourly: f64 = 1.0 / 3_600.0;
        // Rare apps: log-uniform between 1e-8/s and 1/h.
        let mut rates: Vec<f64> = (0..rare)
            .map(|_| 10f64.powf(rng.gen_range(-8.0..hourly.log10())))
            .collect();
        let rare_sum: f64 = rates.iter().sum();
        let us: Vec<f64> = (0..apps - rare).map(|_| rng.gen_range(0.0..1.0)).collect();
        let target = (requests / horizon_s - rare_sum).max(hourly);
        // Frequent apps: hourly × 10^(u × span), span by bisection.
        let total = |span: f64| {
            us.iter()
                .map(|u| hourly * 10f64.powf(u * span))
                .sum::<f64>()
        };
        let (mut lo, mut hi) = (0.0f64, 9.0f64);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if total(mid) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        rates.extend(us.iter().map(|u| hourly * 10f64.powf(u * lo)));
        const PERIODS: &[f64] = &[
            60.0, 120.0, 300.0, 600.0, 900.0, 1_200.0, 1_800.0, 3_600.0, 7_200.0, 10_800.0,
            21_600.0, 43_200.0, 86_400.0,
        ];
        let mut models = Vec::with_capacity(apps);
        let mut arrivals = Vec::with_capacity(requests as usize + 1024);
        let mut kinds = [0usize; 3];
        for (i, &rate) in rates.iter().enumerate() {
            let region = pick_weighted(REGION_WEIGHT, rng) as u16;
            let kind = rng.gen_range(0..3usize);
            kinds[kind] += 1;
            let svc_ms = 10f64.powf(rng.gen_range(1.0..2.5)); // 10 ms .. 316 ms
            let mem_mb = [128u64, 256, 512, 1024][rng.gen_range(0..4)];
            models.push(Model {
                name: format!("app-{i:04}"),
                service_us: svc_ms * 1e3,
                memory_bytes: mem_mb * MIB,
                artifact_bytes: mem_mb / 2 * MIB,
                load_us: rng.gen_range(200_000..2_000_000),
                concurrency: 4,
                accelerator: false,
            });
            let mut push = |t: f64| {
                if (0.0..horizon_s).contains(&t) {
                    arrivals.push(Arrival {
                        t_us: (t * 1e6) as u64,
                        model: i as u32,
                        region,
                    });
                }
            };
            match kind {
                0 => {
                    // Timer: the common period nearest (in log) to 1/rate.
                    let want = 1.0 / rate;
                    let period = PERIODS
                        .iter()
                        .copied()
                        .min_by(|a, b| {
                            (a.ln() - want.ln())
                                .abs()
                                .total_cmp(&(b.ln() - want.ln()).abs())
                        })
                        .unwrap_or(3_600.0);
                    let period = if want > 2.0 * 86_400.0 { want } else { period };
                    let mut t = rng.gen_range(0.0..period);
                    while t < horizon_s {
                        push(t + rng.gen_range(0.0..0.5));
                        t += period;
                    }
                }
                1 => {
                    let mut t = 0.0;
                    loop {
                        let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                        t += -u.ln() / rate;
                        if t >= horizon_s {
                            break;
                        }
                        push(t);
                    }
                }
                _ => {
                    // Pareto IATs, α = 1.5, mean 1/rate: x_m = mean / 3.
                    let xm = 1.0 / rate / 3.0;
                    let mut t = rng.gen_range(0.0..(1.0 / rate).min(horizon_s));
                    while t < horizon_s {
                        push(t);
                        let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                        t += xm / u.powf(1.0 / 1.5);
                    }
                }
            }
        }
        arrivals.sort_by_key(|a| (a.t_us, a.model, a.region));
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        Scenario {
            name: "azure".into(),
            regions,
            classes: classes(),
            nodes,
            rtt_us: rtt,
            models,
            arrivals,
            horizon_us: (horizon_s * 1e6) as u64,
            payload_bytes: 4 * 1024,
            notes: format!(
                "{apps} apps over 24 h, {rare} ({:.0}%) below 1 call/h, rates {:.1e}..{:.1e}/s \
                 ({:.1} orders of magnitude); {} timer, {} Poisson, {} Pareto(1.5)",
                rare as f64 * 100.0 / apps as f64,
                min,
                max,
                (max / min).log10(),
                kinds[0],
                kinds[1],
                kinds[2]
            ),
        }
    }

    /// RTT from region `r`'s callers to node `n`, µs.
    pub fn rtt(&self, n: usize, r: usize) -> f64 {
        self.rtt_us[n * self.regions.len() + r] as f64
    }
}
