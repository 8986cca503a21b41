//! Backpressure: a client that stops reading never makes ssegate buffer without bound.
//! Alone in its test binary, so the process's RSS measures this test only.

mod common;

use std::time::Duration;

use common::*;
use ssegate::proxy::ProxyConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_back_the_upstream_and_memory_stays_bounded() {
    let proxy_cfg = ProxyConfig {
        client_write_timeout: None,
        ..ProxyConfig::default()
    };
    let mut backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", ""));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let ss = start_ssegate_with(&cfg, proxy_cfg).await;
    let _client = non_reading_client(ss.proxy_addr).await;
    let stream = backend.next_stream().await;
    let rss0 = rss_bytes();
    const FLOOD: usize = 512 << 20;
    let sent = flood(&stream, FLOOD).await;
    // The backend was stopped by TCP backpressure long before its 512 MiB: what it got rid
    // of sits in socket buffers (both hops), the backend's channel and hyper's bounded
    // write buffers.
    assert!(sent < 48 << 20, "backend sent {} MiB", sent >> 20);
    let m = metrics(&ss).await;
    let relayed = sample(&m, r#"ssegate_bytes_sent_total{route="apps/feed"}"#).unwrap();
    assert!(relayed < (16 << 20) as f64, "ssegate took {relayed} bytes");
    let grown = rss_bytes().saturating_sub(rss0);
    // Measured about 1 MiB here; a proxy reading ahead would hold most of the 512 MiB.
    assert!(grown < 32 << 20, "RSS grew {} MiB", grown >> 20);
    // Stalled, not slow: nothing more goes through while the client does not read.
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            stream.try_send("data: more\n\n")
        )
        .await
        .is_err()
    );
    assert!(
        stream.is_open(),
        "no write timeout configured: the stream stays"
    );
}
