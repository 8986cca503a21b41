//! # ssegate
//!
//! A Kubernetes-native ingress controller for Server-Sent Events. One binary holds two halves
//! that meet in one immutable value, the routing table:
//!
//! ```text
//!   SseRoute ─┐                                                    ┌─ relay (stream mode)
//!   Service ──┼─> source ──> Snapshot ──compile()──> RouteTable ───┤   sse framing, keepalive,
//!   EndpointSlice ┤  (kube watch,       (pure)      (ArcSwap)      │   counting, disconnects
//!   Secret ───┘    or files on disk)       │                       └─ poll adapter (poll mode)
//!                                          └──> route reports ──> status / logs
//! ```
//!
//! - [`source`] keeps a [`source::Snapshot`] of the objects that matter: files on disk in
//!   standalone mode, API server watches feeding a [`source::index::ClusterIndex`] in a cluster.
//! - [`routing::compile`] is pure: it validates routes, resolves Services to ready endpoints and
//!   builds the [`routing::RouteTable`] plus a [`status::RouteReport`] per route.
//! - [`proxy`] loads the table once per request (one atomic load), keeps only the matched
//!   rule's `Arc`, and relays the upstream body unbuffered through the [`sse::Framer`].
//! - [`publish::Publisher`] compiles and swaps the table for both sources.
//! - [`status::writer`] writes route statuses with server-side apply, only on the replica that
//!   holds the [`leader`] Lease.
//! - [`metrics`] is built at start-up and passed in; [`admin`] serves it.

pub mod admin;
pub mod api;
pub mod balance;
pub mod config;
pub mod leader;
pub mod metrics;
pub mod poll;
pub mod proxy;
pub mod publish;
pub mod routing;
pub mod server;
pub mod source;
pub mod sse;
pub mod status;
pub mod tls;
pub mod workers;
