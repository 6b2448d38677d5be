//! Times shaping setup for 1 and for 100 chutes with this crate, against the `tc` command
//! line doing the same work (HTB root + class + TBF leaf, on both sides of each veth) in
//! the same run. Needs root; creates `tcb<pid>*` namespaces and removes them on exit.
//!
//! `cargo run --release -p tc-shaper --example bench_apply [-- N...]` (default: 1 100)

// A benchmark binary: panicking with the failed step is the right error handling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tc_shaper::{ChuteRates, Shaper};

const DOWN_BPS: u64 = 8_000_000;
const UP_BPS: u64 = 2_000_000;

struct Lab {
    host_ns: String,
    chutes: Vec<String>,
    host_ifs: Vec<String>,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?}");
}

impl Lab {
    fn new(tag: &str, n: usize) -> Lab {
        let pid = std::process::id();
        let mut lab = Lab {
            host_ns: format!("tcb{pid}{tag}h"),
            chutes: Vec::new(),
            host_ifs: Vec::new(),
        };
        ip(&["netns", "add", &lab.host_ns]);
        for i in 0..n {
            let (c, v) = (format!("tcb{pid}{tag}c{i}"), format!("tcb{pid}{tag}v{i}"));
            ip(&["netns", "add", &c]);
            lab.chutes.push(c.clone());
            ip(&[
                "link",
                "add",
                &v,
                "netns",
                &lab.host_ns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &c,
            ]);
            lab.host_ifs.push(v);
        }
        lab
    }

    fn chute_path(&self, i: usize) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.chutes[i])
    }

    fn shaper(&self) -> Shaper {
        Shaper::new().host_netns(PathBuf::from("/run/netns").join(&self.host_ns))
    }

    fn with_lib(&self) -> Duration {
        let sh = self.shaper();
        let rates = ChuteRates {
            down_bps: Some(DOWN_BPS),
            up_bps: Some(UP_BPS),
        };
        let t = Instant::now();
        smol::block_on(async {
            for i in 0..self.chutes.len() {
                sh.shape_chute(&self.chute_path(i), rates).await.unwrap();
            }
        });
        let d = t.elapsed();
        smol::block_on(async {
            for i in 0..self.chutes.len() {
                sh.unshape_chute(&self.chute_path(i)).await.unwrap();
            }
        });
        d
    }

    /// The commands an operator (or Paradrop's shaping code) would run: 3 per side.
    fn tc_lines(dev: &str, bps: u64) -> [String; 3] {
        let kbit = bps / 1000;
        let burst = bps / 8 / 100 + 1514;
        let limit = (bps / 8 / 5).max(4 * 65_536) + burst;
        [
            format!("qdisc replace dev {dev} root handle 1: htb default 1"),
            format!("class add dev {dev} parent 1: classid 1:1 htb rate {kbit}kbit ceil {kbit}kbit burst {burst} cburst {burst}"),
            format!("qdisc replace dev {dev} parent 1:1 handle 10: tbf rate {kbit}kbit burst {burst} limit {limit}"),
        ]
    }

    fn with_tc(&self, batch: bool) -> Duration {
        let t = Instant::now();
        for (i, c) in self.chutes.iter().enumerate() {
            for (ns, dev, bps) in [
                (&self.host_ns, self.host_ifs[i].as_str(), DOWN_BPS),
                (c, "eth0", UP_BPS),
            ] {
                let lines = Self::tc_lines(dev, bps);
                if batch {
                    let mut child = Command::new("tc")
                        .args(["-n", ns, "-batch", "-"])
                        .stdin(Stdio::piped())
                        .spawn()
                        .unwrap();
                    use std::io::Write;
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(lines.join("\n").as_bytes())
                        .unwrap();
                    assert!(child.wait().unwrap().success());
                } else {
                    for l in &lines {
                        let st = Command::new("tc")
                            .args(["-n", ns])
                            .args(l.split(' '))
                            .status()
                            .unwrap();
                        assert!(st.success(), "tc {l}");
                    }
                }
            }
        }
        let d = t.elapsed();
        for (i, c) in self.chutes.iter().enumerate() {
            for (ns, dev) in [(&self.host_ns, self.host_ifs[i].as_str()), (c, "eth0")] {
                let _ = Command::new("tc")
                    .args(["-n", ns, "qdisc", "del", "dev", dev, "root"])
                    .status();
            }
        }
        d
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.chutes.iter().chain([&self.host_ns]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let ns: Vec<usize> = {
        let a: Vec<usize> = std::env::args()
            .skip(1)
            .map(|a| a.parse().expect("N"))
            .collect();
        if a.is_empty() {
            vec![1, 100]
        } else {
            a
        }
    };
    println!("shaping setup, both directions (HTB root + class + TBF leaf per side)");
    println!(
        "{:>6} {:>12} {:>14} {:>14} {:>10} {:>10}",
        "chutes", "lib ms", "tc ms", "tc -batch ms", "tc/lib", "batch/lib"
    );
    for (k, &n) in ns.iter().enumerate() {
        let lab = Lab::new(&format!("{k}"), n);
        // Warm up (module autoload, page cache for the tc binary) outside the timing.
        let _ = lab.with_lib();
        let _ = lab.with_tc(false);
        let lib = lab.with_lib();
        let tc = lab.with_tc(false);
        let batch = lab.with_tc(true);
        println!(
            "{n:>6} {:>12.1} {:>14.1} {:>14.1} {:>10.1} {:>10.1}",
            ms(lib),
            ms(tc),
            ms(batch),
            tc.as_secs_f64() / lib.as_secs_f64(),
            batch.as_secs_f64() / lib.as_secs_f64()
        );
    }
}
