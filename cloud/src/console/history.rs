//! The last hour of heartbeats per device, in memory, for the device page's charts.
//! The store keeps only the newest heartbeat; a sampler copies each new one here. A
//! bounded ring per device (at most [`MAX_SAMPLES`], none older than [`WINDOW`]), lost
//! on restart: the charts are for looking at now, not an archive (that is /metrics).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

pub const WINDOW: i64 = 3600;
pub const MAX_SAMPLES: usize = 1800;

/// One chute's usage in one heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct ChuteSample {
    pub name: String,
    pub cpu_millicores: f64,
    pub memory_bytes: f64,
    pub rx_bytes: f64,
    pub tx_bytes: f64,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub at: i64,
    pub chutes: Vec<ChuteSample>,
}

#[derive(Default)]
pub struct History {
    devices: Mutex<HashMap<String, VecDeque<Sample>>>,
}

/// Usage series of one chute, x = seconds ago.
#[derive(Debug, Default)]
pub struct Series {
    pub cpu: Vec<(f64, f64)>,
    pub memory: Vec<(f64, f64)>,
    /// bits per second received (toward the chute) and sent.
    pub rx_bps: Vec<(f64, f64)>,
    pub tx_bps: Vec<(f64, f64)>,
}

impl History {
    /// Records the heartbeat `hb` taken at `at` (ignored if not newer than the last one).
    pub fn record(&self, device: &str, at: i64, hb: &Value, now: i64) {
        let chutes = hb["chutes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some(ChuteSample {
                    name: c["name"].as_str()?.to_owned(),
                    cpu_millicores: c["cpu_millicores"].as_f64()?,
                    memory_bytes: c["memory_bytes"].as_f64()?,
                    rx_bytes: c["rx_bytes"].as_f64().unwrap_or(0.0),
                    tx_bytes: c["tx_bytes"].as_f64().unwrap_or(0.0),
                })
            })
            .collect();
        let Ok(mut m) = self.devices.lock() else {
            return;
        };
        let ring = m.entry(device.to_owned()).or_default();
        if ring.back().is_some_and(|s| s.at >= at) {
            return;
        }
        ring.push_back(Sample { at, chutes });
        while ring.len() > MAX_SAMPLES || ring.front().is_some_and(|s| s.at < now - WINDOW) {
            ring.pop_front();
        }
    }

    /// Forgets devices not in `keep`.
    pub fn retain(&self, keep: &[String]) {
        if let Ok(mut m) = self.devices.lock() {
            m.retain(|k, _| keep.contains(k));
        }
    }

    pub fn series(&self, device: &str, chute: &str, now: i64) -> Series {
        let mut out = Series::default();
        let Ok(m) = self.devices.lock() else {
            return out;
        };
        let Some(ring) = m.get(device) else {
            return out;
        };
        let mut prev: Option<(i64, &ChuteSample)> = None;
        for s in ring.iter().filter(|s| s.at >= now - WINDOW) {
            let Some(c) = s.chutes.iter().find(|c| c.name == chute) else {
                prev = None;
                continue;
            };
            let ago = (now - s.at) as f64;
            out.cpu.push((ago, c.cpu_millicores));
            out.memory.push((ago, c.memory_bytes));
            if let Some((pt, p)) = prev {
                let dt = (s.at - pt).max(1) as f64;
                // Counters restart with the container: a drop is not negative traffic.
                out.rx_bps
                    .push((ago, (c.rx_bytes - p.rx_bytes).max(0.0) * 8.0 / dt));
                out.tx_bps
                    .push((ago, (c.tx_bytes - p.tx_bytes).max(0.0) * 8.0 / dt));
            }
            prev = Some((s.at, c));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hb(cpu: u64, rx: u64) -> Value {
        json!({"chutes": [{"name": "a", "state": "running", "cpu_millicores": cpu, "memory_bytes": 1000, "rx_bytes": rx, "tx_bytes": 0}]})
    }

    #[test]
    fn keeps_the_last_hour_and_derives_rates() {
        let h = History::default();
        h.record("d", 100, &hb(5, 0), 100);
        h.record("d", 100, &hb(9, 0), 100); // same heartbeat again: ignored
        h.record("d", 110, &hb(7, 1000), 110);
        let s = h.series("d", "a", 110);
        assert_eq!(s.cpu, vec![(10.0, 5.0), (0.0, 7.0)]);
        assert_eq!(s.rx_bps, vec![(0.0, 800.0)]);
        // An hour later the old samples are gone.
        h.record("d", 110 + WINDOW + 1, &hb(1, 0), 110 + WINDOW + 1);
        let s = h.series("d", "a", 110 + WINDOW + 1);
        assert_eq!(s.cpu.len(), 1);
        assert_eq!(s.rx_bps, vec![]);
    }
}
