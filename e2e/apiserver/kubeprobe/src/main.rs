// A probe of the emulator with the same kube-rs version as ssegate (kube 5.0.0): discovery,
// leases (create/replace/409), server-side apply of a CR and its status, watchers (list+watch and
// streaming lists), deletes and error shapes. Expects the CRD of ../testdata and namespace "demo"
// (run ../selftest-kube-rs.sh). Prints what it saw and exits non-zero on a failure.
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    core::{DynamicObject, GroupVersionKind},
    discovery::{ApiResource, Discovery},
    runtime::{watcher, WatchStreamExt},
    Client,
};
use serde_json::json;
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    println!("version: {:?}", client.apiserver_version().await?.git_version);

    // Discovery must parse and include the CRD.
    let discovery = Discovery::new(client.clone()).run().await?;
    let (ar, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("ssegate.io", "v1alpha1", "SseRoute"))
        .expect("sseroutes discovered");
    println!("discovered {} scope={:?} subresources={:?}", ar.plural, caps.scope, caps.subresources.iter().map(|(a, _)| a.plural.clone()).collect::<Vec<_>>());

    // Leases: create, get, replace, stale replace -> 409.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "demo");
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "probe-leader"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15, "renewTime": "2026-11-23T10:00:00.000000Z"}
    }))?;
    let created = leases.create(&PostParams::default(), &lease).await?;
    let mut renewed = leases.get("probe-leader").await?;
    renewed.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let renewed = leases.replace("probe-leader", &PostParams::default(), &renewed).await?;
    println!("lease rv {:?} -> {:?}", created.metadata.resource_version, renewed.metadata.resource_version);
    match leases.replace("probe-leader", &PostParams::default(), &created).await {
        Err(kube::Error::Api(s)) => println!("stale replace -> {} {}", s.code, s.reason),
        other => anyhow::bail!("stale replace unexpectedly: {:?}", other.map(|l| l.metadata.resource_version)),
    }
    println!("get_opt missing: {:?}", leases.get_opt("nope").await?.is_none());

    // Watchers (list+watch and streaming lists) on the CRD while we SSA the status.
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "demo", &ar);
    let ar2: ApiResource = ar.clone();
    let mut tasks = vec![];
    for (label, cfg) in [("listwatch", watcher::Config::default()), ("streaming", watcher::Config::default().streaming_lists())] {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar2);
        tasks.push(tokio::spawn(async move {
            let mut seen = vec![];
            let stream = watcher(api, cfg).default_backoff().take_until(tokio::time::sleep(Duration::from_secs(4)));
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => seen.push(format!("apply:{}@{}", o.metadata.name.unwrap_or_default(), o.metadata.resource_version.unwrap_or_default())),
                    Ok(watcher::Event::Delete(o)) => seen.push(format!("delete:{}", o.metadata.name.unwrap_or_default())),
                    Ok(watcher::Event::Init) => seen.push("init".into()),
                    Ok(watcher::Event::InitDone) => seen.push("initdone".into()),
                    Err(e) => seen.push(format!("ERR:{e}")),
                }
            }
            println!("{label}: {}", seen.join(" "));
            let ok = seen.contains(&"initdone".to_string()) && seen.contains(&"delete:probe".to_string())
                && !seen.iter().any(|s| s.starts_with("ERR"));
            (label, ok)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let obj = api.patch("probe", &PatchParams::apply("ssegate").force(), &Patch::Apply(json!({
        "apiVersion": "ssegate.io/v1alpha1", "kind": "SseRoute", "metadata": {"name": "probe"},
        "spec": {"host": "p.test", "backend": {"serviceName": "p", "port": 80}}
    }))).await?;
    println!("ssa created gen={:?} rv={:?}", obj.metadata.generation, obj.metadata.resource_version);
    let st = api.patch_status("probe", &PatchParams::apply("ssegate").force(), &Patch::Apply(json!({
        "apiVersion": "ssegate.io/v1alpha1", "kind": "SseRoute", "metadata": {"name": "probe"},
        "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}
    }))).await?;
    println!("status applied: {} gen={:?}", st.data["status"], st.metadata.generation);
    let st2 = api.patch_status("probe", &PatchParams::apply("ssegate").force(), &Patch::Apply(json!({
        "apiVersion": "ssegate.io/v1alpha1", "kind": "SseRoute", "metadata": {"name": "probe"},
        "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}
    }))).await?;
    println!("re-apply no-op: rv {:?} == {:?}", st.metadata.resource_version, st2.metadata.resource_version);
    api.patch("probe", &PatchParams::default(), &Patch::Merge(json!({"spec": {"host": "q.test"}}))).await?;
    let del = api.delete("probe", &DeleteParams::default()).await?;
    println!("delete -> {}", if del.is_left() { "object" } else { "status" });
    for t in tasks {
        let (label, ok) = t.await?;
        anyhow::ensure!(ok, "the {label} watcher missed events (see above)");
    }

    // Error shapes.
    match api.get("probe").await {
        Err(kube::Error::Api(s)) => println!("get deleted -> {} {} {}", s.code, s.reason, s.message),
        other => anyhow::bail!("unexpected {:?}", other.is_ok()),
    }
    let _ = leases.delete("probe-leader", &DeleteParams::default()).await?;
    let all: Vec<_> = Api::<DynamicObject>::all_with(client.clone(), &ar).list(&Default::default()).await?.items;
    println!("list ok ({} items)", all.len());
    let _ = leases.watch(&Default::default(), "0").await?.boxed().try_next().await;
    println!("OK");
    Ok(())
}
