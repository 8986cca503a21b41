//! Sources of configuration: something that keeps an up-to-date [`Snapshot`] of the objects
//! ssegate routes by.
//!
//! - [`files`]: standalone mode, YAML manifests in a directory, re-read when they change.
//! - [`kube`]: cluster mode, API server watches feeding the [`index::ClusterIndex`].

pub mod files;
pub mod index;
pub mod kube;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::api::SseRoute;

/// Every object that matters for routing, as one plain value (the input of
/// [`crate::routing::compile`]).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `ssegate.io/v1alpha1` SseRoutes.
    pub routes: Vec<SseRoute>,
    /// `v1` Services.
    pub services: Vec<Service>,
    /// `discovery.k8s.io/v1` EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// `v1` Secrets (TLS certificates).
    pub secrets: Vec<Secret>,
}
