//! Bandwidth shaping of real chutes, measured at the receiving end.
//!
//! Traffic runs between the host and a chute's own network namespace (entered by the test
//! through the namespace file Podman reports, so the chute image needs no tools). Rates are
//! measured as TCP goodput at the receiver over a steady-state window; the configured rate
//! counts L2 bytes, so goodput sits ~4% under it (1448 payload bytes per 1514-byte frame).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use e2e::*;

const SLEEPER: &str = r#"["sleep", "3600"]"#;
/// Skip slow start and the initial burst; measure the rest.
const WARMUP: Duration = Duration::from_millis(800);
const MEASURE: Duration = Duration::from_millis(3000);

fn sandbox_key(name: &str) -> String {
    podman_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.SandboxKey}}",
        &format!("chute-{name}"),
    ])
}

fn chute_ip(name: &str) -> Ipv4Addr {
    podman_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.IPAddress}}",
        &format!("chute-{name}"),
    ])
    .parse()
    .unwrap()
}

fn gateway_ip(name: &str) -> Ipv4Addr {
    podman_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Gateway}}",
        &format!("chute-{name}"),
    ])
    .parse()
    .unwrap()
}

/// Runs `f` on a thread that has entered the network namespace at `netns`.
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(netns).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// Receives until the sender closes; returns steady-state goodput in bits/s.
fn receive(mut s: TcpStream) -> f64 {
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut window_bytes = 0u64;
    let mut window_start = None;
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        let t = start.elapsed();
        if t >= WARMUP && t < WARMUP + MEASURE {
            if window_start.is_none() {
                window_start = Some(Instant::now());
            } else {
                window_bytes += n as u64;
            }
        }
        if t >= WARMUP + MEASURE {
            break;
        }
    }
    let secs = window_start
        .map(|w| w.elapsed().as_secs_f64())
        .unwrap_or(1.0)
        .min(MEASURE.as_secs_f64());
    window_bytes as f64 * 8.0 / secs
}

/// Sends for WARMUP + MEASURE + a margin, or until the receiver goes away.
fn send(mut s: TcpStream) {
    let buf = vec![0x5au8; 64 * 1024];
    let deadline = Instant::now() + WARMUP + MEASURE + Duration::from_secs(2);
    while Instant::now() < deadline {
        if s.write_all(&buf).is_err() {
            break;
        }
    }
}

/// Download: the host sends to a receiver inside the chute's namespace.
fn measure_down(name: &str) -> f64 {
    let netns = sandbox_key(name);
    let ip = chute_ip(name);
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = in_netns(&netns, move || {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        tx.send(l.local_addr().unwrap().port()).unwrap();
        let (s, _) = l.accept().unwrap();
        receive(s)
    });
    let port = rx.recv().unwrap();
    let s = TcpStream::connect(SocketAddr::from((ip, port))).unwrap();
    let sender = std::thread::spawn(move || send(s));
    let rate = receiver.join().unwrap();
    sender.join().unwrap();
    rate
}

/// Upload: a sender inside the chute's namespace sends to the host (the bridge gateway).
fn measure_up(name: &str) -> f64 {
    let netns = sandbox_key(name);
    let gw = gateway_ip(name);
    let l = TcpListener::bind((gw, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let sender = in_netns(&netns, move || {
        let s = TcpStream::connect(SocketAddr::from((gw, port))).unwrap();
        send(s);
    });
    let (s, _) = l.accept().unwrap();
    let rate = receive(s);
    sender.join().unwrap();
    rate
}

/// HTB counts L2 bytes (Ethernet header + IP packet); a full TCP segment with timestamps
/// carries 1448 payload bytes in a 1514-byte frame. Compare like with like.
const L2_PER_GOODPUT: f64 = 1514.0 / 1448.0;

/// Transfers in this file run one at a time: on a 2-core machine, concurrent tests would
/// measure CPU contention, not shaping.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn assert_within(what: &str, goodput_bps: f64, configured_bps: f64) {
    let measured_bps = goodput_bps * L2_PER_GOODPUT;
    let ratio = measured_bps / configured_bps;
    eprintln!(
        "{what}: configured {:.2} Mbit/s, measured {:.2} Mbit/s (goodput {:.2}), ratio {ratio:.3}",
        configured_bps / 1e6,
        measured_bps / 1e6,
        goodput_bps / 1e6
    );
    assert!(
        (0.90..=1.10).contains(&ratio),
        "{what}: measured/configured = {ratio:.3}, outside ±10%"
    );
}

fn manifest(name: &str, down: &str, up: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"1\"\nimage = \"{IMAGE}\"\ncommand = {SLEEPER}\n\
         [resources]\ncpu = 0.25\nmemory = \"32MiB\"\npids = 32\n\
         [network]\nbandwidth_down = \"{down}\"\nbandwidth_up = \"{up}\"\n"
    )
}

#[test]
#[ignore = "needs root and Podman, netns; scripts/test.sh runs it with --include-ignored"]
fn a_chute_gets_its_manifest_rates_both_ways_and_a_live_change_holds() {
    let _serial = serial();
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("shape");
    let dir = w.chute_dir(&name, SLEEPER, "");
    std::fs::write(dir.join("chute.toml"), manifest(&name, "8mbit", "4mbit")).unwrap();
    w.deploy(&dir);
    let v = w.inspect(&name);
    assert_eq!(v.net.as_ref().unwrap().down_rate_bps, 8_000_000, "{v:?}");
    assert_within("download 8mbit", measure_down(&name), 8e6);
    assert_within("upload 4mbit", measure_up(&name), 4e6);

    // The kernel counted what it shaped, and the agent reports it.
    let v = w.inspect(&name);
    assert!(v.net.as_ref().unwrap().down_bytes > 2_000_000, "{v:?}");
    assert!(v.net.as_ref().unwrap().up_bytes > 1_000_000, "{v:?}");

    // Live change: same container, same start time, new rate.
    let id = v.container_id.as_deref().unwrap().to_owned();
    let started = w.started_at(&name);
    std::fs::write(dir.join("chute.toml"), manifest(&name, "2mbit", "4mbit")).unwrap();
    let r = w.deploy(&dir);
    assert_eq!(r.outcome, DeployOutcome::Updated { live: true }, "{r:?}");
    assert_eq!(w.inspect(&name).container_id.as_deref().unwrap(), id);
    assert_eq!(w.started_at(&name), started);
    assert_within(
        "download after live change to 2mbit",
        measure_down(&name),
        2e6,
    );
    assert_eq!(w.status().pools.used.bandwidth_down_bps, 2_000_000);

    // Re-applied after a restart (a new namespace and veth).
    w.cli(&["restart", &name]);
    assert_within("download after restart", measure_down(&name), 2e6);

    // A growth the pool cannot hold is refused and the old rate stays.
    std::fs::write(dir.join("chute.toml"), manifest(&name, "500mbit", "4mbit")).unwrap();
    let err = w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(err.contains("bandwidth"), "{err}");
    assert_eq!(
        w.inspect(&name).net.as_ref().unwrap().down_rate_bps,
        2_000_000
    );
}

#[test]
#[ignore = "needs root and Podman, netns; scripts/test.sh runs it with --include-ignored"]
fn two_chutes_shaped_at_different_rates_at_once_each_get_their_own() {
    let _serial = serial();
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let slow = unique("slow");
    let fast = unique("fast");
    for (n, down) in [(&slow, "4mbit"), (&fast, "16mbit")] {
        let dir = w.chute_dir(n, SLEEPER, "");
        std::fs::write(dir.join("chute.toml"), manifest(n, down, "2mbit")).unwrap();
        w.deploy(&dir);
    }
    let (s2, f2) = (slow.clone(), fast.clone());
    let a = std::thread::spawn(move || measure_down(&s2));
    let b = std::thread::spawn(move || measure_down(&f2));
    assert_within(
        "slow chute download 4mbit (concurrent)",
        a.join().unwrap(),
        4e6,
    );
    assert_within(
        "fast chute download 16mbit (concurrent)",
        b.join().unwrap(),
        16e6,
    );
}

#[test]
#[ignore = "needs root and Podman, netns; scripts/test.sh runs it with --include-ignored"]
fn shaping_survives_an_agent_restart_without_duplication_and_goes_with_the_chute() {
    let _serial = serial();
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("keep");
    let dir = w.chute_dir(&name, SLEEPER, "");
    std::fs::write(dir.join("chute.toml"), manifest(&name, "8mbit", "4mbit")).unwrap();
    w.deploy(&dir);
    let host_if = w.inspect(&name).shaping.expect("shaped").host_interface;
    // Interface names are reused quickly; the index identifies this veth.
    let ifindex = std::fs::read_to_string(format!("/sys/class/net/{host_if}/ifindex"))
        .unwrap()
        .trim()
        .to_owned();
    let classes = |iface: &str| {
        let o = std::process::Command::new("tc")
            .args(["class", "show", "dev", iface])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("class htb"))
            .count()
    };
    assert_eq!(classes(&host_if), 1);
    w.kill_agent();
    w.start_agent();
    assert_eq!(classes(&host_if), 1, "adoption must not duplicate the tree");
    assert_within("download after agent restart", measure_down(&name), 8e6);
    w.cli(&["remove", &name]);
    let still_there = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            std::fs::read_to_string(e.path().join("ifindex"))
                .map(|i| i.trim() == ifindex)
                .unwrap_or(false)
        });
    assert!(
        !still_there,
        "host-side veth {host_if} (ifindex {ifindex}) should be gone with the chute"
    );
    assert_eq!(w.status().pools.used.bandwidth_down_bps, 0);
}
