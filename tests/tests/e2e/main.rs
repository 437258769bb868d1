//! The end-to-end tests, one binary: each module is a tier (lifecycle, gateway, faults...).
//! One binary links once; sixteen binaries each linking the whole mesh and the GPU stack took
//! minutes of CI and gigabytes of disk. Filter by module: `cargo test --test e2e gateway::`.
//! The tests that measure time (`tests/routing.rs`, `tests/prewarm.rs`) and the fixed-rate load
//! (`tests/load.rs`) are binaries of their own, so that no other test shares the cores with them.

mod bad_input;
mod failover;
mod failures;
mod faults;
mod gateway;
mod gpu;
mod ingress;
mod lifecycle;
mod metering;
mod nat;
mod observability;
mod offline;
mod ort;
mod p2p_artifacts;
mod partition;
mod placement;
mod reference;
mod scale_to_zero;
mod security;
mod site;
mod traces;
mod traffic;
