//! The county radiologists' gRPC reading service (`consortium.v1`):
//! identity, the shared worklist, study metadata and priors, rendered frames
//! and raw instances, all authenticated, authorized by role and clinic, and
//! audited.
//!
//! # Layout
//! - [`server`]: listener, TLS, health and reflection.
//! - [`service`]: the gRPC services; each call is authenticated, checked and audited.
//! - [`auth`]: users, roles, argon2 passwords, bearer tokens, failed-login limits.
//! - [`worklist`]: settled studies, claims with leases, the change feed.
//! - [`studies`]: study and instance lookups with access checks, metadata, priors.
//! - [`images`] and [`render`]: frames rendered off the runtime, cached; raw chunks.
//! - [`audit`]: the append-only audit rows.
//! - [`admin`]: the `viewer-api admin` command (users, clinics, tokens, audit log).
//! - [`db`]: the index connections; [`error`]: the one error type and its gRPC codes.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod db;
pub mod error;
pub mod images;
pub mod render;
pub mod server;
pub mod service;
pub mod streams;
pub mod studies;
pub mod worklist;
