//! Real-kernel tests: each test builds its own pair of network namespaces joined by a veth
//! (a "host" namespace standing in for the agent's, and a "chute" one), and removes them
//! in a Drop guard. Needs root.

// clippy.toml allows unwrap in #[test] fns only; the helpers here are test code too.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use tc_shaper::plan::Op;
use tc_shaper::{ChuteRates, ShapeError, Shaper};

static NEXT: AtomicU32 = AtomicU32::new(0);

const HOST_IP: &str = "10.99.0.1";
const CHUTE_IP: &str = "10.99.0.2";

/// Two namespaces and a veth between them, named after this process and a counter.
struct Lab {
    host_ns: String,
    chute_ns: String,
    host_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    fn new() -> Lab {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let lab = Lab {
            host_ns: format!("tcs{pid}h{n}"),
            chute_ns: format!("tcs{pid}c{n}"),
            host_if: format!("tcs{pid}v{n}"),
        };
        // Guard exists before anything is created, so a failure below still cleans up.
        ip(&["netns", "add", &lab.host_ns]);
        ip(&["netns", "add", &lab.chute_ns]);
        ip(&[
            "link",
            "add",
            &lab.host_if,
            "netns",
            &lab.host_ns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &lab.chute_ns,
        ]);
        ip(&[
            "-n",
            &lab.host_ns,
            "addr",
            "add",
            &format!("{HOST_IP}/30"),
            "dev",
            &lab.host_if,
        ]);
        ip(&["-n", &lab.host_ns, "link", "set", &lab.host_if, "up"]);
        ip(&[
            "-n",
            &lab.chute_ns,
            "addr",
            "add",
            &format!("{CHUTE_IP}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &lab.chute_ns, "link", "set", "eth0", "up"]);
        lab
    }

    fn host_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.host_ns)
    }

    fn chute_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.chute_ns)
    }

    fn shaper(&self) -> Shaper {
        Shaper::new().host_netns(self.host_path())
    }

    fn shape(&self, down: Option<u64>, up: Option<u64>) {
        let rates = ChuteRates {
            down_bps: down,
            up_bps: up,
        };
        let s = smol::block_on(self.shaper().shape_chute(&self.chute_path(), rates)).unwrap();
        assert_eq!(s.host_ifname, self.host_if);
        assert_eq!(s.chute_ifname, "eth0");
    }

    /// TCP goodput (bits/s) of a transfer toward (`down`) or from the chute, measured by
    /// the receiver over [0.5 s, 3.5 s] after the first byte, as the least-squares slope
    /// of bytes received over time. A slope rather than (bytes / window) because veths
    /// do GSO: at 2 mbit one 64 KB super-packet is 260 ms of tokens, so data arrives in
    /// lumps and two end points alone would carry up to ±9% quantisation error.
    fn goodput(&self, down: bool) -> f64 {
        let (rx_ns, tx_ns, rx_ip) = if down {
            (self.chute_path(), self.host_path(), CHUTE_IP)
        } else {
            (self.host_path(), self.chute_path(), HOST_IP)
        };
        let (ltx, lrx) = std::sync::mpsc::channel();
        let (shaper, chute) = (self.shaper(), self.chute_path());
        // The kernel's own L2 byte counter of the shaping class, for the log.
        let class_bytes = move || {
            let st = smol::block_on(shaper.chute_stats(&chute)).ok()?;
            Some(if down { st.down?.bytes } else { st.up?.bytes })
        };
        let receiver = std::thread::spawn(move || {
            enter(&rx_ns);
            let listener = TcpListener::bind((rx_ip, 0)).unwrap();
            ltx.send(listener.local_addr().unwrap()).unwrap();
            // Never hang the suite: give up if no sender shows up or the data stops.
            listener.set_nonblocking(true).unwrap();
            let give_up = Instant::now() + Duration::from_secs(15);
            let mut s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < give_up, "no sender connected");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            let mut first = None;
            let mut samples = Vec::new();
            let mut mark = None;
            loop {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "sender stopped early");
                total += n as u64;
                let t = first
                    .get_or_insert_with(Instant::now)
                    .elapsed()
                    .as_secs_f64();
                if t >= 0.5 {
                    if samples.is_empty() {
                        mark = Some((Instant::now(), class_bytes()));
                    }
                    samples.push((t, total as f64));
                }
                if t >= 3.5 {
                    if let Some((t0, Some(b0))) = mark {
                        let b1 = class_bytes().unwrap_or(b0);
                        let kbps = (b1 - b0) as f64 * 8.0 / t0.elapsed().as_secs_f64();
                        eprintln!("  kernel class counter over the window: {kbps:.0} bit/s (L2)");
                    }
                    return slope(&samples) * 8.0;
                }
            }
        });
        let addr = lrx.recv().unwrap();
        let sender = std::thread::spawn(move || {
            enter(&tx_ns);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
            let buf = vec![0x5au8; 1 << 16];
            let deadline = Instant::now() + Duration::from_secs(10);
            // Ends when the receiver closes (EPIPE/ECONNRESET) — or at the deadline.
            while Instant::now() < deadline && s.write_all(&buf).is_ok() {}
        });
        let bps = receiver.join().unwrap();
        sender.join().unwrap();
        bps
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth in it (and so its peer) and all qdiscs.
        for ns in [&self.host_ns, &self.chute_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    assert!(n > 10.0, "too few samples: {n}");
    let (mt, mb) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (t, x)| (a + t / n, b + x / n));
    let (num, den) = samples.iter().fold((0.0, 0.0), |(num, den), (t, x)| {
        (num + (t - mt) * (x - mb), den + (t - mt) * (t - mt))
    });
    num / den
}

fn enter(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
}

/// HTB counts L2 bytes; TCP goodput excludes headers. With MTU 1500 and TCP timestamps
/// (Linux default) a full segment carries 1448 payload bytes in a 1514-byte frame
/// (14 Ethernet + 20 IP + 32 TCP), so L2 rate = goodput * 1514 / 1448.
fn l2(goodput_bps: f64) -> f64 {
    goodput_bps * 1514.0 / 1448.0
}

fn assert_within_10pct(what: &str, configured: u64, goodput_bps: f64) {
    let ratio = l2(goodput_bps) / configured as f64;
    eprintln!(
        "{what}: configured {configured} bit/s, goodput {goodput_bps:.0} bit/s, L2 {:.0} bit/s, ratio {ratio:.3}",
        l2(goodput_bps)
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: ratio {ratio:.3} outside ±10%"
    );
}

fn throughput_both_directions(bps: u64) {
    let lab = Lab::new();
    lab.shape(Some(bps), Some(bps));
    assert_within_10pct(&format!("down {bps}"), bps, lab.goodput(true));
    assert_within_10pct(&format!("up {bps}"), bps, lab.goodput(false));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn throughput_2mbit() {
    throughput_both_directions(2_000_000);
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn throughput_8mbit() {
    throughput_both_directions(8_000_000);
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn throughput_32mbit() {
    throughput_both_directions(32_000_000);
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn unshaped_is_much_faster_than_shaped() {
    // Guards the measurement itself: if shaping were silently absent, the ±10% tests at
    // low rates would fail, but this proves the path can go far faster than 32 mbit.
    let lab = Lab::new();
    let bps = lab.goodput(true);
    assert!(bps > 200e6, "unshaped veth only reached {bps:.0} bit/s");
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn live_rate_change_takes_effect_without_rebuild() {
    let lab = Lab::new();
    lab.shape(Some(8_000_000), Some(8_000_000));
    assert_within_10pct("down 8m before change", 8_000_000, lab.goodput(true));
    let before = smol::block_on(lab.shaper().chute_stats(&lab.chute_path())).unwrap();
    let rates = ChuteRates {
        down_bps: Some(2_000_000),
        up_bps: Some(32_000_000),
    };
    let (down_ops, up_ops) = smol::block_on(lab.shaper().plan(&lab.chute_path(), rates)).unwrap();
    // A rate change changes the class in place (its counters survive). The TBF leaf is
    // changed in place when its bucket grows and swapped when it shrinks (a packet
    // admitted under the bigger bucket would otherwise block it: seen here as a
    // connection that could not even be opened before the planner knew).
    assert!(
        matches!(
            down_ops.as_slice(),
            [
                Op::ChangeClass(_),
                Op::DeleteLeaf { .. },
                Op::ReplaceLeaf(_)
            ]
        ),
        "{down_ops:?}"
    );
    assert!(
        matches!(up_ops.as_slice(), [Op::ChangeClass(_), Op::ChangeLeaf(_)]),
        "{up_ops:?}"
    );
    lab.shape(rates.down_bps, rates.up_bps);
    let after = smol::block_on(lab.shaper().chute_stats(&lab.chute_path())).unwrap();
    let (b, a) = (before.down.unwrap(), after.down.unwrap());
    assert_eq!(a.rate_bps, 2_000_000);
    assert!(
        a.bytes >= b.bytes,
        "class counters reset: the tree was rebuilt, not changed"
    );
    assert_within_10pct("down 2m after change", 2_000_000, lab.goodput(true));
    assert_within_10pct("up 32m after change", 32_000_000, lab.goodput(false));
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn apply_readback_adopt_and_remove() {
    let lab = Lab::new();
    let chute = lab.chute_path();
    let sh = lab.shaper();
    let rates = ChuteRates {
        down_bps: Some(8_000_000),
        up_bps: Some(2_000_000),
    };
    lab.shape(rates.down_bps, rates.up_bps);

    let st = smol::block_on(sh.chute_stats(&chute)).unwrap();
    let down = st.down.clone().unwrap();
    let up = st.up.clone().unwrap();
    assert_eq!(
        (down.interface.as_str(), down.rate_bps),
        (lab.host_if.as_str(), 8_000_000)
    );
    assert_eq!((up.interface.as_str(), up.rate_bps), ("eth0", 2_000_000));

    // Applying again (e.g. after an agent restart) adopts what is there.
    assert_eq!(
        smol::block_on(sh.plan(&chute, rates)).unwrap(),
        (vec![], vec![])
    );
    lab.shape(rates.down_bps, rates.up_bps);

    // Traffic shows up in the counters of the direction it used.
    lab.goodput(true);
    let st2 = smol::block_on(sh.chute_stats(&chute)).unwrap();
    let down2 = st2.down.unwrap();
    assert!(down2.bytes > down.bytes + 1_000_000, "{down2:?}");
    assert!(down2.packets > down.packets + 500);
    assert!(
        down2.overlimits > 0,
        "a saturating sender must hit the limit: {down2:?}"
    );

    // Removing one direction leaves the other alone.
    lab.shape(rates.down_bps, None);
    let st3 = smol::block_on(sh.chute_stats(&chute)).unwrap();
    assert!(st3.up.is_none());
    assert_eq!(st3.down.unwrap().rate_bps, 8_000_000);

    smol::block_on(sh.unshape_chute(&chute)).unwrap();
    assert_eq!(
        smol::block_on(sh.chute_stats(&chute)).unwrap(),
        Default::default()
    );
    smol::block_on(sh.unshape_chute(&chute)).unwrap();
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn htb_without_tbf_leaf_is_built_adopted_and_accurate() {
    let lab = Lab::new();
    let chute = lab.chute_path();
    let sh = lab.shaper().tbf_leaf(false);
    let rates = ChuteRates {
        down_bps: Some(2_000_000),
        up_bps: None,
    };
    smol::block_on(sh.shape_chute(&chute, rates)).unwrap();
    assert_eq!(
        smol::block_on(sh.plan(&chute, rates)).unwrap(),
        (vec![], vec![])
    );
    assert_within_10pct("down 2m without tbf leaf", 2_000_000, lab.goodput(true));
    // Switching the leaf on adds only the leaf.
    let (down_ops, _) = smol::block_on(lab.shaper().plan(&chute, rates)).unwrap();
    assert!(
        matches!(down_ops.as_slice(), [Op::ReplaceLeaf(_)]),
        "{down_ops:?}"
    );
    smol::block_on(lab.shaper().shape_chute(&chute, rates)).unwrap();
    // And off again removes only the leaf.
    let (down_ops, _) = smol::block_on(sh.plan(&chute, rates)).unwrap();
    assert!(
        matches!(down_ops.as_slice(), [Op::DeleteLeaf { .. }]),
        "{down_ops:?}"
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn foreign_root_qdisc_is_replaced_and_left_alone_on_unshape() {
    let lab = Lab::new();
    let chute = lab.chute_path();
    ip(&[
        "-n",
        &lab.chute_ns,
        "link",
        "set",
        "eth0",
        "txqueuelen",
        "1000",
    ]);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.chute_ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "handle",
            "5:",
            "tbf",
        ])
        .args(["rate", "1mbit", "burst", "10k", "latency", "50ms"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not ours: unshaping must not touch it.
    smol::block_on(lab.shaper().unshape_chute(&chute)).unwrap();
    let show = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.chute_ns,
            "tc",
            "qdisc",
            "show",
            "dev",
            "eth0",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains("tbf 5:"));
    // Shaping replaces it.
    lab.shape(None, Some(4_000_000));
    let st = smol::block_on(lab.shaper().chute_stats(&chute)).unwrap();
    assert_eq!(st.up.unwrap().rate_bps, 4_000_000);
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn errors_name_what_went_wrong() {
    let lab = Lab::new();
    let chute = lab.chute_path();
    let sh = lab.shaper();
    let bad = ChuteRates {
        down_bps: Some(10),
        up_bps: None,
    };
    let e = smol::block_on(sh.shape_chute(&chute, bad)).unwrap_err();
    assert!(matches!(e, ShapeError::InvalidRate { .. }), "{e}");

    let missing = Path::new("/run/netns/tcs-does-not-exist");
    let e = smol::block_on(sh.shape_chute(missing, ChuteRates::default())).unwrap_err();
    assert!(
        matches!(&e, ShapeError::Netns { path, .. } if path == missing),
        "{e}"
    );
    smol::block_on(sh.unshape_chute(missing)).unwrap();

    // The veth vanishes (the container was removed): stats say so, unshape is fine.
    lab.shape(Some(2_000_000), Some(2_000_000));
    ip(&["-n", &lab.chute_ns, "link", "del", "eth0"]);
    let e = smol::block_on(sh.chute_stats(&chute)).unwrap_err();
    assert!(matches!(e, ShapeError::NoChuteInterface { .. }), "{e}");
    smol::block_on(sh.unshape_chute(&chute)).unwrap();
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn invalid_rate_in_one_direction_builds_nothing() {
    let lab = Lab::new();
    let chute = lab.chute_path();
    let sh = lab.shaper().link_bps(Some(10_000_000));
    let rates = ChuteRates {
        down_bps: Some(2_000_000),
        up_bps: Some(20_000_000),
    };
    let e = smol::block_on(sh.shape_chute(&chute, rates)).unwrap_err();
    assert!(
        matches!(
            e,
            ShapeError::InvalidRate {
                direction: tc_shaper::Direction::Up,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        smol::block_on(lab.shaper().chute_stats(&chute)).unwrap(),
        Default::default()
    );
}

#[test]
#[ignore = "needs root (network namespaces); scripts/test.sh runs it with --include-ignored"]
fn failure_on_upload_side_removes_the_download_tree_it_built() {
    let lab = Lab::new();
    let chute = lab.chute_path();
    // A foreign tree on the chute side whose inner qdisc already uses handle 1: makes the
    // kernel refuse our root 1: (EINVAL, "must match existing qdisc") — after the host
    // side has been built.
    let tc = |args: &str| {
        let out = Command::new("tc")
            .args(["-n", &lab.chute_ns])
            .args(args.split(' '))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tc {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tc("qdisc add dev eth0 root handle 5: htb");
    tc("class add dev eth0 parent 5: classid 5:1 htb rate 1mbit");
    tc("qdisc add dev eth0 parent 5:1 handle 1: tbf rate 1mbit burst 10k latency 50ms");
    let rates = ChuteRates {
        down_bps: Some(2_000_000),
        up_bps: Some(2_000_000),
    };
    let e = smol::block_on(lab.shaper().shape_chute(&chute, rates)).unwrap_err();
    assert!(
        matches!(&e, ShapeError::Netlink { op: "replace root qdisc", interface, .. } if interface == "eth0"),
        "{e}"
    );
    let st = smol::block_on(lab.shaper().chute_stats(&chute)).unwrap();
    assert_eq!(st, Default::default(), "download tree left behind");
    let (down_ops, _) = smol::block_on(lab.shaper().plan(&chute, rates)).unwrap();
    assert_eq!(
        down_ops.first(),
        Some(&Op::ReplaceRoot),
        "host side not back to empty"
    );
}
