//! The `[kme]` section of a daemon's configuration, and its validated form.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::identity::{IdentitySource, KmeId, SaeId};
pub use super::limits::AbuseLimits;
use qkd_tls::TlsFiles;

/// Largest key size this implementation accepts in configuration, bits (256 units of 256 bits).
pub const MAX_SUPPORTED_KEY_SIZE: u32 = 65_536;

/// Largest `max_key_per_request` accepted in configuration.
pub const MAX_SUPPORTED_KEYS_PER_REQUEST: u32 = 4096;

/// Configuration of a KME: the ETSI GS QKD 014 HTTPS server, the KME-to-KME channel, the SAEs
/// it knows and the limits it announces in Get status.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmeConfig {
    /// Socket address of the ETSI HTTPS server that SAEs call, e.g. `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// TLS of the HTTPS server: `ca_cert` is the CA that signs the SAEs' client certificates
    /// (every connection must present one), `cert` and `key` are this KME's server certificate
    /// and key, which SAEs verify against the KME's host name.
    pub tls: TlsFiles,
    /// Socket address of the KME-to-KME gRPC server (the peer KME's reservations arrive here),
    /// served with the node's TLS material, e.g. `0.0.0.0:50061`.
    pub peer_listen: SocketAddr,
    /// The peer KME's gRPC server, `host:port`.
    pub peer_addr: String,
    /// DNS name the peer's node certificate must be valid for (checked when calling it and
    /// when it calls).
    pub peer_name: String,
    /// This KME's ID (`source_KME_ID` in Get status); unique in the network.
    pub kme_id: String,
    /// The peer KME's ID (`target_KME_ID` in Get status).
    pub peer_kme_id: String,
    /// The SAEs of the network: each attached to this KME or to the peer. Callers not listed
    /// as attached to this KME are refused (401).
    #[serde(default)]
    pub saes: Vec<SaeEntry>,
    /// Where a caller's SAE ID is read in its (CA-verified) client certificate. Default `cn`.
    #[serde(default)]
    pub identity: IdentitySource,
    /// Default key size, bits (`key_size`; a multiple of 8). Default 256.
    #[serde(default = "default_key_size")]
    pub key_size: u32,
    /// Smallest key size served, bits (`min_key_size`; a multiple of 8). Default 64.
    #[serde(default = "default_min_key_size")]
    pub min_key_size: u32,
    /// Largest key size served, bits (`max_key_size`; a multiple of 8, at most 65536).
    /// Default 1024.
    #[serde(default = "default_max_key_size")]
    pub max_key_size: u32,
    /// Most keys in one Get key request (`max_key_per_request`, 1 to 4096). Default 128.
    #[serde(default = "default_max_key_per_request")]
    pub max_key_per_request: u32,
    /// Most keys announced as stored (`max_key_count`): `stored_key_count` is capped at this
    /// number of keys of `key_size`, which also bounds the work of a Get status. Default 100000.
    #[serde(default = "default_max_key_count")]
    pub max_key_count: u64,
    /// Most additional slave SAEs in one Get key request (`max_SAE_ID_count`); 0 disables
    /// multicast. Default 0.
    #[serde(default)]
    pub max_sae_id_count: u32,
    /// Time limit of one call to the peer KME (connection included), milliseconds. Default 5000.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// Reservations whose slaves have not fetched them after this many seconds are erased;
    /// 0 keeps them forever. Default 86400 (one day).
    #[serde(default = "default_reservation_ttl_s")]
    pub reservation_ttl_s: u64,
    /// Serve keys from a simulated quantum channel (the in-process simulator, the device
    /// emulator, a replay of either). Such keys are not secret from whoever runs the
    /// simulation; without this, Get key answers 503 saying so. Default false; the labs set it.
    #[serde(default)]
    pub allow_simulated_keys: bool,
    /// The delivery audit log: one JSON line per delivery (time, SAE IDs, key IDs and sizes,
    /// never key bytes). Deliveries are refused (503) when it cannot be written. Default: the
    /// daemon's `delivery-audit.jsonl` in its data directory.
    #[serde(default)]
    pub audit_log: Option<std::path::PathBuf>,
    /// Most TLS connections served at once; past it, a new connection's requests are answered
    /// 503. Default 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Most connections one SAE may hold open at once; past it, its new connection's requests
    /// are answered 429. Default 64.
    #[serde(default = "default_max_connections_per_sae")]
    pub max_connections_per_sae: u32,
    /// Sustained requests per second of one SAE (every endpoint); past it, 429 with
    /// `Retry-After`. 0: no limit. Default 200.
    #[serde(default = "default_requests_per_second_per_sae")]
    pub requests_per_second_per_sae: u32,
    /// Requests one SAE may make in a burst after a quiet time. Default 400.
    #[serde(default = "default_request_burst_per_sae")]
    pub request_burst_per_sae: u32,
    /// A connection (HTTP/1.1 or HTTP/2) with no request for this many seconds is closed.
    /// Default 60.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
}

/// One SAE of the network and the KME it is attached to.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeEntry {
    /// The SAE's ID, as found in its certificate (see [`KmeConfig::identity`]).
    pub sae_id: String,
    /// The ID of the KME it is attached to: `kme_id` or `peer_kme_id`.
    pub kme_id: String,
}

fn default_key_size() -> u32 {
    256
}
fn default_min_key_size() -> u32 {
    64
}
fn default_max_key_size() -> u32 {
    1024
}
fn default_max_key_per_request() -> u32 {
    128
}
fn default_max_key_count() -> u64 {
    100_000
}
fn default_peer_timeout_ms() -> u64 {
    5000
}
fn default_reservation_ttl_s() -> u64 {
    86_400
}
fn default_max_connections() -> u32 {
    AbuseLimits::default().max_connections
}
fn default_max_connections_per_sae() -> u32 {
    AbuseLimits::default().max_connections_per_sae
}
fn default_requests_per_second_per_sae() -> u32 {
    AbuseLimits::default().requests_per_second_per_sae
}
fn default_request_burst_per_sae() -> u32 {
    AbuseLimits::default().request_burst_per_sae
}
fn default_idle_timeout_s() -> u64 {
    AbuseLimits::default().idle_timeout.as_secs()
}

/// Largest message the KME-to-KME channel accepts, bytes: tonic's default decoding limit, set
/// explicitly on the peer server so that [`reserve_request_bound`] checks against the truth.
pub const PEER_MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Longest SAE ID accepted in configuration, bytes.
pub const MAX_SAE_ID_BYTES: usize = 1024;

/// Bytes of a protobuf length-delimited field (tag of one byte, as every field number of
/// `kme.proto` is below 16) holding `len` bytes: tag, varint length, content.
fn field_bytes(len: usize) -> usize {
    let mut varint = 1;
    while len >> (7 * varint) != 0 {
        varint += 1;
    }
    1 + varint + len
}

/// An upper bound of the encoded size of the largest Reserve request (`proto/kme.proto`) a KME
/// with these limits may send: `max_key_per_request` keys of `max_key_size` bits (each key a
/// 16-byte ID and its 256-bit units' 16-byte IDs), a master and `max_sae_id_count` + 1 slaves
/// of the longest SAE ID, the source KME ID. Every field is counted at its largest encoding, so
/// the bound is never below the real size (a test checks it against prost's exact encoding).
pub fn reserve_request_bound(limits: &Limits, kme_id_bytes: usize) -> usize {
    let units_per_key = (limits.max_key_size as usize).div_ceil(8 * qkd_store::kme::UNIT_BYTES);
    let key = field_bytes(field_bytes(16) + units_per_key * field_bytes(16));
    let sae_ids = (2 + limits.max_sae_id_count as usize) * field_bytes(MAX_SAE_ID_BYTES);
    // size_bits: tag and a varint of at most 5 bytes.
    field_bytes(kme_id_bytes) + sae_ids + 6 + limits.max_key_per_request as usize * key
}

/// A `[kme]` section that does not make sense (the message names the field).
#[derive(Debug, thiserror::Error)]
#[error("kme.{0}")]
pub struct KmeConfigError(pub String);

/// Where an SAE is attached, seen from this KME.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Attached to this KME (it may call this KME).
    Local,
    /// Attached to the peer KME.
    Peer,
}

/// The validated settings of a KME (built once from [`KmeConfig`]).
#[derive(Clone, Debug)]
pub struct KmeSettings {
    /// This KME's ID.
    pub kme_id: KmeId,
    /// The peer KME's ID.
    pub peer_kme_id: KmeId,
    /// Every known SAE and where it is attached.
    pub saes: HashMap<SaeId, Attachment>,
    /// Where the caller's SAE ID is read.
    pub identity: IdentitySource,
    /// Limits announced in Get status.
    pub limits: Limits,
    /// Time limit of one peer call.
    pub peer_timeout: Duration,
    /// Reservation lifetime; `None` keeps reservations forever.
    pub reservation_ttl: Option<Duration>,
    /// Serve keys of a simulated quantum channel.
    pub allow_simulated_keys: bool,
    /// Connections, request rates and idle time granted to callers.
    pub abuse: AbuseLimits,
}

/// Key sizes and counts, all validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Default key size, bits.
    pub key_size: u32,
    /// Smallest key size, bits.
    pub min_key_size: u32,
    /// Largest key size, bits.
    pub max_key_size: u32,
    /// Most keys per request.
    pub max_key_per_request: u32,
    /// Cap of `stored_key_count`.
    pub max_key_count: u64,
    /// Most additional slaves per request.
    pub max_sae_id_count: u32,
}

impl Default for Limits {
    /// The defaults of [`KmeConfig`].
    fn default() -> Self {
        Self {
            key_size: default_key_size(),
            min_key_size: default_min_key_size(),
            max_key_size: default_max_key_size(),
            max_key_per_request: default_max_key_per_request(),
            max_key_count: default_max_key_count(),
            max_sae_id_count: 0,
        }
    }
}

impl KmeConfig {
    /// Checks the section and builds the settings the KME runs with.
    pub fn settings(&self) -> Result<KmeSettings, KmeConfigError> {
        let err = |s: String| Err(KmeConfigError(s));
        if self.kme_id.is_empty() || self.peer_kme_id.is_empty() {
            return err("kme_id and peer_kme_id must not be empty".into());
        }
        if self.kme_id == self.peer_kme_id {
            return err(format!("peer_kme_id must differ from kme_id ({:?})", self.kme_id));
        }
        if self.peer_name.is_empty() || self.peer_addr.is_empty() {
            return err("peer_addr and peer_name must not be empty".into());
        }
        let limits = Limits {
            key_size: self.key_size,
            min_key_size: self.min_key_size,
            max_key_size: self.max_key_size,
            max_key_per_request: self.max_key_per_request,
            max_key_count: self.max_key_count,
            max_sae_id_count: self.max_sae_id_count,
        };
        for (name, value) in [
            ("key_size", limits.key_size),
            ("min_key_size", limits.min_key_size),
            ("max_key_size", limits.max_key_size),
        ] {
            if value == 0 || value % 8 != 0 {
                return err(format!("{name} must be a positive multiple of 8 bits, not {value}"));
            }
        }
        if !(limits.min_key_size <= limits.key_size && limits.key_size <= limits.max_key_size) {
            return err("sizes must satisfy min_key_size <= key_size <= max_key_size".into());
        }
        if limits.max_key_size > MAX_SUPPORTED_KEY_SIZE {
            return err(format!("max_key_size must be at most {MAX_SUPPORTED_KEY_SIZE} bits"));
        }
        if limits.max_key_per_request == 0 || limits.max_key_per_request > MAX_SUPPORTED_KEYS_PER_REQUEST {
            return err(format!("max_key_per_request must be between 1 and {MAX_SUPPORTED_KEYS_PER_REQUEST}"));
        }
        if limits.max_key_count == 0 {
            return err("max_key_count must be at least 1".into());
        }
        if limits.max_sae_id_count > 64 {
            return err("max_sae_id_count must be at most 64".into());
        }
        if self.peer_timeout_ms == 0 {
            return err("peer_timeout_ms must be at least 1".into());
        }
        let bound = reserve_request_bound(&limits, self.kme_id.len());
        if bound > PEER_MAX_MESSAGE_BYTES {
            return err(format!(
                "max_key_per_request ({}) times max_key_size ({} bits) is too large: the reservation of \
                 one request at the peer KME could take {bound} bytes, more than the KME-to-KME \
                 channel's {PEER_MAX_MESSAGE_BYTES}; lower either",
                limits.max_key_per_request, limits.max_key_size
            ));
        }
        let abuse = AbuseLimits {
            max_connections: self.max_connections,
            max_connections_per_sae: self.max_connections_per_sae,
            requests_per_second_per_sae: self.requests_per_second_per_sae,
            request_burst_per_sae: self.request_burst_per_sae,
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
        };
        if abuse.max_connections == 0 || abuse.max_connections_per_sae == 0 {
            return err("max_connections and max_connections_per_sae must be at least 1".into());
        }
        if abuse.requests_per_second_per_sae > 0 && abuse.request_burst_per_sae == 0 {
            return err("request_burst_per_sae must be at least 1 when requests_per_second_per_sae is set".into());
        }
        if self.idle_timeout_s == 0 {
            return err("idle_timeout_s must be at least 1".into());
        }
        let mut saes = HashMap::new();
        for (i, entry) in self.saes.iter().enumerate() {
            if entry.sae_id.is_empty() || entry.sae_id.len() > MAX_SAE_ID_BYTES {
                return err(format!("saes[{i}].sae_id must hold 1 to {MAX_SAE_ID_BYTES} bytes"));
            }
            let attachment = if entry.kme_id == self.kme_id {
                Attachment::Local
            } else if entry.kme_id == self.peer_kme_id {
                Attachment::Peer
            } else {
                return err(format!("saes[{i}].kme_id {:?} is neither kme_id nor peer_kme_id", entry.kme_id));
            };
            if saes.insert(SaeId(entry.sae_id.clone()), attachment).is_some() {
                return err(format!("saes[{i}].sae_id {:?} is listed twice", entry.sae_id));
            }
        }
        Ok(KmeSettings {
            kme_id: KmeId(self.kme_id.clone()),
            peer_kme_id: KmeId(self.peer_kme_id.clone()),
            saes,
            identity: self.identity,
            limits,
            peer_timeout: Duration::from_millis(self.peer_timeout_ms),
            reservation_ttl: (self.reservation_ttl_s > 0).then(|| Duration::from_secs(self.reservation_ttl_s)),
            allow_simulated_keys: self.allow_simulated_keys,
            abuse,
        })
    }
}

impl KmeSettings {
    /// Where `sae` is attached, if known.
    pub fn attachment(&self, sae: &SaeId) -> Option<Attachment> {
        self.saes.get(sae).copied()
    }
}
