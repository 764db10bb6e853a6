//! The Hub client's options for the tests against the fake Hub (`hub_server.rs`, which the test
//! binary must include as `mod hub_server`): online through its endpoint, or offline.

#![allow(dead_code)] // each test binary uses a part

use std::path::Path;

use ddpm_data::hub::HubOptions;

use crate::hub_server::FakeHub;

/// Online: the fake Hub's endpoint, the cache in `cache`.
pub fn options(hub: &FakeHub, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: Some(hub.endpoint.clone()),
        cache_dir: Some(cache.to_path_buf()),
        ..HubOptions::default()
    }
}

/// Offline on the cache in `cache`, with an endpoint that nothing answers: offline mode must not
/// try it.
pub fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: Some("http://127.0.0.1:9".into()),
        cache_dir: Some(cache.to_path_buf()),
        offline: true,
        ..HubOptions::default()
    }
}
