//! Configuration reloads in standalone mode, with streams open.

mod common;

use common::*;

#[tokio::test]
async fn reload_swaps_the_table_without_dropping_open_streams() {
    let mut backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/old", "svc", ""));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let ss = start_ssegate(&cfg).await;

    let mut old = get(ss.proxy_addr, "h", "/old").await;
    let s = backend.next_stream().await;
    s.send("data: before\n\n").await;
    assert_eq!(old.chunk().await.unwrap(), "data: before\n\n");

    // Change the route's path while the stream is open.
    cfg.write("route.yaml", &route_yaml("feed", "/new", "svc", ""));
    eventually("new path served", || async {
        get(ss.proxy_addr, "h", "/new").await.status == 200
    })
    .await;
    assert_eq!(get(ss.proxy_addr, "h", "/old").await.status, 404);
    // Drain the requests the probing above made.
    while let Ok(Some(_)) = tokio::time::timeout(std::time::Duration::from_millis(50), async {
        Some(backend.next_stream().await)
    })
    .await
    {}

    s.send("data: after\n\n").await;
    assert_eq!(old.chunk().await.unwrap(), "data: after\n\n");
    let m = metrics(&ss).await;
    assert!(sample(&m, r#"ssegate_config_reloads_total{result="success"}"#).unwrap() >= 2.0);
}

#[tokio::test]
async fn invalid_file_keeps_the_last_good_table() {
    let mut backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("route.yaml", &route_yaml("feed", "/events", "svc", ""));
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let ss = start_ssegate(&cfg).await;
    assert!(ss.ready.get());

    // A broken edit: both a syntax error in one file and a schema error in another.
    cfg.write(
        "route.yaml",
        &route_yaml("feed", "/changed", "svc", "      mode: Sideways\n"),
    );
    cfg.write("broken.yaml", "kind: [unclosed\n");
    eventually("failed reload counted", || async {
        sample(
            &metrics(&ss).await,
            r#"ssegate_config_reloads_total{result="failure"}"#,
        ) >= Some(1.0)
    })
    .await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    assert_eq!(resp.status, 200, "the last good table must keep serving");
    let s = backend.next_stream().await;
    s.send("data: still here\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: still here\n\n");
    assert_eq!(get(ss.proxy_addr, "h", "/changed").await.status, 404);

    // Fixing the files publishes the new table.
    std::fs::remove_file(cfg.dir.path().join("broken.yaml")).unwrap();
    cfg.write("route.yaml", &route_yaml("feed", "/changed", "svc", ""));
    eventually("fixed config served", || async {
        get(ss.proxy_addr, "h", "/changed").await.status == 200
    })
    .await;
}

#[tokio::test]
async fn a_semantically_invalid_route_does_not_take_others_down() {
    let mut backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write(
        "routes.yaml",
        &[
            route_yaml("good", "/good", "svc", ""),
            route_yaml("bad", "no-slash", "svc", ""),
        ]
        .join("---\n"),
    );
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    let ss = start_ssegate(&cfg).await;
    let mut resp = get(ss.proxy_addr, "h", "/good").await;
    backend.next_stream().await.send("data: ok\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: ok\n\n");
    assert_eq!(sample(&metrics(&ss).await, "ssegate_routes"), Some(1.0));
}

#[tokio::test]
async fn readiness_waits_for_a_valid_configuration() {
    let cfg = ConfigDir::new();
    cfg.write("broken.yaml", "kind: [unclosed\n");
    let ss = start_ssegate(&cfg).await;
    assert!(!ss.ready.get());
    let r = get(ss.admin_addr, "a", "/readyz").await;
    assert_eq!(r.status, 503);
    cfg.write("broken.yaml", "# fixed: nothing here\n");
    eventually("ready after a valid load", || async {
        get(ss.admin_addr, "a", "/readyz").await.status == 200
    })
    .await;
}
