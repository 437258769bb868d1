//! The end-to-end tests, one binary: each module is a tier (lifecycle, routing, gateway, faults...).
//! One binary links once; sixteen binaries each linking the whole mesh and the GPU stack took
//! minutes of CI and gigabytes of disk. Filter by module: `cargo test --test e2e routing::`.

mod bad_input;
mod failover;
mod failures;
mod faults;
mod gateway;
mod gpu;
mod lifecycle;
mod metering;
mod observability;
mod partition;
mod placement;
mod prewarm;
mod reference;
mod routing;
mod scale_to_zero;
mod security;
mod traces;
mod traffic;
