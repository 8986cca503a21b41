//! The `ssegate` binary's allocator (src/main.rs): mimalloc, whose arenas are reserved
//! uncommitted unless `MIMALLOC_ARENA_EAGER_COMMIT` says otherwise. Checked on the running
//! binary through the kernel's view of its mappings: an uncommitted arena is a large
//! `PROT_NONE` reservation, an eagerly committed one is readable and writable throughout.

#![cfg(target_os = "linux")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Larger than anything but a mimalloc arena (1 GiB reserved at a time).
const ARENA_SIZE: u64 = 512 << 20;

/// Size and permissions of every mapping of `pid` at least `ARENA_SIZE` long.
fn large_mappings(pid: u32) -> Vec<(u64, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (start, end) = parts.next()?.split_once('-')?;
            let size = u64::from_str_radix(end, 16).ok()? - u64::from_str_radix(start, 16).ok()?;
            let perms = parts.next()?.to_string();
            (size >= ARENA_SIZE).then_some((size, perms))
        })
        .collect()
}

/// Starts `ssegate run` with `env` set, waits until its arena is mapped, and returns its
/// large mappings.
fn arena_of_running_ssegate(env: &[(&str, &str)]) -> Vec<(u64, String)> {
    let config = tempfile::tempdir().unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ssegate"));
    cmd.args(["run", "--config"])
        .arg(config.path())
        .args([
            "--listen",
            &free(),
            "--admin",
            &free(),
            "--listen-tls",
            "off",
        ])
        .env_remove("MIMALLOC_ARENA_EAGER_COMMIT")
        .env_remove("MIMALLOC_EAGER_REGION_COMMIT")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start ssegate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let found = large_mappings(child.id());
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    found
}

#[test]
fn arenas_are_committed_on_demand_by_default() {
    let maps = arena_of_running_ssegate(&[]);
    assert!(
        maps.iter().any(|(_, perms)| perms.starts_with("---")),
        "no uncommitted arena reservation: {maps:?}"
    );
    assert!(
        !maps.iter().any(|(_, perms)| perms.starts_with("rw")),
        "an arena was committed eagerly: {maps:?}"
    );
}

#[test]
fn the_environment_still_decides_when_set() {
    let maps = arena_of_running_ssegate(&[("MIMALLOC_ARENA_EAGER_COMMIT", "1")]);
    assert!(
        maps.iter().any(|(_, perms)| perms.starts_with("rw")),
        "MIMALLOC_ARENA_EAGER_COMMIT=1 did not commit the arena: {maps:?}"
    );
}
