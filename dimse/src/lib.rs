//! The network protocol pieces both sides of the center speak: Upper Layer
//! PDU framing with length checks before allocation ([`ul`]) and DIMSE
//! command sets, command fields and statuses ([`command`]). PDUs themselves
//! are encoded and decoded by dicom-ul; datasets are not this crate's
//! business.

pub mod client;
pub mod command;
pub mod ul;

pub use command::{Command, CommandError, Response, field, status, tag};
