//! The results: one row per measurement (mount, local, their ratio), grouped by section, printed
//! as a table or JSON. A section that could not run says why instead of failing the whole bench,
//! so an operator still gets the rest.
use serde_json::{json, Value};

/// One measurement.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) mount: Option<f64>,
    pub(crate) local: Option<f64>,
    /// mount / local: the median of the per-round ratios where there were rounds.
    pub(crate) ratio: Option<f64>,
    /// mount / local of each A/B round.
    pub(crate) rounds: Vec<f64>,
}

impl Row {
    pub(crate) fn single(name: &str, mount: f64) -> Row {
        Row {
            name: name.into(),
            mount: Some(mount),
            local: None,
            ratio: None,
            rounds: Vec::new(),
        }
    }

    /// From paired rounds: medians of each side and of the per-round ratios.
    pub(crate) fn paired(name: &str, mount: &[f64], local: &[f64]) -> Row {
        let rounds: Vec<f64> = mount
            .iter()
            .zip(local)
            .filter(|(_, l)| **l > 0.0)
            .map(|(m, l)| m / l)
            .collect();
        Row {
            name: name.into(),
            mount: median(mount),
            local: median(local),
            ratio: median(&rounds),
            rounds,
        }
    }
}

pub(crate) struct Section {
    pub(crate) name: String,
    /// "ran", or "skipped: <why>".
    pub(crate) status: String,
    pub(crate) rows: Vec<Row>,
    pub(crate) notes: Vec<String>,
    pub(crate) extra: serde_json::Map<String, Value>,
}

pub(crate) struct Report {
    config: Value,
    pub(crate) sections: Vec<Section>,
    /// Warm read latencies in ms (sorted samples) for the chart: mount, local.
    pub(crate) cdf: Option<(Vec<f64>, Vec<f64>)>,
}

/// The median of `v` (None if empty).
pub(crate) fn median(v: &[f64]) -> Option<f64> {
    percentile(v, 0.5)
}

/// The `p` quantile (0..=1) of `v`, nearest rank.
pub(crate) fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(((s.len() as f64 - 1.0) * p).round() as usize).copied()
}

impl Report {
    pub(crate) fn new(config: Value) -> Report {
        Report {
            config,
            sections: Vec::new(),
            cdf: None,
        }
    }

    pub(crate) fn section(&mut self, name: &str) -> &mut Section {
        self.sections.push(Section {
            name: name.into(),
            status: "ran".into(),
            rows: Vec::new(),
            notes: Vec::new(),
            extra: Default::default(),
        });
        let n = self.sections.len() - 1;
        &mut self.sections[n]
    }

    pub(crate) fn skip(&mut self, name: &str, why: &str) {
        self.section(name).status = format!("skipped: {why}");
    }

    pub(crate) fn to_json(&self) -> Value {
        let mut sections = serde_json::Map::new();
        for s in &self.sections {
            let rows: Vec<Value> = s
                .rows
                .iter()
                .map(|r| {
                    json!({"name": r.name, "mount": r.mount, "local": r.local, "ratio": r.ratio, "rounds": r.rounds})
                })
                .collect();
            let mut v = json!({"status": s.status, "rows": rows, "notes": s.notes});
            if let Value::Object(m) = &mut v {
                m.extend(s.extra.clone());
            }
            sections.insert(s.name.clone(), v);
        }
        json!({"config": self.config, "sections": sections})
    }

    pub(crate) fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(&self.to_json())?);
            return Ok(());
        }
        println!("codafs bench: {}", self.config);
        println!("| section | measurement | mount | local | ratio (median of rounds) |");
        println!("|---|---|---|---|---|");
        // Latencies of local reads are microseconds: small values keep their significant digits.
        let f = |v: Option<f64>| {
            v.map_or("–".to_string(), |x| {
                if x.abs() < 10.0 {
                    format!("{x:.4}")
                } else {
                    format!("{x:.1}")
                }
            })
        };
        for s in &self.sections {
            if s.status != "ran" {
                println!("| {} | {} | | | |", s.name, s.status);
                continue;
            }
            for r in &s.rows {
                let ratio = r.ratio.map_or("–".to_string(), |x| {
                    let rounds: Vec<String> = r.rounds.iter().map(|x| format!("{x:.2}")).collect();
                    if rounds.is_empty() {
                        format!("{x:.2}")
                    } else {
                        format!("{x:.2} ({})", rounds.join(", "))
                    }
                });
                println!(
                    "| {} | {} | {} | {} | {} |",
                    s.name,
                    r.name,
                    f(r.mount),
                    f(r.local),
                    ratio
                );
            }
            for n in &s.notes {
                println!("| {} | note: {n} | | | |", s.name);
            }
        }
        Ok(())
    }
}
