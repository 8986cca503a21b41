//! Thread-per-core serving over real loopback sockets: streams spread over the workers'
//! SO_REUSEPORT sockets all relay events and are all drained; a busy port fails start-up.

mod common;

use std::time::Duration;

use common::*;
use ssegate::server::DrainConfig;
use tokio::net::{TcpListener, TcpStream};

const WORKERS: usize = 3;
const STREAMS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_every_worker_relay_events_and_are_all_drained() {
    let mut backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", ""));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let mut ss = start_ssegate_tweaked(&cfg, |c| c.workers = WORKERS).await;
    assert_eq!(
        ss.worker_tasks(),
        vec![0; WORKERS],
        "accept loops are not tasks"
    );

    let mut clients = Vec::new();
    let mut upstreams = Vec::new();
    for i in 0..STREAMS {
        let mut r = get(ss.proxy_addr, "h", "/events").await;
        assert_eq!(r.status, 200);
        let s = backend.next_stream().await;
        s.send(format!("id: {i}\ndata: first\n\n")).await;
        assert_eq!(
            r.chunk().await.unwrap(),
            format!("id: {i}\ndata: first\n\n")
        );
        clients.push(r);
        upstreams.push(s);
    }
    // The kernel spread the connections: every worker holds some (24 connections over 3
    // sockets all landing on fewer is a (2/3)^24 chance per pair of workers).
    let tasks = ss.worker_tasks();
    assert_eq!(tasks.iter().sum::<usize>(), STREAMS, "{tasks:?}");
    assert!(
        tasks.iter().all(|&n| n > 0),
        "a worker got no stream: {tasks:?}"
    );

    // Every stream keeps relaying on whichever worker holds it.
    for (i, s) in upstreams.iter().enumerate() {
        s.send(format!("id: {i}b\ndata: second\n\n")).await;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.chunk().await.unwrap(),
            format!("id: {i}b\ndata: second\n\n")
        );
    }
    let m = metrics(&ss).await;
    assert_eq!(
        sample(&m, "ssegate_events_total{route=\"apps/feed\"}"),
        Some(2.0 * STREAMS as f64)
    );

    // A drain begun on the main runtime closes every stream on every worker, each after a
    // retry hint, then the workers end by themselves.
    let proxy = ss.proxy_addr;
    let drain_cfg = DrainConfig {
        delay: Duration::ZERO,
        window: Duration::from_millis(500),
        grace_period: Duration::from_secs(20),
    };
    let drain = tokio::spawn(async move {
        let outcome = ss.drain(drain_cfg).await;
        (outcome, ss)
    });
    for c in &mut clients {
        let mut tail = String::new();
        while let Some(b) = tokio::time::timeout(PATIENCE, c.chunk()).await.unwrap() {
            tail.push_str(&String::from_utf8_lossy(&b));
        }
        assert!(tail.starts_with("retry: "), "no retry hint: {tail:?}");
    }
    for s in upstreams {
        tokio::time::timeout(PATIENCE, s.closed)
            .await
            .expect("upstream left open")
            .unwrap();
    }
    let (outcome, mut ss) = drain.await.unwrap();
    assert_eq!(outcome.streams_at_start, STREAMS);
    assert_eq!(outcome.streams_left, 0);
    for _ in 0..WORKERS {
        tokio::time::timeout(PATIENCE, ss.wait())
            .await
            .expect("a worker did not end after the drain");
    }
    assert!(TcpStream::connect(proxy).await.is_err(), "still accepting");
    ss.shutdown().await;
}

#[tokio::test]
async fn a_busy_port_fails_start_up_even_for_a_reuseport_group() {
    let backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", ""));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let workers = |n| move |c: &mut ssegate::server::ServerConfig| c.workers = n;

    // Held by a plain listener.
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    for n in [1, WORKERS] {
        let err = try_start_ssegate(&cfg, |c| {
            workers(n)(c);
            c.listen = addr;
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("started with {n} workers on a busy port"));
        assert!(
            format!("{err:#}").contains(&format!("cannot listen on {addr}")),
            "{err:#}"
        );
    }
    drop(taken);

    // Held by another ssegate's SO_REUSEPORT group: joining it would silently split the
    // connections between two processes.
    let first = start_ssegate_tweaked(&cfg, workers(WORKERS)).await;
    let err = try_start_ssegate(&cfg, |c| {
        workers(WORKERS)(c);
        c.listen = first.proxy_addr;
    })
    .await
    .err()
    .expect("a second reuseport group joined the first");
    assert!(format!("{err:#}").contains("cannot listen on"), "{err:#}");
    assert_eq!(get(first.proxy_addr, "h", "/events").await.status, 200);
}
