//! The center's configuration: one TOML file read by every service.
//!
//! `Config::from_file` parses and validates it; the clinic registry
//! (`Config::clinic_for_ae`) is how the gateway attributes an association to a
//! clinic. The schema is documented with a commented example in the README.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Everything that can go wrong reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub storage: StorageConfig,
    #[serde(default)]
    pub clinics: Vec<Clinic>,
    #[serde(default)]
    pub destinations: Vec<Destination>,
    #[serde(default)]
    pub viewer: Option<ViewerConfig>,
}

/// `[gateway]`: the DICOM listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Called AE title this center answers to.
    pub ae_title: String,
    pub listen: SocketAddr,
    #[serde(default = "defaults::max_associations")]
    pub max_associations: usize,
    #[serde(default = "defaults::max_associations_per_clinic")]
    pub max_associations_per_clinic: usize,
    #[serde(default = "defaults::idle_timeout_s")]
    pub idle_timeout_s: u64,
    #[serde(default = "defaults::artim_timeout_s")]
    pub artim_timeout_s: u64,
    /// Largest P-DATA-TF PDU we accept (announced in the A-ASSOCIATE-AC).
    #[serde(default = "defaults::max_pdu_length")]
    pub max_pdu_length: u32,
    /// Largest instance accepted, in bytes; bigger ones fail with 0xA700.
    #[serde(default = "defaults::max_instance_bytes")]
    pub max_instance_bytes: u64,
    /// Most C-FIND matches returned; beyond it the query ends with 0xA700.
    #[serde(default = "defaults::max_find_results")]
    pub max_find_results: u64,
}

impl GatewayConfig {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }
    pub fn artim_timeout(&self) -> Duration {
        Duration::from_secs(self.artim_timeout_s)
    }
}

/// `[storage]`: where blobs and the index live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// The spool and the SQLite index, and the blobs unless `s3` is set.
    pub data_dir: PathBuf,
    /// `[storage.s3]`: blobs in an S3-compatible object store instead of
    /// `data_dir/blobs`.
    #[serde(default)]
    pub s3: Option<S3Config>,
    /// Free space the filesystem of `data_dir` keeps: below it, instances
    /// are refused (0xA700, "send again later") before they are received,
    /// so the index and the audit trail beside them keep room. Checked as
    /// each instance starts: instances already arriving may still use the
    /// reserve (a full disk then fails them with 0xA700 too). 0 turns the
    /// check off.
    #[serde(default = "defaults::min_free_bytes")]
    pub min_free_bytes: u64,
}

/// `[storage.s3]`: an S3-compatible bucket for the blobs (AWS S3, MinIO,
/// Ceph RGW, Garage...). A PUT it has answered is durable, so a success
/// status to a sender rests on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    #[serde(default = "defaults::s3_region")]
    pub region: String,
    /// `https://host:port` of a non-AWS server; AWS itself when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// Plain `http://` endpoints are refused unless this is true (a server
    /// on the same host or a closed network).
    #[serde(default)]
    pub allow_http: bool,
    /// Bucket addressed as `endpoint/bucket/key` (MinIO, Ceph and most
    /// servers other than AWS) instead of `bucket.host/key` (then an
    /// `endpoint` must be the bucket's own host).
    #[serde(default = "defaults::s3_path_style")]
    pub path_style: bool,
}

/// A secret from the configuration: printed as `[redacted]`, so that a
/// logged or debug-printed configuration never shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `[[clinics]]`: a member institution allowed to send and query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clinic {
    /// Stable id used in the index and the API.
    pub id: String,
    pub name: String,
    pub ae_titles: Vec<String>,
    /// When present, associations from other addresses are refused.
    #[serde(default)]
    pub addresses: Option<Vec<IpAddr>>,
    /// `county` for the center's own reading stations; `township` otherwise.
    #[serde(default)]
    pub role: ClinicRole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClinicRole {
    #[default]
    Township,
    County,
}

/// `[[destinations]]`: C-MOVE destinations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
}

/// `[viewer]`: the gRPC reading service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewerConfig {
    pub listen: SocketAddr,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Lifetime of a login token, in seconds (default 8 hours).
    #[serde(default = "defaults::token_lifetime_s")]
    pub token_lifetime_s: u64,
    /// How long a worklist claim lasts unless renewed, in seconds (default 15 minutes).
    #[serde(default = "defaults::lease_s")]
    pub lease_s: u64,
    /// A study enters the worklist once no instance arrived for this long (default 60 s).
    #[serde(default = "defaults::worklist_settle_s")]
    pub worklist_settle_s: u64,
    /// Rendered frames kept in memory for repeated requests, in MiB (default 64).
    #[serde(default = "defaults::render_cache_mib")]
    pub render_cache_mib: u64,
    /// Decoded frames kept in memory, so a new window or size skips the
    /// decode, in MiB (default 256).
    #[serde(default = "defaults::frame_cache_mib")]
    pub frame_cache_mib: u64,
    /// Series streams, raw downloads and worklist watches one user may have
    /// open at once (default 16).
    #[serde(default = "defaults::max_streams_per_user")]
    pub max_streams_per_user: usize,
    /// Largest GetStudyMetadata answer, in KiB (default 65536, 64 MiB).
    /// A study whose metadata is larger comes in pages, to clients that
    /// ask for pages; one that does not is told so instead.
    #[serde(default = "defaults::max_metadata_answer_kib")]
    pub max_metadata_answer_kib: u64,
}

mod defaults {
    pub(super) fn token_lifetime_s() -> u64 {
        8 * 3600
    }
    pub(super) fn lease_s() -> u64 {
        15 * 60
    }
    pub(super) fn worklist_settle_s() -> u64 {
        60
    }
    pub(super) fn render_cache_mib() -> u64 {
        64
    }
    pub(super) fn frame_cache_mib() -> u64 {
        256
    }
    pub(super) fn max_streams_per_user() -> usize {
        16
    }
    pub(super) fn max_metadata_answer_kib() -> u64 {
        64 * 1024
    }
    pub(super) fn max_associations() -> usize {
        200
    }
    pub(super) fn max_associations_per_clinic() -> usize {
        50
    }
    pub(super) fn idle_timeout_s() -> u64 {
        60
    }
    pub(super) fn artim_timeout_s() -> u64 {
        10
    }
    pub(super) fn max_pdu_length() -> u32 {
        262_144
    }
    pub(super) fn max_instance_bytes() -> u64 {
        4 << 30
    }
    pub(super) fn min_free_bytes() -> u64 {
        1 << 30
    }
    pub(super) fn max_find_results() -> u64 {
        10_000
    }
    pub(super) fn s3_region() -> String {
        "us-east-1".into()
    }
    pub(super) fn s3_path_style() -> bool {
        true
    }
}

/// Why an association's identity does not match the clinic registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessDenied {
    UnknownCallingAe,
    AddressNotAllowed,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates configuration text.
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |msg: String| Err(Error::Invalid(msg));
        validate_ae_title(&self.gateway.ae_title)?;
        let g = &self.gateway;
        if !(16_384..=16 << 20).contains(&g.max_pdu_length) {
            return invalid("gateway.max_pdu_length must be between 16384 and 16777216".into());
        }
        if g.max_associations == 0 || g.max_associations_per_clinic == 0 {
            return invalid("gateway association limits must be at least 1".into());
        }
        if g.artim_timeout_s == 0 || g.idle_timeout_s == 0 {
            return invalid("gateway timeouts must be at least 1 s".into());
        }
        let mut seen_ids = std::collections::HashSet::new();
        let mut seen_aes = std::collections::HashSet::new();
        for clinic in &self.clinics {
            if clinic.id.is_empty()
                || !clinic
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return invalid(format!("clinic id {:?} must be [A-Za-z0-9_-]+", clinic.id));
            }
            if !seen_ids.insert(clinic.id.as_str()) {
                return invalid(format!("clinic id {:?} appears twice", clinic.id));
            }
            for ae in &clinic.ae_titles {
                validate_ae_title(ae)?;
                if !seen_aes.insert(ae.as_str()) {
                    return invalid(format!("AE title {ae:?} belongs to two clinics"));
                }
            }
        }
        for dest in &self.destinations {
            validate_ae_title(&dest.ae_title)?;
        }
        if let Some(s3) = &self.storage.s3 {
            s3.validate()?;
        }
        if let Some(v) = &self.viewer {
            if v.max_streams_per_user == 0 {
                return invalid("viewer.max_streams_per_user must be at least 1".into());
            }
            // An answer is held whole, and encoded once more, in memory.
            if !(16..=256 * 1024).contains(&v.max_metadata_answer_kib) {
                return invalid(
                    "viewer.max_metadata_answer_kib must be from 16 to 262144 (256 MiB)".into(),
                );
            }
        }
        Ok(())
    }

    /// Whether clinic `clinic_id` may have a C-MOVE send to destination
    /// `ae`: the county's stations to any configured destination, a
    /// township clinic only to its own AEs or the county's, never to
    /// another clinic's machine nor anywhere outside the consortium.
    pub fn may_move_to(&self, clinic_id: &str, ae: &str) -> bool {
        let is_county = |c: &Clinic| c.role == ClinicRole::County;
        if self
            .clinics
            .iter()
            .any(|c| c.id == clinic_id && is_county(c))
        {
            return true;
        }
        self.clinics
            .iter()
            .any(|c| c.ae_titles.iter().any(|a| a == ae) && (c.id == clinic_id || is_county(c)))
    }

    /// The clinic that owns `calling_ae`, if the peer at `peer` may use it.
    pub fn clinic_for_ae(&self, calling_ae: &str, peer: IpAddr) -> Result<&Clinic, AccessDenied> {
        let clinic = self
            .clinics
            .iter()
            .find(|c| c.ae_titles.iter().any(|ae| ae == calling_ae))
            .ok_or(AccessDenied::UnknownCallingAe)?;
        match &clinic.addresses {
            Some(allowed) if !allowed.iter().any(|a| same_ip(*a, peer)) => {
                Err(AccessDenied::AddressNotAllowed)
            }
            _ => Ok(clinic),
        }
    }
}

impl S3Config {
    fn validate(&self) -> Result<(), Error> {
        let invalid = |msg: &str| Err(Error::Invalid(format!("storage.s3: {msg}")));
        // S3 bucket naming rules (lower case, digits, dots, hyphens).
        let name_ok = (3..=63).contains(&self.bucket.len())
            && self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !name_ok {
            return invalid("bucket must be 3-63 lower-case letters, digits, dots or hyphens");
        }
        if self.access_key_id.is_empty() || self.secret_access_key.0.is_empty() {
            return invalid("access_key_id and secret_access_key are required");
        }
        match self.endpoint.as_deref() {
            None => {}
            Some(e) if e.starts_with("https://") => {}
            Some(e) if e.starts_with("http://") && !self.allow_http => {
                return invalid(
                    "a plain http:// endpoint needs allow_http = true (blobs and keys would cross the network unencrypted)",
                );
            }
            Some(e) if e.starts_with("http://") => {}
            Some(_) => return invalid("endpoint must start with https:// or http://"),
        }
        // Virtual-hosted style takes the endpoint as it is: the bucket must
        // be in its host already, or every key would land in another bucket.
        if let Some(e) = &self.endpoint
            && !self.path_style
            && !e
                .split_once("://")
                .is_some_and(|(_, host)| host.starts_with(&format!("{}.", self.bucket)))
        {
            return invalid(
                "with path_style = false the endpoint must be the bucket's own host (https://BUCKET.host)",
            );
        }
        Ok(())
    }
}

/// Compares addresses treating IPv4-mapped IPv6 as IPv4.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    canon(a) == canon(b)
}

/// AE titles are 1 to 16 characters of ISO 646 without backslash or control characters.
pub fn validate_ae_title(ae: &str) -> Result<(), Error> {
    let ok = !ae.trim().is_empty()
        && ae.len() <= 16
        && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "AE title {ae:?} is not 1-16 printable ASCII characters"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[gateway]
ae_title = "COUNTYPACS"
listen = "127.0.0.1:11112"
max_associations = 200
max_associations_per_clinic = 50
idle_timeout_s = 60
artim_timeout_s = 10
max_pdu_length = 262144

[storage]
data_dir = "data"

[[clinics]]
id = "xinzhen"
name = "新镇乡卫生院"
ae_titles = ["XINZHEN_CT", "XINZHEN_US"]
addresses = ["127.0.0.1"]

[[clinics]]
id = "county"
name = "县医院"
ae_titles = ["COUNTYWS1"]
role = "county"

[[destinations]]
ae_title = "COUNTYWS1"
host = "127.0.0.1"
port = 11113
"#;

    #[test]
    fn issue_example_parses_and_resolves_clinics() {
        let config = Config::from_toml(EXAMPLE).unwrap();
        assert_eq!(config.gateway.max_pdu_length, 262_144);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(
            config.clinic_for_ae("XINZHEN_US", local).unwrap().id,
            "xinzhen"
        );
        assert_eq!(
            config.clinic_for_ae("XINZHEN_US", other).unwrap_err(),
            AccessDenied::AddressNotAllowed
        );
        assert_eq!(
            config.clinic_for_ae("NOBODY", local).unwrap_err(),
            AccessDenied::UnknownCallingAe
        );
        // No address list: any address.
        assert_eq!(
            config.clinic_for_ae("COUNTYWS1", other).unwrap().role,
            ClinicRole::County
        );
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(config.clinic_for_ae("XINZHEN_CT", mapped).is_ok());
    }

    #[test]
    fn rejects_duplicate_ae_titles_and_bad_values() {
        let dup = EXAMPLE.replace("COUNTYWS1\"]", "XINZHEN_CT\"]");
        assert!(matches!(Config::from_toml(&dup), Err(Error::Invalid(_))));
        let bad_pdu = EXAMPLE.replace("262144", "100");
        assert!(matches!(
            Config::from_toml(&bad_pdu),
            Err(Error::Invalid(_))
        ));
        let s3 = |extra: &str| {
            EXAMPLE.replace(
                "data_dir = \"data\"",
                &format!(
                    "data_dir = \"data\"\n[storage.s3]\nbucket = \"consortium\"\naccess_key_id = \"AK\"\nsecret_access_key = \"sekret\"\n{extra}"
                ),
            )
        };
        let config = Config::from_toml(&s3("endpoint = \"https://s3.local:9000\"")).unwrap();
        let parsed = config.storage.s3.as_ref().unwrap();
        assert_eq!(parsed.region, "us-east-1");
        assert_eq!(parsed.secret_access_key.expose(), "sekret");
        assert!(!format!("{config:?}").contains("sekret"));
        assert!(matches!(
            Config::from_toml(&s3("endpoint = \"http://s3.local:9000\"")),
            Err(Error::Invalid(_))
        ));
        assert!(
            Config::from_toml(&s3(
                "endpoint = \"http://127.0.0.1:9000\"\nallow_http = true"
            ))
            .is_ok()
        );
        assert!(matches!(
            Config::from_toml(&s3("endpoint = \"https://s3.local\"\npath_style = false")),
            Err(Error::Invalid(_))
        ));
        assert!(
            Config::from_toml(&s3(
                "endpoint = \"https://consortium.s3.local\"\npath_style = false"
            ))
            .is_ok()
        );
        assert!(matches!(
            Config::from_toml(&s3("").replace("\"consortium\"", "\"Bad_Bucket\"")),
            Err(Error::Invalid(_))
        ));
        let unknown_key = EXAMPLE.replace("[storage]", "[storage]\nbogus = 1");
        assert!(matches!(
            Config::from_toml(&unknown_key),
            Err(Error::Parse(_))
        ));
    }
}
