//! The county center's DICOM gateway: C-ECHO and C-STORE from registered
//! township clinics, acknowledged only once each instance is durable.
//!
//! # Layout
//! - [`server`]: listener, connection limits, graceful shutdown.
//! - `association`: one task per association; message assembly and dispatch.
//! - `negotiate`: A-ASSOCIATE-RQ checks, presentation contexts, A-ASSOCIATE-RJ reasons.
//! - `admission`: overall and per-clinic limits, longest-idle eviction.
//!
//! Upper Layer framing and DIMSE command sets live in `consortium-dimse`,
//! shared with the upload tool.
//! - `c_store`: C-STORE into `storage`, and its error-to-status mapping.
//! - `commitment`: Storage Commitment Push Model (N-ACTION, N-EVENT-REPORT).
//! - `report_delivery`: reports owed to requesters that left, on new associations.
//! - `find`: C-FIND identifiers to index queries and back.
//! - `retrieve`: what a C-GET / C-MOVE names, and each instance's bytes (as stored, or transcoded).

mod admission;
mod association;
mod c_store;
mod commitment;
mod find;
mod negotiate;
mod report_delivery;
mod retrieve;
pub mod server;

pub use server::run;
